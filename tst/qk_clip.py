"""The largest attention logit per head, and QK-clip (``--log-max-attention-logit``,
``--qk-clip``; Megatron-LM 0.16.1's flags and megatron-core's clip).

megatron-core records each head's largest pre-softmax logit only in Transformer Engine's
attention (TE >= 2.9 returns it). :func:`record_max_logits` records it for the local
spec's unfused attention too: a hook on the softmax reads its input (the scaled scores, with
megatron-core's causal or sliding-window mask applied as its softmax applies it) and keeps
the running maximum per head, in training forwards only (an evaluation's batches do not
decide a clip). The fused (SDPA) local attention never forms the scores, so these flags run
the unfused one (:func:`tst.attention.use_sdpa`).

After each step, :func:`after_step` takes every decoder layer's maximum over the
data-parallel replicas (as megatron-core's ``clip_qk`` does), logs the largest over all
layers and ranks (megatron-core's is the local stage's only, under pipeline parallelism),
and with ``--qk-clip`` calls megatron-core's ``clip_qk`` of the layer, which scales the
query and key rows of the head groups above the threshold, on the model weights and on the
fp32 main weights it finds as ``param.main_param``. Two defects of megatron-core 0.16.1 are
avoided here: under the distributed optimizer ``main_param`` is this rank's 1-D shard of the
main weight (or None where the rank holds none of it), which its clip reshapes as the whole
weight (wrong rows scaled, or an error); here the clip sees a whole fp32 weight holding the
shard, and the shard is written back from it. And Megatron-LM clips after a skipped step
too, with that step's logits, which may be infinite (eta 0: the query and key weights
zeroed); here a skipped step clips nothing.
Megatron-LM's log-only mode never resets the recorded maximum (it reports the largest logit
since the start); here each step reports its own.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

__all__ = ["after_step", "record_max_logits"]


def _decoder_attentions(model_chunks):
    for chunk in model_chunks:
        decoder = getattr(chunk, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            yield layer.self_attention


def record_max_logits(model_chunks) -> int:
    """Hook the decoder layers' local core attentions (TE's records by itself); returns
    how many were hooked."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tst.attention import SDPAttention

    hooked = 0
    for attention in _decoder_attentions(model_chunks):
        core = attention.core_attention
        if not isinstance(core, DotProductAttention):
            continue  # Transformer Engine's: it returns the logits itself
        if isinstance(core, SDPAttention):
            raise RuntimeError("the fused (SDPA) attention forms no scores to take the "
                               "maximum of: --qk-clip / --log-max-attention-logit run the "
                               "unfused one")  # fmt: skip
        core.current_max_attn_logits = None
        core.scale_mask_softmax.register_forward_pre_hook(functools.partial(_record, core))
        hooked += 1
    return hooked


def _record(core, softmax, args) -> None:
    """The softmax's input is ``[b, heads, sq, sk]`` scores, times ``softmax.scale`` where
    it has one (query-key layer scaling); masked positions do not count."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import (
        get_default_causal_mask,
        get_sliding_window_causal_mask,
    )

    if not core.training:
        return
    scores, mask = args[0], args[1] if len(args) > 1 else None
    with torch.no_grad():
        logits = scores.float()
        if softmax.scale is not None:
            logits = logits * softmax.scale
        sq, sk = logits.size(2), logits.size(3)
        if softmax.window_size is not None:
            mask = get_sliding_window_causal_mask(sq, sk, softmax.window_size)
        elif softmax.attn_mask_type == AttnMaskType.causal and mask is None and sq > 1:
            mask = get_default_causal_mask(sq)
        if mask is not None:
            logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
        per_head = logits.amax(dim=(0, 2, 3))
        seen = core.current_max_attn_logits
        core.current_max_attn_logits = per_head if seen is None else torch.maximum(seen, per_head)


def _clipped_weights(attention) -> list[torch.nn.Parameter]:
    """The weights megatron-core's ``clip_qk`` scales: the QKV projection's, or MLA's query
    (up-)projection and key-value up-projection."""
    if hasattr(attention, "linear_qkv"):
        return [attention.linear_qkv.weight]
    query = getattr(attention, "linear_q_up_proj", None) or attention.linear_q_proj
    return [query.weight, attention.linear_kv_up_proj.weight]


def _param_range(optimizer, param) -> tuple[int, int]:
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if param in getattr(part, "model_param_gbuf_map", {}):
            span = part._get_model_param_range_map(param)["param"]
            return span.start, span.end
    raise RuntimeError("--qk-clip: a sharded main weight the distributed optimizer does not map")


@contextlib.contextmanager
def _whole_main_params(optimizer, weights):
    """Under the distributed optimizer: each weight's ``main_param`` a whole fp32 copy of
    the weight holding this rank's shard, for megatron-core's clip; the shard written back
    after it (none where this rank holds none: the model weight alone is clipped, and the
    owner's clipped shard reaches it with the next gather)."""
    swapped = []
    for weight in weights:
        if not getattr(weight, "main_param_sharded", False):
            continue  # a whole fp32 copy (the plain mixed-precision optimizer) or none (fp32)
        shard = weight.main_param
        if shard is None:
            del weight.main_param
            swapped.append((weight, None, None))
            continue
        start, end = _param_range(optimizer, weight)
        whole = weight.detach().float()
        whole.view(-1)[start:end].copy_(shard)
        weight.main_param = whole
        swapped.append((weight, shard, (start, end)))
    try:
        yield
    finally:
        for weight, shard, span in swapped:
            if shard is not None:
                shard.copy_(weight.main_param.view(-1)[span[0] : span[1]])
            weight.main_param = shard


def after_step(model_chunks, optimizer, clip: bool, stepped: bool, device) -> float:
    """Collective (every rank, after every step): the step's largest attention logit over
    all decoder layers and ranks; with ``clip`` and a step that was applied, megatron-core's
    QK-clip of every layer whose maxima are finite. Each layer's record starts afresh. All
    layers' records travel in one reduction over the replicas (megatron-core's ``clip_qk``
    reduces them layer by layer) and the host reads the device twice a step."""
    from megatron.core import parallel_state

    attentions = list(_decoder_attentions(model_chunks))
    records = [getattr(attention.core_attention, "current_max_attn_logits", None)
               for attention in attentions]  # fmt: skip
    if any(logits is None for logits in records):
        raise RuntimeError(
            "--qk-clip / --log-max-attention-logit: a decoder layer recorded no attention "
            "logits this step (its core attention returns none)"
        )
    largest = torch.full((1,), float("-inf"), dtype=torch.float64, device=device)
    with torch.no_grad():
        if records:
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            reduced = torch.cat(records)
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
            largest = reduced.max().to(torch.float64).view(1)
            maxima = reduced.split([logits.numel() for logits in records])
            clipped = [False] * len(maxima)
            if clip and stepped:
                clipped = torch.stack([torch.isfinite(m).all() for m in maxima]).tolist()
            for attention, layer_maxima, clip_layer in zip(attentions, maxima, clipped,
                                                           strict=True):  # fmt: skip
                attention.core_attention.current_max_attn_logits = layer_maxima
                if clip_layer:
                    with _whole_main_params(optimizer, _clipped_weights(attention)):
                        attention.clip_qk()  # scales, and resets the record
                attention.core_attention.current_max_attn_logits = None
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)  # every stage's layers, TP rank's heads
    return largest.item()
