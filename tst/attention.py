"""The local spec's core attention through PyTorch's fused kernels.

megatron-core's local spec computes attention unfused: the [batch, heads, s, s] scores are
written out, scaled, masked, soft-maxed and read back in separate kernels. On one H200 that
was most of a 110M GPT's step at context 2,048 (docs/RESULTS.md, "Where the step goes").
:class:`SDPAttention` is the same module (megatron-core's ``DotProductAttention``: its
constructor, softmax scale and dropout) whose forward calls
``torch.nn.functional.scaled_dot_product_attention``, which picks a flash or
memory-efficient kernel on a GPU and never materialises the scores there. It has no
parameters, so checkpoints do not depend on which attention wrote them.

Used by the local spec where ``--attention-backend`` is ``flash`` or ``fused``, and for
``auto`` on CUDA; Transformer Engine's spec keeps TE's attention, ``unfused`` / ``local``
keep megatron-core's, and so does multi-latent attention (``tst.model``'s
``LatentDotProductAttention``).

Under context parallelism the local spec's core attention (standard or multi-latent) is
:class:`ContextParallelAttention`: megatron-core has only Transformer Engine's.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def use_sdpa(attention_backend: str, use_transformer_engine: bool, on_gpu: bool,
             model=None, warn: bool = True) -> bool:  # fmt: skip
    """Whether the local spec's core attention is :class:`SDPAttention`.

    ``model`` (a :class:`tst.config.ModelConfig`): a softmax with sinks or a sliding window
    runs megatron-core's unfused attention, which has both (with a warning where flash /
    fused was asked for by name).
    """
    if use_transformer_engine:
        return False
    sdpa = attention_backend in ("flash", "fused") or (attention_backend == "auto" and on_gpu)
    unfused_only = model is not None and (
        model.softmax_type != "vanilla" or model.window_size is not None
    )
    # The largest logit per head is read from the scores, which the fused kernels never form.
    logits = model is not None and (model.qk_clip or model.log_max_attention_logit)
    if sdpa and (unfused_only or logits):
        if warn and attention_backend != "auto":
            what = ("no attention sinks (--softmax-type) or sliding window (--window-size)"
                    if unfused_only else "no attention scores to take --qk-clip's / "
                    "--log-max-attention-logit's maximum of")  # fmt: skip
            warnings.warn(
                f"--attention-backend {attention_backend}: the fused (SDPA) local attention has "
                f"{what}; running megatron-core's unfused attention (pass --attention-backend "
                "unfused to silence this, or use Transformer Engine's spec, which has them)",
                stacklevel=2,
            )
        return False
    return sdpa


def _attend_and_merge_heads(attend, dropout: float, config):
    """``attend()`` (in the tensor-parallel RNG tracker's stream where it drops out, as
    megatron-core's attention dropout runs), its ``[b, n, sq, d_v]`` result returned in
    megatron-core's ``[sq, b, n x d_v]``."""
    if dropout and not config.sequence_parallel:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = attend()
    else:
        context = attend()
    return context.permute(2, 0, 1, 3).reshape(context.size(2), context.size(0), -1)


class SDPAttention(DotProductAttention):
    """megatron-core's ``DotProductAttention`` computed by ``scaled_dot_product_attention``.

    Tensors are megatron's: query ``[sq, b, heads/tp, d]``, key and value ``[sk, b,
    groups/tp, d]`` (grouped-query attention repeats each key/value group over its
    consecutive query heads, as megatron-core's ``repeat_interleave`` does), the result
    ``[sq, b, heads/tp x d_v]``. The mask follows megatron-core's convention (``True`` masks
    a position out); without one, a causal mask type is the causal kernel.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.softmax_offset is not None or self.scale_mask_softmax.window_size is not None:
            raise ValueError(
                "the fused (SDPA) local attention has no softmax offset or sliding window: "
                "pass --attention-backend unfused"
            )
        # megatron-core divides the scale by the layer number for query-key layer scaling
        # and multiplies it back inside its fp32 softmax; the fused kernels accumulate in fp32.
        coeff = self.layer_number if self.config.apply_query_key_layer_scaling else 1
        self.sdpa_scale = self.softmax_scale * coeff

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):  # fmt: skip
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "packed sequences and attention biases need Transformer Engine's attention"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = q.size(1) // k.size(1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True masks out; SDPA: True attends
        elif mask_type == AttnMaskType.causal:
            causal = True
        elif mask_type != AttnMaskType.no_mask:
            raise ValueError(f"the fused (SDPA) local attention needs a mask for {mask_type}")
        dropout = self.attention_dropout.p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.sdpa_scale
            )

        return _attend_and_merge_heads(attend, dropout, self.config)


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 0) in CP-rank order; backward: each rank's slice
    of the gradient summed over the ranks (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * group.size(), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.group.size(), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


class ContextParallelAttention(MegatronModule):
    """The local spec's core attention under context parallelism (``--context-parallel-size``
    > 1), where megatron-core has only Transformer Engine's.

    Each CP rank holds chunks ``r`` and ``2 CP - 1 - r`` of the sequence (megatron-core's
    load balancing, :func:`tst.data.context_parallel.kept_positions`). Its keys and values are
    all-gathered over the CP group (Megatron-LM's ``allgather`` communication type; their
    gradients are reduce-scattered back) and put back in sequence order; each of its two
    query chunks attends to the keys up to its own end, causally within its own chunk, through
    ``scaled_dot_product_attention`` with a lower-right causal bias (no mask tensor: a fused
    causal kernel on a GPU); given a mask (``--reset-attention-mask``: its rows this rank's
    queries, its columns every key in sequence order), attends under it instead.
    megatron-core's signature, grouped-query heads, MLA's head sizes (``k_channels`` /
    ``v_channels``), its softmax scale and dropout. No parameters.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, k_channels=None, v_channels=None):  # fmt: skip
        super().__init__(config=config)
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("context parallelism on the local spec has no attention sinks "
                             "(--softmax-type) or sliding window (--window-size)")  # fmt: skip
        head_dim = k_channels or config.kv_channels
        # (Query-key layer scaling divides and multiplies back by the layer number in fp32:
        # no change to the result, which the fused kernel computes in fp32.)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):  # fmt: skip
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("context parallelism on the local spec takes no attention bias "
                             "or packed sequences")  # fmt: skip
        # (Imported here: torch.nn.attention.bias imports TorchDynamo, which tst.megatron_import
        # keeps out of a run that does not compile.)
        from torch.nn.attention.bias import causal_lower_right

        group = self.cp_group
        cp, rank = group.size(), group.rank()
        chunk = query.shape[0] // 2

        def gathered(t):
            # Every rank's two chunks, put back in sequence order: rank p holds chunks p and
            # 2 CP - 1 - p (megatron-core's load balancing), so the first halves in rank order
            # are chunks 0 .. CP - 1 and the second halves in reverse rank order the rest.
            t = _GatherSequence.apply(t, group)  # [CP x 2 chunks, ...] in rank order
            halves = t.view(cp, 2, chunk, *t.shape[1:])
            return torch.cat([halves[:, 0], halves[:, 1].flip(0)]).flatten(0, 1)

        key, value = gathered(key), gathered(value)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        groups = q.size(1) // k.size(1)
        if groups > 1:  # grouped-query attention, as megatron-core repeats them
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout = self.dropout if self.training else 0.0

        def attend():
            if attention_mask is not None:
                # [b, 1, sq, L] (megatron-core's convention: True masks out) over this
                # rank's queries and every key in sequence order: --reset-attention-mask's
                # documents, causal within each.
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.scale
                )
            # Chunk c attends to chunks 0..c, causally within its own: a causal mask aligned
            # to the last key (lower right), which the fused kernels take without a mask.
            parts = []
            for half, c in enumerate((rank, 2 * cp - 1 - rank)):
                seen = (c + 1) * chunk
                parts.append(F.scaled_dot_product_attention(
                    q[:, :, half * chunk : (half + 1) * chunk], k[:, :, :seen], v[:, :, :seen],
                    attn_mask=causal_lower_right(chunk, seen), dropout_p=dropout,
                    scale=self.scale,
                ))  # fmt: skip
            return torch.cat(parts, dim=2)

        return _attend_and_merge_heads(attend, dropout, self.config)


__all__ = ["ContextParallelAttention", "SDPAttention", "use_sdpa"]
