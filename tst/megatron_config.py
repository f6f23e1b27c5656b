"""The megatron-core ``TransformerConfig`` a run's flags describe, for the device it runs on.

One place decides what the flags mean to megatron-core: the layer implementation (Transformer
Engine where importable, the local spec elsewhere), fused kernels only on CUDA, per-token
loss normalisation, FP8 only where it can run. The trainer, the dry run, the exporter and the
tests' plain loop all build their models from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tst.config import Config
from tst.model import transformer_engine_available
from tst.platform import Layout

__all__ = ["transformer_config", "use_transformer_engine"]


def transformer_config(cfg: Config, derived: dict, layout: Layout):
    """megatron-core TransformerConfig for this run and device."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p, t = cfg.model, cfg.parallel, cfg.training
    on_gpu = layout.device.type == "cuda"
    ffn = m.resolved_ffn_hidden_size
    moe = {}
    if m.num_experts:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or ffn,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff else "none",
            # The TE spec builds grouped-GEMM experts, the local spec sequential ones.
            moe_grouped_gemm=use_transformer_engine(cfg, layout),
            moe_permute_fusion=False,
        )
    fp8 = {}
    if t.fp8_format:
        _check_fp8_possible(cfg, layout)
        fp8 = dict(fp8=t.fp8_format, fp8_recipe=t.fp8_recipe)
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=ffn,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        normalization=m.normalization,
        add_bias_linear=m.add_bias_linear,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=derived["vpp"],
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=t.bf16,
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        # Fused kernels exist only on CUDA.
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=False,
        **moe,
        **fp8,
    )


def _check_fp8_possible(cfg: Config, layout: Layout) -> None:
    """FP8 runs through Transformer Engine on Hopper (sm_89/90) or Blackwell GPUs only."""
    if layout.device.type != "cuda":
        raise ValueError("--fp8-format needs a CUDA GPU (Hopper or Blackwell); this run is on "
                         f"{layout.device.type}: drop --fp8-format")  # fmt: skip
    if not use_transformer_engine(cfg, layout):
        raise ValueError("--fp8-format needs Transformer Engine, which is not importable here: "
                         "install transformer-engine or drop --fp8-format")  # fmt: skip
    major, minor = torch.cuda.get_device_capability(layout.device)
    if (major, minor) < (8, 9):
        raise ValueError(f"--fp8-format needs an FP8-capable GPU (sm_89 or newer); this one is "
                         f"sm_{major}{minor}: drop --fp8-format")  # fmt: skip


def use_transformer_engine(cfg: Config, layout: Layout) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "local":
        return False
    if impl == "transformer_engine":
        return True
    return layout.device.type == "cuda" and transformer_engine_available()
