"""megatron-core GPT -> ``transformers`` class, ``config.json`` and weights (hub names)."""

from __future__ import annotations

import torch

from tst.config import Config
from tst.export.common import (
    DTYPES,
    LLAMA,
    MIXTRAL,
    MODEL_TYPES,
    QWEN3,
    QWEN3_MOE,
    ExportError,
)
from tst.export.loading import LoadedCheckpoint


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise ExportError(f"cannot export to Hugging Face: {message}")


def hf_architecture(cfg: Config, config) -> str:
    """The ``transformers`` class for this model; :class:`ExportError` if none fits.

    ``config`` is the model's megatron-core ``TransformerConfig`` (for settings that have
    no flag here but change the forward).
    """
    m = cfg.model
    _refuse(
        cfg.mup.use_mup,
        "--use-mup: the targets have no embedding or logit multiplier and scale attention "
        "by 1 / sqrt(head dim), not muP's 1 / head dim",
    )
    _refuse(
        m.position_embedding_type != "rope",
        f"--position-embedding-type {m.position_embedding_type}: the targets use RoPE",
    )
    _refuse(m.normalization != "RMSNorm", f"--normalization {m.normalization}: need RMSNorm")
    moe = getattr(cfg, "moe", None)
    _refuse(
        bool(m.num_experts) and moe is not None and str(moe.moe_layer_freq).strip() != "1",
        f"--moe-layer-freq {getattr(moe, 'moe_layer_freq', '')}: the targets make every layer MoE",
    )
    _refuse(
        bool(m.num_experts) and moe is not None and (
            moe.moe_router_score_function != "softmax" or moe.moe_router_enable_expert_bias
            or moe.moe_router_num_groups is not None or moe.moe_router_topk_scaling_factor
        ),
        "sigmoid / grouped / biased / scaled routing: the targets route by softmax top-k",
    )  # fmt: skip
    _refuse(
        m.add_bias_linear or m.add_qkv_bias,
        "linear biases (Megatron-LM's default; train with --disable-bias-linear): the targets "
        "have none",
    )
    _refuse(not m.swiglu, "a GELU MLP: the targets need a gated SiLU MLP (--swiglu)")
    for name, ok in (
        ("rotary_interleaved", not config.rotary_interleaved),
        ("rotary_percent", getattr(config, "rotary_percent", 1.0) == 1.0),
        (
            "apply_residual_connection_post_layernorm",
            not config.apply_residual_connection_post_layernorm,
        ),
        ("softmax_scale", config.softmax_scale is None),
        ("qk_l2_norm", not config.qk_l2_norm),
        ("attention_output_gate", not getattr(config, "attention_output_gate", False)),
        ("multi_latent_attention", not config.multi_latent_attention),
        ("glu_linear_offset", config.glu_linear_offset == 0.0),
        ("activation_func_clamp_value", config.activation_func_clamp_value is None),
        ("softmax_type", config.softmax_type == "vanilla"),
        ("no_rope_freq", not config.no_rope_freq),
        ("window_size", config.window_size is None),
    ):
        _refuse(not ok, f"megatron-core's {name}={getattr(config, name, None)!r}")
    if not m.num_experts:
        return QWEN3 if m.qk_layernorm else LLAMA
    _refuse(
        bool(m.moe_shared_expert_intermediate_size),
        "--moe-shared-expert-intermediate-size: Qwen3-MoE and Mixtral have no shared experts",
    )
    for name, ok in (
        ("moe_router_score_function", config.moe_router_score_function == "softmax"),
        ("moe_router_topk_scaling_factor", config.moe_router_topk_scaling_factor in (None, 1.0)),
        ("moe_router_num_groups", not config.moe_router_num_groups),
        ("moe_router_enable_expert_bias", not config.moe_router_enable_expert_bias),
        ("moe_expert_capacity_factor", config.moe_expert_capacity_factor is None),
        ("moe_input_jitter_eps", not config.moe_input_jitter_eps),
        ("moe_layer_freq", config.moe_layer_freq == 1),
        ("moe_router_load_balancing_type", config.moe_router_load_balancing_type != "sinkhorn"),
        ("moe_latent_size", config.moe_latent_size is None),
    ):
        _refuse(not ok, f"megatron-core's {name}={getattr(config, name)!r} (routing differs)")
    if m.qk_layernorm:
        return QWEN3_MOE
    # Mixtral renormalises over the top-k, which is megatron-core's default only.
    _refuse(
        config.moe_router_pre_softmax,
        "moe_router_pre_softmax without --qk-layernorm (Mixtral always renormalises; "
        "Qwen3-MoE, which does not have to, needs --qk-layernorm)",
    )
    return MIXTRAL


def hf_config(
    ckpt: LoadedCheckpoint,
    architecture: str,
    vocab_size: int,
    dtype: torch.dtype,
    eos_token_id: int | None,
    bos_token_id: int | None = None,
) -> dict:
    """``config.json`` for ``architecture``; RoPE written both ways (v4 and v5 readers)."""
    m, c = ckpt.cfg.model, ckpt.transformer_config
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    out = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.resolved_ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.query_groups,
        "head_dim": c.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": c.layernorm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if architecture == LLAMA:
        out.update(mlp_bias=False, pretraining_tp=1)
    if architecture in (QWEN3, QWEN3_MOE):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    if architecture == QWEN3_MOE:
        out.update(
            num_experts=m.num_experts,
            num_experts_per_tok=m.moe_router_topk,
            moe_intermediate_size=c.moe_ffn_hidden_size,
            norm_topk_prob=not c.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            router_aux_loss_coef=m.moe_aux_loss_coeff,
        )
    if architecture == MIXTRAL:
        out.update(
            intermediate_size=c.moe_ffn_hidden_size,
            num_local_experts=m.num_experts,
            num_experts_per_tok=m.moe_router_topk,
            router_jitter_noise=0.0,
            sliding_window=None,
            output_router_logits=False,
            router_aux_loss_coef=m.moe_aux_loss_coeff,
        )
    return out


