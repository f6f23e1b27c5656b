"""A plain context-parallel attention for CPU tests: the reference the trainer's CP wiring
is checked against.

megatron-core runs context-parallel attention only through Transformer Engine, which needs a
GPU. This module stands in for it on CPU, written from the definition: every CP rank
all-gathers the keys and values of the whole sequence and attends from its own queries
under the causal mask of *global* positions (a rank holds chunks ``r`` and ``2 CP - 1 - r``
of the load-balanced split). Its backward sums each key / value gradient over the ranks
whose queries used it. The trainer's side (the batch split, position ids, loss tokens and
gradients summed over DP x CP, RoPE slices) is what the tests check with it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tst.data.context_parallel import kept_positions


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 in group-rank order; backward: summed over ranks, own slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        n = grad.shape[0] // ctx.group.size()
        rank = ctx.group.rank()
        return grad[rank * n : (rank + 1) * n], None


class GatheredContextParallelAttention(torch.nn.Module):
    """Core attention with megatron-core's ``DotProductAttention`` signature, any CP size.

    Causal, no dropout, softmax in fp32; grouped-query heads repeated to the query heads.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):  # fmt: skip
        super().__init__()
        from megatron.core import parallel_state as ps

        assert not config.attention_dropout and not attention_dropout, "no dropout here"
        self.group = ps.get_context_parallel_group()
        tp = ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.scale = softmax_scale or 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):  # fmt: skip
        assert attention_bias is None and packed_seq_params is None
        cp, rank = self.group.size(), self.group.rank()
        sq, b = query.shape[:2]
        length = sq * cp
        key = _GatherSequence.apply(key, self.group)
        value = _GatherSequence.apply(value, self.group)
        q_pos = kept_positions(length, cp, rank)
        k_pos = torch.cat([kept_positions(length, cp, r) for r in range(cp)])
        repeat = self.heads // self.groups
        key = key.repeat_interleave(repeat, dim=2)
        value = value.repeat_interleave(repeat, dim=2)
        scores = torch.einsum("sbhd,tbhd->bhst", query.float(), key.float()) * self.scale
        future = (k_pos[None, :] > q_pos[:, None]).to(scores.device)
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = torch.einsum("bhst,tbhd->sbhd", probs, value.float()).to(query.dtype)
        return out.reshape(sq, b, -1)
