"""``--dry-run``: check a configuration, build its model on the meta device, print its layout.

The whole model is built once, at TP=1 / PP=1, inside ``torch.device("meta")``: parameters
get shapes but no storage, so a 10B MoE builds in about a second on a laptop. megatron-core
needs its parallel state for that, so the build runs in a single-process gloo world created
for the call (an in-memory store, no port, no environment variables) and torn down after it.
The built parameters are

1. counted (total, and active per token: experts count ``topk / num_experts`` of their size)
   and checked against the closed form of :func:`parameter_counts`;
2. laid out on the requested grid by megatron-core's rules: column/row-parallel linears and
   the vocab-parallel embedding/output are split over TP, norms and the router are
   replicated, decoder layers go to PP stages (VPP chunks round-robin), the word embedding
   to the first stage and the output layer and final norm to the last (with tied weights and
   PP > 1 the last stage holds its own copy of the embedding), and each expert lives whole
   on one EP rank, split over the expert-TP size (= TP);
3. turned into per-rank memory: model states exactly, activations roughly (see
   :func:`activation_bytes`).

Nothing reads data; a tokenizer is used only when one is given (else ``--vocab-size``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from tst.config import Config, ParallelConfig
from tst.optim import NO_OFFLOAD
from tst.plan import Grid, RunPlan, validate

__all__ = [
    "Grid",
    "ParamInfo",
    "parameter_counts",
    "meta_parameters",
    "built_counts",
    "per_rank_parameters",
    "activation_bytes",
    "dry_run",
    "dry_run_vocab_size",
]

_GIB = 2**30
_NVTE = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def parameter_counts(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Closed-form total and per-token-active parameters of megatron-core's GPT layers.

    ``vocab_size`` is the padded vocabulary. Used as a check on the meta-device build.
    """
    m = cfg.model
    h = m.hidden_size
    heads = m.num_attention_heads
    groups = m.query_groups
    head_dim = m.resolved_kv_channels
    bias = m.add_bias_linear
    norm = 2 * h if m.normalization == "LayerNorm" else h  # LayerNorm has a bias too
    if cfg.mla.multi_latent_attention:
        attn = _mla_attention(cfg, norm // h)
    else:
        # --attention-output-gate: the QKV projection also yields a gate per query channel.
        qkv_out = head_dim * (heads * (2 if m.attention_output_gate else 1) + 2 * groups)
        attn = (h * qkv_out + heads * head_dim * h + (h if bias else 0)
                + (qkv_out if m.add_qkv_bias else 0))  # fmt: skip
        if m.qk_layernorm and not m.qk_l2_norm:  # megatron-core's L2 norm has no weights
            attn += 2 * (norm // h) * head_dim
        if m.softmax_type == "learnable":  # one sink logit per head
            attn += heads
    glu = 2 if m.gated_mlp else 1

    def mlp(ffn: int, width: int = h) -> int:
        return (glu + 1) * width * ffn + ((glu * ffn + width) if bias else 0)

    if m.num_experts:
        # --moe-latent-size: routed experts run at the latent width, between a projection
        # down (h -> latent) and one back up (latent -> h) that every token passes.
        latent = m.moe_latent_size
        expert = mlp(m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size, latent or h)
        projections = (2 * h * latent + ((latent + h) if bias else 0)) if latent else 0
        shared_ffn = m.moe_shared_expert_intermediate_size
        shared = mlp(shared_ffn) + (h if cfg.moe.moe_shared_expert_gate else 0) if shared_ffn else 0
        router = (h + bias) * m.num_experts
        mlp_total = m.num_experts * expert + shared + router + projections
        mlp_active = m.moe_router_topk * expert + shared + router + projections
    else:
        mlp_total = mlp_active = mlp(m.resolved_ffn_hidden_size)
    embedding = vocab_size * h
    output = vocab_size * h if m.untie_embeddings_and_output_weights else 0
    if m.position_embedding_type == "learned_absolute":
        embedding += m.max_position_embeddings * h
    # --moe-layer-freq: some layers may be dense (DeepSeek-V3's first three).
    moe_layers = m.num_layers
    if m.num_experts:
        from tst.config_moe import moe_layers as pattern
        from tst.config_moe import parse_layer_freq

        freq = parse_layer_freq(cfg.moe.moe_layer_freq, m.num_layers)
        moe_layers = sum(pattern(freq, m.num_layers))
    dense_layers = m.num_layers - moe_layers
    dense_mlp = mlp(m.resolved_ffn_hidden_size)
    layers_total = (moe_layers * (attn + mlp_total + 2 * norm)
                    + dense_layers * (attn + dense_mlp + 2 * norm) + norm)  # fmt: skip
    layers_active = (moe_layers * (attn + mlp_active + 2 * norm)
                     + dense_layers * (attn + dense_mlp + 2 * norm) + norm)  # fmt: skip
    # --mtp-num-layers: each depth is eh_proj (2h -> h), three norms and a copy of the last
    # layer; kept out of the totals, as DeepSeek-V3 counts its 671B.
    last_moe = bool(m.num_experts) and (moe_layers == m.num_layers or bool(
        pattern(freq, m.num_layers)[-1]))  # fmt: skip
    last_layer = attn + (mlp_total if last_moe else dense_mlp) + 2 * norm
    last_active = attn + (mlp_active if last_moe else dense_mlp) + 2 * norm
    mtp = (cfg.mtp.mtp_num_layers or 0) * (2 * h * h + 3 * norm + last_layer)
    mtp_active = (cfg.mtp.mtp_num_layers or 0) * (2 * h * h + 3 * norm + last_active)
    return {
        "total": layers_total + embedding + output,
        "active": layers_active + embedding + output,
        "embedding_and_output": embedding + output,
        "non_embedding_active": layers_active,
        "mtp": mtp,
        "mtp_active": mtp_active,
    }


def _mla_attention(cfg: Config, norm_params: int) -> int:
    """Parameters of one multi-latent attention (megatron-core's ``MLASelfAttention``).

    Queries: ``h -> q_lora_rank -> heads x (qk + pos)`` (or ``h -> heads x (qk + pos)``
    without ``--q-lora-rank``); keys and values: ``h -> kv_lora_rank + pos`` (the shared
    latent and the single rotated key part), then ``kv_lora_rank -> heads x (qk + v)``;
    output ``heads x v -> h``. With ``--qk-layernorm`` the two latents are normalised
    (``norm_params`` per element: 2 for LayerNorm, 1 for RMSNorm). Only the output
    projection has a bias.
    """
    m, a = cfg.model, cfg.mla
    h, heads = m.hidden_size, m.num_attention_heads
    q_head = a.qk_head_dim + a.qk_pos_emb_head_dim
    if a.q_lora_rank is None:
        query = h * heads * q_head
    else:
        query = h * a.q_lora_rank + a.q_lora_rank * heads * q_head
        query += norm_params * a.q_lora_rank if m.qk_layernorm else 0
    key_value = h * (a.kv_lora_rank + a.qk_pos_emb_head_dim)
    key_value += a.kv_lora_rank * heads * (a.qk_head_dim + a.v_head_dim)
    key_value += norm_params * a.kv_lora_rank if m.qk_layernorm else 0
    output = heads * a.v_head_dim * h + (h if m.add_bias_linear else 0)
    return query + key_value + output


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the TP=1 / PP=1 model, and how the parallel layout splits it."""

    name: str
    numel: int
    tp_dim: int | None  # dimension split over TP (None: replicated over TP)
    tp_size: int  # its size along tp_dim (0 when replicated)
    layer: int | None  # decoder layer index, None outside the decoder layers
    expert: bool  # a routed expert's weight (split over EP, and over expert-TP)


def meta_parameters(cfg: Config, vocab_size: int) -> list[ParamInfo]:
    """Build the full model (TP=1, PP=1) on the meta device and describe its parameters.

    ``vocab_size`` is the padded vocabulary of the requested layout. Runs in a private
    single-process gloo world and leaves no process group or parallel state behind.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_gpt
    from tst.platform import initialize, shutdown

    if dist.is_initialized():
        raise ValueError(
            "--dry-run builds its model in a process of its own: run it with `python "
            "pretrain_tst.py --dry-run ...`, not inside a distributed job"
        )
    m = cfg.model
    # One process, TP=PP=EP=1; FP8 needs Transformer Engine to configure and changes no
    # parameter, so the count uses the bf16 configuration and megatron-core's local spec
    # (the same parameters as the TE spec, whose linears carry the norms' weights).
    single = dataclasses.replace(
        cfg,
        # The same parameters, built where any machine can: no TE-only norm, no DeepEP.
        model=dataclasses.replace(m, apply_layernorm_1p=False, delay_wgrad_compute=False,
                                  moe_token_dispatcher_type=(
            "alltoall" if m.moe_token_dispatcher_type == "flex" else m.moe_token_dispatcher_type)),
        moe=dataclasses.replace(cfg.moe, moe_enable_deepep=False, moe_permute_fusion=False,
                                moe_router_fusion=False, overlap_moe_expert_parallel_comm=False,
                                moe_shared_expert_overlap=False, moe_router_padding_for_fp8=False),
        parallel=ParallelConfig(),
        training=dataclasses.replace(
            cfg.training, fp8_format=None, fp8_param_gather=False, global_batch_size=None,
            rampup_batch_size=None, use_precision_aware_optimizer=False, **NO_OFFLOAD,
            main_grads_dtype="fp32",
            main_params_dtype="fp32", exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32",
        ),
    )  # fmt: skip
    # An in-memory store: no port, no RANK/WORLD_SIZE in the environment, gone with the group.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    layout = None
    try:
        layout = initialize(tp=1, pp=1, seed=cfg.training.seed)
        plan = validate(single, 1, vocab_size)
        config = transformer_config(single, plan, layout, check_device=False)
        # Shapes only: no init kernels, and no allocation on an explicit CUDA device.
        config.use_cpu_initialization = True
        config.perform_initialization = False
        shape = ModelShape.from_config(m, vocab_size, False)
        # megatron-core records the attention backend in NVTE_* variables and refuses a
        # different one later in the process: the count leaves the environment as it was.
        saved = {k: os.environ.pop(k) for k in _NVTE if k in os.environ}
        try:
            with torch.device("meta"):
                model = build_gpt(config, shape)
        except AssertionError as error:  # megatron-core checks its arguments with asserts
            raise ValueError(f"megatron-core cannot build this model: {error}") from error
        finally:
            for key in _NVTE:
                os.environ.pop(key, None)
            os.environ.update(saved)
        # The dimension each tensor-parallel module splits its weight along.
        split = ((ColumnParallelLinear, 0), (RowParallelLinear, 1), (VocabParallelEmbedding, 0))
        infos = []
        for module_name, module in model.named_modules():
            for local, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{local}" if module_name else local
                dim = next((d for kind, d in split if isinstance(module, kind)), None)
                if local == "bias" and isinstance(module, RowParallelLinear):
                    dim = None  # a row-parallel bias is added after the all-reduce
                if local == "softmax_offset":
                    dim = 0  # a sink logit per head: split with the heads
                # The MTP block's layers are not decoder layers: it lives on the last stage.
                layer = None if name.startswith("mtp.") else _LAYER.search(name)
                infos.append(
                    ParamInfo(
                        name=name,
                        numel=param.numel(),
                        tp_dim=dim,
                        tp_size=param.shape[dim] if dim is not None else 0,
                        layer=int(layer.group(1)) if layer else None,
                        expert="experts" in name.split("."),
                    )
                )
        return infos
    finally:
        shutdown(layout)
        if dist.is_initialized():
            dist.destroy_process_group()


def built_counts(params: list[ParamInfo], cfg: Config) -> dict[str, int]:
    """Total and per-token-active parameters of the built model, with the main groups."""
    m = cfg.model
    mtp = sum(p.numel for p in params if p.name.startswith("mtp."))
    params = [p for p in params if not p.name.startswith("mtp.")]  # apart, as DeepSeek-V3
    total = sum(p.numel for p in params)
    experts = sum(p.numel for p in params if p.expert)
    # Each token runs topk of num_experts equally sized experts.
    active = total - experts + (experts * m.moe_router_topk // m.num_experts if experts else 0)
    return {
        "total": total,
        "active": active,
        "embedding": sum(p.numel for p in params if p.name.startswith("embedding.")),
        "output": sum(p.numel for p in params if p.name.startswith("output_layer.")),
        "experts": experts,
        "mtp": mtp,
    }


def _shard_check(p: ParamInfo, cfg: Config, tp: int) -> None:
    if p.tp_dim is None or p.tp_size % tp == 0:
        return
    m = cfg.model
    if ".linear_fc" in p.name:
        if "shared_experts" in p.name:
            flag, size = (
                "--moe-shared-expert-intermediate-size",
                m.moe_shared_expert_intermediate_size,
            )
        elif p.expert:
            flag, size = (
                "--moe-ffn-hidden-size",
                m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size,
            )
        else:
            flag, size = "--ffn-hidden-size", m.resolved_ffn_hidden_size
        raise ValueError(
            f"{flag} {size} is not divisible by --tensor-model-parallel-size {tp} "
            f"({p.name} is split over TP)"
        )
    raise ValueError(
        f"{p.name} has {p.tp_size} rows along its tensor-parallel dimension, "
        f"not divisible by --tensor-model-parallel-size {tp}"
    )


def per_rank_parameters(params: list[ParamInfo], cfg: Config, grid: Grid) -> list[dict]:
    """Parameters held by one rank of each PP stage (every TP / EP rank of a stage holds as many).

    Returns one dict per stage: ``layers`` (indices), ``dense`` (non-expert parameters per
    rank) and ``experts`` (routed-expert parameters per rank).
    """
    m = cfg.model
    for p in params:
        _shard_check(p, cfg, grid.tp)
    stages = [{"layers": [], "dense": 0, "experts": 0} for _ in range(grid.pp)]
    for layer in range(m.num_layers):
        stages[grid.stage_of_layer(layer, m.num_layers)]["layers"].append(layer)
    last = grid.pp - 1
    for p in params:
        split = grid.etp if p.expert else grid.tp
        local = p.numel // split if p.tp_dim is not None else p.numel
        if p.layer is not None:
            stage = grid.stage_of_layer(p.layer, m.num_layers)
        elif p.name.startswith("embedding."):
            stage = 0
            if p.name == "embedding.word_embeddings.weight" and grid.pp > 1:
                # Copies on later stages: a tied output layer's weight (the last stage), the
                # embedding the MTP block embeds with (its stage; where that is the last,
                # with tied weights the output layer uses it too:
                # megatron_fixes.drop_unused_mtp_output_weight).
                copies = {last} if not m.untie_embeddings_and_output_weights else set()
                copies |= {grid.mtp_stage} if cfg.mtp.mtp_num_layers else set()
                for copy in copies:
                    stages[copy]["dense"] += local
        elif p.name.startswith("mtp."):
            stage = grid.mtp_stage
        elif p.name.startswith("decoder.final_layernorm") and cfg.mtp.mtp_num_layers:
            # With MTP the final norm sits with the last decoder layer (megatron-core's
            # TransformerBlock.has_final_layernorm_in_this_stage), before the MTP block.
            stage = grid.stage_of_layer(m.num_layers - 1, m.num_layers)
        else:  # output_layer, decoder.final_layernorm
            stage = last
        if p.expert:
            stages[stage]["experts"] += local // grid.ep
        else:
            stages[stage]["dense"] += local
    return stages


def activation_bytes(cfg: Config, tp: int, micro_batch: int, vocab_size: int) -> tuple[int, int]:
    """Rough activation memory of one micro-batch: (per decoder layer, output layer + loss).

    Counts the tensors each block keeps for its backward, with fused (flash) attention as
    Transformer Engine provides (no ``[s, s]`` scores), per ``seq_length x micro_batch``
    positions (a module under selective recomputation keeps its input only; full
    recomputation is not counted):

    - attention: norm input and QKV input (``2h``), then Q, K, V and the attention output
      (``2h + 2 kv``) split over TP; with MLA the latents (``q_lora + kv_lora + pos``, split
      like ``h``) and Q, K (``heads x (qk + pos)``), V and the output (``heads x v``);
    - dense MLP: norm input and FC1 input (``2h``), FC1 output (``2f`` with SwiGLU) and the
      activation output (``f``) split over TP;
    - MoE: norm input and router input (``2h``), ``topk`` routed copies of the token (``k h``;
      ``k latent`` plus the down-projection's output with ``--moe-latent-size``) and ``k``
      expert FC1 / activation outputs, split over expert-TP.

    With ``--sequence-parallel`` the ``h``-sized terms are split over TP too. Elements are
    2 bytes in bf16 (4 in fp32). The last stage adds its logits ``[L, b, V/tp]`` in the
    activation dtype plus the fp32 softmax the loss keeps for the backward (``vocab_size`` is
    the padded vocabulary).
    """
    m, p = cfg.model, cfg.parallel
    h, s = m.hidden_size, m.seq_length * micro_batch
    kv = m.resolved_kv_channels * m.query_groups
    glu = 2 if m.gated_mlp else 1
    sp = tp if p.sequence_parallel else 1
    size = 2 if cfg.training.bf16 or cfg.training.fp16 else 4
    redo = set()  # selectively recomputed modules: their outputs are not kept
    if p.recompute_granularity == "selective":
        redo = set(p.recompute_modules or ["core_attn"])
    norm_out = 0 if "layernorm" in redo else h / sp  # a norm's output, the next input
    attn = h / sp + norm_out + (2 * h + 2 * kv) / tp
    if cfg.mla.multi_latent_attention:  # latents, then Q and K (qk + pos), V and the output
        a = cfg.mla
        latents = (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_pos_emb_head_dim
        heads = m.num_attention_heads
        up = heads * (2 * (a.qk_head_dim + a.qk_pos_emb_head_dim) + a.v_head_dim)
        up = 0 if "mla_up_proj" in redo else up
        attn = h / sp + norm_out + latents / sp + (up + heads * a.v_head_dim) / tp
    if m.num_experts:
        f, k = m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size, m.moe_router_topk
        act = 0 if "moe_act" in redo else k * f
        # Each routed copy of a token enters its expert at the latent width where there is one
        # (whose down-projection's output is kept for the up-projection's backward too).
        width = m.moe_latent_size or h
        mlp = h / sp + norm_out + k * width / sp + (k * glu * f + act) / tp
        if m.moe_latent_size:
            mlp += m.moe_latent_size / sp
        shared = m.moe_shared_expert_intermediate_size
        if shared and "shared_experts" not in redo:
            mlp += (glu + 1) * shared / tp
        if "moe" in redo:
            mlp = h / sp
    else:
        mlp = h / sp + norm_out + (glu + 1) * m.resolved_ffn_hidden_size / tp
        if "mlp" in redo:
            mlp = h / sp
    layer = int(s * (attn + mlp) * size)
    logits = s * (vocab_size // tp) * (size + 4)
    return layer, logits


def offloaded_activation_bytes(cfg: Config, tp: int, micro_batch: int) -> int:
    """What ``--fine-grained-activation-offloading`` moves to host memory per decoder layer
    and micro-batch: the inputs its ``--offload-modules`` keep, in :func:`activation_bytes`'
    terms (attn_norm and mlp_norm their norm's input, qkv_linear the norm's output, core_attn
    Q, K and V, attn_proj the attention output; expert_fc1 the routed copies and moe_act the
    experts' FC1 output, with grouped-GEMM experts only, and neither under "moe"
    recomputation). A module's inputs below
    ``--min-offloaded-tensor-size`` elements (taken together: megatron-core asks it of each
    tensor) stay."""
    m, p = cfg.model, cfg.parallel
    if not p.fine_grained_activation_offloading:
        return 0
    modules = set(p.offload_modules)
    h, s = m.hidden_size, m.seq_length * micro_batch
    kv = m.resolved_kv_channels * m.query_groups
    sp = tp if p.sequence_parallel else 1
    size = 2 if cfg.training.bf16 or cfg.training.fp16 else 4
    redo = set(p.recompute_modules or ["core_attn"]) if p.recompute_granularity else set()
    norm_out = 0 if "layernorm" in redo else h / sp
    qkv, out = (h + 2 * kv) / tp, h / tp
    if cfg.mla.multi_latent_attention:
        a, heads = cfg.mla, m.num_attention_heads
        qkv = 0 if "mla_up_proj" in redo else heads * (2 * (a.qk_head_dim + a.qk_pos_emb_head_dim)
                                                        + a.v_head_dim) / tp  # fmt: skip
        out = heads * a.v_head_dim / tp
    parts = {"attn_norm": h / sp, "qkv_linear": norm_out, "core_attn": qkv, "attn_proj": out,
             "mlp_norm": h / sp}  # fmt: skip
    if m.num_experts and m.moe_grouped_gemm and "moe" not in redo:
        # (Under "moe" recomputation the experts keep nothing to offload.) The activation's
        # input stays whether "moe_act" is recomputed or not: megatron-core offloads it
        # either way, and a recomputation reloads it.
        f, k = m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size, m.moe_router_topk
        glu = 2 if m.gated_mlp else 1
        parts["expert_fc1"] = k * (m.moe_latent_size or h) / sp
        parts["moe_act"] = k * glu * f / tp
    kept = [width for name, width in parts.items()
            if name in modules and s * width >= p.min_offloaded_tensor_size]  # fmt: skip
    return int(s * sum(kept) * size)


def _in_flight(stage: int, grid: Grid, num_micro: int) -> float:
    """Micro-batches of this stage's layers alive at the 1F1B peak (chunks / vpp interleaved)."""
    if grid.pp == 1:
        return 1.0
    if not grid.vpp:
        return float(min(grid.pp - stage, num_micro))
    chunks = (grid.pp - stage - 1) * 2 + (grid.vpp - 1) * grid.pp + 1
    return min(chunks, num_micro * grid.vpp) / grid.vpp


def _layer_ranges(layers: list[int]) -> str:
    """``0-2,5``; a stage without decoder layers (only the embedding or the loss) is ``none``."""
    if not layers:
        return "none"
    ranges, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            ranges.append(f"{start}-{layer}" if layer != start else f"{layer}")
            start = None
    return ",".join(ranges)


def _default_world(cfg: Config) -> int:
    """The smallest world both grids fit: TP x PP x CP for the dense layers, expert-TP x EP x
    PP for the experts (megatron-core builds the expert grid for a dense model too)."""
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    ep = p.expert_model_parallel_size if cfg.model.num_experts else 1
    etp = (p.expert_tensor_parallel_size or tp) if cfg.model.num_experts else tp
    return math.lcm(tp * pp * p.context_parallel_size, etp * ep * pp)


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


def dry_run_vocab_size(cfg: Config) -> int:
    """The vocabulary the dry run sizes the model with, reading no tokenizer file.

    ``--vocab-size`` when given, else ``--padded-vocab-size`` (the model's size) when given;
    GPT-2 BPE's 50,257 for ``GPT2BPETokenizer`` (a fixed vocabulary); else an assumed 32,000
    entries (Llama-2's), printed so that nobody takes the counts for exact: pass
    ``--vocab-size`` for those.
    """
    d = cfg.data
    if d.vocab_size:
        return d.vocab_size
    if d.padded_vocab_size:  # the model's size as given: the counts are exact
        return d.padded_vocab_size
    if d.tokenizer_type == "GPT2BPETokenizer":
        return 50257
    if d.tokenizer_type == "ByteTokenizer":
        return 257
    print(
        f"vocabulary: not known without reading the tokenizer ({d.tokenizer_type}"
        f"{', ' + d.tokenizer_model if d.tokenizer_model else ''}); sized with an assumed "
        "32,000 entries: pass --vocab-size N for exact embedding counts"
    )
    return 32000


def dry_run(cfg: Config, vocab_size: int, world_size: int | None = None) -> int:
    """Check ``cfg`` for a world of ``world_size`` processes and print what it would build.

    ``world_size`` defaults to ``--dry-run-world-size``, else the smallest world that fits
    TP x PP (x EP). Raises ``ValueError`` naming the flag when the layout cannot work.
    """
    world = world_size or cfg.run.dry_run_world_size or _default_world(cfg)
    plan = validate(cfg, world, vocab_size)
    grid = plan.grid
    padded = plan.padded_vocab_size
    params = meta_parameters(cfg, padded)
    stages = per_rank_parameters(params, cfg, grid)
    _print_model(cfg, vocab_size, padded, params, grid)
    _print_architecture(cfg)
    memory = _print_layout(cfg, plan, stages)
    budget = _print_phases(cfg, plan)
    if cfg.run.dry_run_report:
        report = _report(cfg, plan, vocab_size, params, memory, budget)
        tmp = cfg.run.dry_run_report + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, cfg.run.dry_run_report)
        print(f"report written to {cfg.run.dry_run_report}")
    return 0


def _report(cfg: Config, plan: RunPlan, vocab_size: int, params: list[ParamInfo],
            memory: list[dict], budget: dict) -> dict:  # fmt: skip
    """The dry run's figures as data (``--dry-run-report``): what it prints, unrounded."""
    g = plan.grid
    # fmt: off
    return {
        "model": {
            "num_layers": cfg.model.num_layers,
            "hidden_size": cfg.model.hidden_size,
            "vocab_size": vocab_size,
            "padded_vocab_size": plan.padded_vocab_size,
            "parameters": built_counts(params, cfg),
            "analytic_parameters": parameter_counts(cfg, plan.padded_vocab_size),
        },
        "layout": {
            "world": g.world, "tp": g.tp, "pp": g.pp, "vpp": g.vpp, "cp": g.cp, "dp": g.dp,
            "ep": g.ep, "etp": g.etp, "expert_dp": g.expert_dp,
            "sequence_parallel": cfg.parallel.sequence_parallel,
            "global_batch_size": plan.global_batch_size,
            "num_microbatches": plan.num_microbatches,
            "micro_batch_size": cfg.training.micro_batch_size,
            "seq_length": cfg.model.seq_length,
        },
        "stages": memory,
        "train_iters": plan.train_iters,
        "phases": plan.schedule.to_dict(),
        "tokens": budget,
    }
    # fmt: on


def _print_architecture(cfg: Config) -> None:
    """What the flags resolve to, so that no default changes a model silently."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    positions = {"learned_absolute": "learned absolute", "none": "none"}.get(
        m.position_embedding_type,
        f"RoPE (base {m.rotary_base}, {m.rotary_percent:g} of each head"
        + (f", Llama-3 scaling x{m.rope_scaling_factor:g}" if m.use_rope_scaling else "")
        + (", interleaved pairs" if m.rotary_interleaved else "")
        + (
            f", none on {sum(m.no_rope_layers())} of {m.num_layers} layers"
            if m.no_rope_freq is not None
            else ""
        )
        + ")",
    )
    if cfg.data.reset_position_ids and m.position_embedding_type == "learned_absolute":
        positions += ", restarting at each document (--reset-position-ids)"
    biases = "on" if m.add_bias_linear else ("QKV only" if m.add_qkv_bias else "off")
    precision = (
        "bf16"
        if t.bf16
        else "fp16 (loss scaling: "
        + (f"static {t.loss_scale:g}" if t.loss_scale else "dynamic")
        + ")"
        if t.fp16
        else "fp32"
    )
    mlp = m.mlp_name
    if m.gated_mlp and m.glu_linear_offset:
        mlp += f" (linear offset {m.glu_linear_offset:g})"
    if m.gated_mlp and m.activation_func_clamp_value is not None:
        mlp += f" (inputs clamped at {m.activation_func_clamp_value:g})"
    attention = {"vanilla": "softmax", "off-by-one": "softmax off by one",
                 "learnable": "softmax with a learned sink per head"}[m.softmax_type]  # fmt: skip
    for flag, on in (("QK L2 norm", m.qk_l2_norm), ("output gate", m.attention_output_gate),
                     ("query-key layer scaling", m.apply_query_key_layer_scaling)):  # fmt: skip
        attention += f", {flag}" if on else ""
    if m.qk_clip:
        attention += (f", QK-clip at {m.qk_clip_threshold:g} (alpha {m.qk_clip_alpha:g}; "
                      "largest logit logged)")  # fmt: skip
    elif m.log_max_attention_logit:
        attention += ", largest logit logged"
    if m.window is not None:
        windowed = sum(m.windowed_layers())
        attention += (f", sliding window of {m.window[0]} on {windowed} of {m.num_layers} "
                      "layers (full attention on the others)")  # fmt: skip
    if cfg.data.reset_attention_mask:
        attention += ", within each document (--reset-attention-mask)"
    recompute = "none"
    if p.recompute_granularity == "full":
        recompute = f"full, {p.recompute_method}, {p.recompute_num_layers} layers"
    elif p.recompute_granularity == "selective":
        recompute = f"selective ({', '.join(p.recompute_modules or ['core_attn'])})"
    if p.fine_grained_activation_offloading:  # the layout's 'host' column counts them
        recompute += (f"; activations offloaded to host: {', '.join(p.offload_modules)} "
                      f"(tensors >= {p.min_offloaded_tensor_size:,} elements)")  # fmt: skip
    print(
        f"architecture: positions {positions}; {m.normalization} (eps {m.norm_epsilon:g}"
        f"{', 1p' if m.apply_layernorm_1p else ''}); biases {biases}; "
        f"attention {attention}; {mlp} MLP; embeddings "
        f"{'untied' if m.untie_embeddings_and_output_weights else 'tied'}; dropout hidden "
        f"{m.hidden_dropout:g} / attention {m.attention_dropout:g}; precision {precision}; "
        f"recompute {recompute}; overlap grad-reduce {'on' if p.overlap_grad_reduce else 'off'}"
        f" / param-gather {'on' if p.overlap_param_gather else 'off'}"
    )
    for flag, reason in cfg.accepted_flags:
        print(f"  accepted, no effect here: {flag}: {reason}")


def _print_model(cfg: Config, vocab_size: int, padded: int, params: list[ParamInfo],
                 grid: Grid) -> None:  # fmt: skip
    m, t = cfg.model, cfg.training
    built = built_counts(params, cfg)
    analytic = parameter_counts(cfg, padded)
    groups = m.query_groups
    mlp = f"FFN {m.resolved_ffn_hidden_size}"
    if m.num_experts:
        mlp = (
            f"MoE {m.num_experts} experts, top-{m.moe_router_topk}, expert FFN "
            f"{m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size}"
        )
        if m.moe_latent_size:
            mlp += f" at latent width {m.moe_latent_size}"
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    if t.fp8_format:
        precision += f" + FP8 ({t.fp8_format}, {t.fp8_recipe} recipe, Transformer Engine)"
    heads = f"{groups} query groups"
    if cfg.mla.multi_latent_attention:
        a = cfg.mla
        heads = (
            f"MLA: q rank {a.q_lora_rank or 'full'}, kv rank {a.kv_lora_rank}, head dims "
            f"{a.qk_head_dim} + {a.qk_pos_emb_head_dim} RoPE ({a.resolved_rope_type}), "
            f"values {a.v_head_dim}"
        )
    print(
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
        f"({heads}), {mlp}, vocabulary {vocab_size} (padded to {padded} for "
        f"TP={cfg.parallel.tensor_model_parallel_size}); {precision}"
    )
    print(
        f"parameters (built on the meta device): total {_m(built['total'])}, "
        f"active per token {_m(built['active'])}"
    )
    print(
        f"  word embedding {_m(built['embedding'])}, output layer {_m(built['output'])}"
        + (f", routed experts {_m(built['experts'])}" if m.num_experts else "")
    )
    if built["mtp"]:
        depths = cfg.mtp.mtp_num_layers
        where = "the last stage" if grid.mtp_stage == grid.pp - 1 else f"stage {grid.mtp_stage}"
        print(f"  MTP block ({depths} depth{'s' * (depths > 1)}, on {where}; not in the "
              f"totals, as DeepSeek-V3 counts): {_m(built['mtp'])}")  # fmt: skip
    keys = ("total", "active", "mtp")
    same = [analytic[k] for k in keys] == [built[k] for k in keys]
    print(
        f"  analytic count: total {_m(analytic['total'])}, active {_m(analytic['active'])} "
        + ("(agrees)" if same else "(DIFFERS from the built model: tst/dry_run.py is out of date)")
    )
    if t.fp8_format or m.transformer_impl != "local":
        print(
            "  counted with megatron-core's local layer spec; the Transformer Engine spec has "
            "the same parameters and FP8 adds none"
        )


def _print_layout(cfg: Config, plan: RunPlan, stages: list[dict]) -> list[dict]:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    grid = plan.grid
    num_micro, gbs = plan.num_microbatches, plan.trained_batch_size
    decreased = (f" (decreased from {plan.global_batch_size} by --decrease-batch-size-if-needed)"
                 if gbs != plan.global_batch_size else "")  # fmt: skip
    vpp = f" VPP={grid.vpp}" if grid.vpp else ""
    expert = f" EP={grid.ep} ETP={grid.etp} expert-DP={grid.expert_dp}" if m.num_experts else ""
    cp = f" CP={grid.cp}" if grid.cp > 1 else ""
    print(
        f"layout for a world of {grid.world}: TP={grid.tp} PP={grid.pp}{vpp}{cp} DP={grid.dp}"
        f"{expert}{' +SP' if p.sequence_parallel else ''}"
        f"{' (FSDP2 over DP x CP)' if p.use_torch_fsdp2 else ''}; global batch {gbs}{decreased} = "
        f"{num_micro} micro-batches x {t.micro_batch_size} x DP {grid.dp} "
        f"({gbs * m.seq_length / 1e6:,.2f}M positions per step)"
    )
    weight_b = 2 if t.bf16 or t.fp16 else 4
    fsdp = p.use_torch_fsdp2  # ZeRO-3: weights, gradients and Adam sharded over DP x CP
    # DDP reduces gradients in an fp32 buffer; FSDP2 keeps them in the weights' dtype.
    grad_b = weight_b if fsdp else 4
    optim_b = 12 if t.bf16 or t.fp16 else 8  # Adam m, v (+ fp32 main weights under bf16)
    dist_opt = p.use_distributed_optimizer
    layer_act, logits_act = activation_bytes(
        cfg, grid.tp, t.micro_batch_size, plan.padded_vocab_size
    )
    depths, mtp_stage = cfg.mtp.mtp_num_layers or 0, grid.mtp_stage
    copies = p.num_distributed_optimizer_instances
    sharded = f" (Adam sharded over DP x CP{f', {copies} copies' if copies > 1 else ''})"
    # --optimizer-cpu-offload: the offloaded share's fp32 weights, Adam moments and a gradient
    # copy (16 B) live in host memory; the rest of the state stays on the GPU.
    offload = t.optimizer_offload_fraction if t.optimizer_cpu_offload else 0.0
    # --fine-grained-activation-offloading: per layer and micro-batch in flight, this much
    # goes to host memory; megatron-core keeps one layer's groups of each module on the GPU.
    moved = offloaded_activation_bytes(cfg, grid.tp, t.micro_batch_size)
    host_column = offload or moved
    # --reset-attention-mask: each micro-batch in flight keeps its [b, 1, L / CP, L] boolean
    # document mask (one tensor every layer of the stage shares) for the backward.
    mask_b = (t.micro_batch_size * m.seq_length // grid.cp * m.seq_length
              if cfg.data.reset_attention_mask else 0)  # fmt: skip
    print(
        "per rank (every TP/EP rank of a stage holds as much); memory in GiB: weights "
        f"{weight_b} B, grads {grad_b} B, Adam {optim_b} B per parameter"
        + (sharded if dist_opt else "")
        + (
            " (all three sharded over DP x CP by FSDP2; the layers being gathered, one or two "
            "at a time, not counted)"
            if fsdp
            else ""
        )
        + (
            f"; --optimizer-cpu-offload: {offload:.0%} of Adam's state in host memory (16 B "
            "per parameter with the gradient's copy: column 'host'), the rest on the GPU"
            if t.optimizer_cpu_offload
            else ""
        )
        + (
            f"; --fine-grained-activation-offloading: {moved / _GIB:.2f} GiB per layer and "
            "micro-batch in flight to host memory (column 'host'; one layer's kept)"
            if moved
            else ""
        )
        + (
            f"; --reset-attention-mask: {mask_b / _GIB:.2f} GiB of document mask per "
            "micro-batch in flight"
            if mask_b
            else ""
        )
        + ("; FP8 weight casts not counted" if t.fp8_format else "")
        + "; activations rough (1F1B peak, fused attention, selective recompute counted, full "
        "recompute not)"
    )
    print(
        f"  {'stage':>5} {'layers':>15} {'params':>10} {'weights':>8} {'grads':>7} "
        f"{'Adam':>7} {'activ.':>7} {'total':>7}" + (f" {'host':>7}" if host_column else "")
    )
    rows = []
    for stage, info in enumerate(stages):
        n = info["dense"] + info["experts"]
        optim = optim_b * n
        if dist_opt:  # sharded over DP x CP (experts: expert-DP), per optimizer copy
            optim = optim_b * copies * (info["dense"] / (grid.dp * grid.cp)
                                        + info["experts"] / grid.expert_dp)  # fmt: skip
        host = optim * offload * 16 / optim_b
        optim *= 1 - offload
        in_flight = _in_flight(stage, grid, num_micro)
        held = in_flight * len(info["layers"])
        act = held * layer_act
        host_act = max(held - 1, 0) * moved
        act -= host_act
        # The MTP block's depths keep a layer's activations each on their stage, and the
        # last stage a logits tensor per depth besides the main one.
        act += in_flight * depths * layer_act if stage == mtp_stage else 0
        act += logits_act * (1 + depths) if stage == grid.pp - 1 else 0
        act += in_flight * mask_b if info["layers"] else 0
        cols = [weight_b * n, grad_b * n, optim, act]
        if fsdp:
            cols[:3] = [c / (grid.dp * grid.cp) for c in cols[:3]]
        layers = _layer_ranges(info["layers"]) + (" +MTP" if stage == mtp_stage else "")
        print(
            f"  {stage:>5} {layers:>15} {_m(n):>10} "
            + " ".join(f"{c / _GIB:>7.1f}" for c in cols)
            + f" {sum(cols) / _GIB:>7.1f}"
            + (f" {(host + host_act) / _GIB:>7.1f}" if host_column else "")
        )
        rows.append({"stage": stage, "layers": list(info["layers"]), "parameters": n,
                     "bytes": dict(zip(("weights", "grads", "optimizer", "activations"),
                                       cols, strict=True)) | {"total": sum(cols),
                                                              "host_optimizer": host,
                                                              "host_activations": host_act}})  # fmt: skip
    largest_bag = max(phase.input_bag for phase in plan.schedule.phases)  # any stage's
    if largest_bag > 1:
        bag_tokens = largest_bag * m.seq_length * t.micro_batch_size
        print(
            f"  superposition phase: stage 0 also holds a transient bag lookup of {bag_tokens:,} "
            f"tokens ({bag_tokens * m.hidden_size * (weight_b + 4) / _GIB:.1f} GiB, fp32 sum)"
        )
    return rows


def _print_phases(cfg: Config, plan: RunPlan) -> dict:
    seq = cfg.model.seq_length
    print("phase schedule:\n" + plan.schedule.table())
    # A row of any phase consumes units of seq + 1 tokens from the one data stream.
    raw = [plan.samples_between(ph.start, ph.end) * ph.units_per_row * (seq + 1)
           for ph in plan.schedule.phases]  # fmt: skip
    positions = plan.samples_before(plan.train_iters) * seq
    print(
        "raw tokens read: "
        + ", ".join(
            f"{ph.name} {n / 1e9:,.1f}B" for ph, n in zip(plan.schedule.phases, raw, strict=True)
        )
        + f"; total {sum(raw) / 1e9:,.1f}B for {positions / 1e9:,.1f}B positions"
        + f" in {plan.train_iters:,} steps"
        + (f" (batch ramp-up {plan.rampup[0]} -> {plan.global_batch_size})" if plan.rampup else "")
        + (
            " (--step-batch-size-schedule: "
            + ", ".join(
                f"{batch} from sample {threshold:,}" for threshold, batch in plan.step_schedule
            )
            + ")"
            if plan.step_schedule
            else ""
        )  # fmt: skip
    )
    return {"raw_tokens_per_phase": raw, "raw_tokens": sum(raw), "positions": positions}