# ---------------------------------------------------------------- weights


def split_qkv(weight: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron-core ``linear_qkv.weight`` -> (q ``[np * hn, h]``, k, v ``[ng * hn, h]``).

    Rows come per query group: its ``np/ng`` query heads, one key head, one value head.
    Query head ``g * np/ng + j`` uses key/value head ``g``, as ``transformers``' GQA does.
    """
    per_group = heads // groups
    w = weight.view(groups, per_group + 2, head_dim, -1)  # [ng, np/ng + 2, hn, h]
    q = w[:, :per_group].reshape(heads * head_dim, -1)
    k = w[:, per_group].reshape(groups * head_dim, -1)
    v = w[:, per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


def split_gate_up(weight: torch.Tensor):
    """megatron-core SwiGLU ``linear_fc1.weight [2 * ffn, h]`` -> (gate, up), each ``[ffn, h]``."""
    gate, up = torch.chunk(weight, 2, dim=0)
    return gate, up


def _moe_weights(mlp, prefix: str, architecture: str) -> dict:
    from megatron.core.transformer.moe.experts import SequentialMLP

    if not isinstance(mlp.experts, SequentialMLP):
        raise ExportError(f"expected SequentialMLP experts, got {type(mlp.experts).__name__}")
    if architecture == MIXTRAL:
        block, names = "block_sparse_moe", ("w1", "w3", "w2")
    else:
        block, names = "mlp", ("gate_proj", "up_proj", "down_proj")
    out = {f"{prefix}{block}.gate.weight": mlp.router.weight}
    for e, expert in enumerate(mlp.experts.local_experts):
        gate, up = split_gate_up(expert.linear_fc1.weight)
        base = f"{prefix}{block}.experts.{e}."
        out[base + names[0] + ".weight"] = gate
        out[base + names[1] + ".weight"] = up
        out[base + names[2] + ".weight"] = expert.linear_fc2.weight
    return out


def hf_tensors(ckpt: LoadedCheckpoint, architecture: str, vocab_size: int) -> dict:
    """The ``transformers`` weights under hub key names, as views of the model's parameters.

    Nothing is copied (but the norms' weights plus one under ``--apply-layernorm-1p``):
    :func:`tst.export.writer.write_safetensors` converts one shard at a time, so an export
    holds the model plus at most one shard. Experts use the per-expert hub names, which
    ``transformers`` >= 5 fuses on load.
    """
    model, m = ckpt.model, ckpt.cfg.model
    heads = m.num_attention_heads
    groups = m.query_groups
    head_dim = ckpt.transformer_config.kv_channels
    out = {"model.embed_tokens.weight": model.embedding.word_embeddings.weight[:vocab_size]}
    zero_centred = ckpt.transformer_config.layernorm_zero_centered_gamma

    def norm(module):
        # --apply-layernorm-1p: the norms scale by 1 + weight; the targets' by their weight.
        return module.weight.detach().float() + 1 if zero_centred else module.weight

    for i, layer in enumerate(model.decoder.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attention
        q, k, v = split_qkv(attn.linear_qkv.weight, heads, groups, head_dim)
        out[p + "input_layernorm.weight"] = norm(layer.input_layernorm)
        out[p + "self_attn.q_proj.weight"] = q
        out[p + "self_attn.k_proj.weight"] = k
        out[p + "self_attn.v_proj.weight"] = v
        out[p + "self_attn.o_proj.weight"] = attn.linear_proj.weight
        if m.qk_layernorm:
            out[p + "self_attn.q_norm.weight"] = norm(attn.q_layernorm)
            out[p + "self_attn.k_norm.weight"] = norm(attn.k_layernorm)
        out[p + "post_attention_layernorm.weight"] = norm(layer.pre_mlp_layernorm)
        if m.num_experts:
            out.update(_moe_weights(layer.mlp, p, architecture))
        else:
            gate, up = split_gate_up(layer.mlp.linear_fc1.weight)
            out[p + "mlp.gate_proj.weight"] = gate
            out[p + "mlp.up_proj.weight"] = up
            out[p + "mlp.down_proj.weight"] = layer.mlp.linear_fc2.weight
    out["model.norm.weight"] = norm(model.decoder.final_layernorm)
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = model.output_layer.weight[:vocab_size]
    return {name: tensor.detach() for name, tensor in out.items()}


def materialise(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU copy in ``dtype`` with its own storage (safetensors refuses tensors
    that share one, and q/k/v are views of one)."""
    return tensor.to("cpu", dtype).clone(memory_format=torch.contiguous_format)


def hf_state_dict(
    ckpt: LoadedCheckpoint, architecture: str, vocab_size: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """All of :func:`hf_tensors` copied to CPU in ``dtype`` at once (small models, tests)."""
    views = hf_tensors(ckpt, architecture, vocab_size)
    return {name: materialise(tensor, dtype) for name, tensor in views.items()}
