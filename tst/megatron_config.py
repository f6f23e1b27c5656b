"""The megatron-core ``TransformerConfig`` a run's flags describe, for the device it runs on.

One place decides what the flags mean to megatron-core: the layer implementation (Transformer
Engine where importable, the local spec elsewhere), fused kernels only on CUDA, per-token
loss normalisation, FP8 only where it can run. The trainer, the dry run, the exporter and the
tests' plain loop all build their models from it.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from tst.attention import use_sdpa
from tst.config import Config
from tst.errors import ConfigError
from tst.model import megatron_softmax_kernels_available, transformer_engine_available
from tst.optim import params_dtype
from tst.plan import RunPlan, check_document_mask_attention
from tst.platform import Layout

__all__ = [
    "fused_wgrad_kernel_available",
    "gradient_accumulation_fusion",
    "transformer_config",
    "use_transformer_engine",
]


def transformer_config(cfg: Config, plan: RunPlan, layout: Layout, check_device: bool = True):
    """megatron-core TransformerConfig for this run and device (``check_device=False``: the
    dry run, which lays out a GPU cluster's run from anywhere)."""
    from megatron.core.activations import squared_relu
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    m, p, t = cfg.model, cfg.parallel, cfg.training
    on_gpu = layout.device.type == "cuda"
    te = use_transformer_engine(cfg, layout)
    if check_device:
        _check_device_features(cfg, layout, te)
    ffn = m.resolved_ffn_hidden_size
    moe = {}
    if m.num_experts:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or ffn,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_latent_size=m.moe_latent_size,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            # A zero coefficient weighs an auxiliary loss by nothing: skip computing it.
            # Sinkhorn is a routing rule, not a loss: it applies at any coefficient.
            moe_router_load_balancing_type=(
                m.moe_router_load_balancing_type
                if m.moe_aux_loss_coeff or m.moe_router_load_balancing_type == "sinkhorn"
                else "none"
            ),
            # The TE spec builds grouped-GEMM experts; the local spec sequential ones.
            moe_grouped_gemm=te and m.moe_grouped_gemm,
            # Fused permutation / router top-k exist with TE on CUDA only.
            moe_permute_fusion=on_gpu and te and cfg.moe.moe_permute_fusion,
            moe_router_fusion=on_gpu and te and cfg.moe.moe_router_fusion,
            moe_enable_deepep=cfg.moe.moe_enable_deepep,
            moe_flex_dispatcher_backend=cfg.moe.moe_flex_dispatcher_backend,
            overlap_moe_expert_parallel_comm=cfg.moe.overlap_moe_expert_parallel_comm,
            ep_overlap_early_attn_memory_release=cfg.moe.ep_overlap_early_attn_memory_release,
            expert_tensor_parallel_size=plan.grid.etp,
            **cfg.moe.transformer_config_fields(m.num_layers),
        )
    fp8 = {}
    if t.fp8_format:
        _check_fp8_possible(cfg, layout)
        fp8 = dict(
            fp8=t.fp8_format,
            fp8_recipe=t.fp8_recipe,
            fp8_margin=t.fp8_margin,
            fp8_amax_history_len=t.fp8_amax_history_len,
            fp8_amax_compute_algo=t.fp8_amax_compute_algo,
            fp8_param=t.fp8_param_gather,
            fp8_wgrad=t.fp8_wgrad,
            first_last_layers_bf16=t.first_last_layers_bf16,
            num_layers_at_start_in_bf16=t.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=t.num_layers_at_end_in_bf16,
        )
    recompute = {}
    if p.recompute_granularity:
        recompute = dict(
            recompute_granularity=p.recompute_granularity,
            recompute_method=p.recompute_method,
            recompute_num_layers=p.recompute_num_layers,
            distribute_saved_activations=p.distribute_saved_activations,
        )
        if p.recompute_modules is not None:
            modules = list(p.recompute_modules)
            if "moe_act" in modules and not (te and m.num_experts and m.moe_grouped_gemm):
                # megatron-core recomputes only the grouped-GEMM experts' activation (and
                # refuses the module otherwise); the local spec's experts are sequential.
                modules.remove("moe_act")
                warnings.warn("--recompute-modules moe_act: only grouped-GEMM experts "
                              "(--moe-grouped-gemm with the Transformer Engine spec) recompute "
                              "their activation; this model's experts have none to recompute: "
                              "dropped", stacklevel=2)  # fmt: skip
            recompute["recompute_modules"] = modules
    activation_offload = {}
    if p.fine_grained_activation_offloading:
        activation_offload = dict(
            fine_grained_activation_offloading=True,
            offload_modules=list(p.offload_modules),
            min_offloaded_tensor_size=p.min_offloaded_tensor_size,
        )
        _warn_offload_modules_without_effect(p.offload_modules, te, m)
    mla = cfg.mla.transformer_config_fields()
    if mla:  # MLA's own RoPE (GPTModel builds none for it) takes the model's base and share
        mla.update(rotary_base=m.rotary_base, rotary_percent=m.rotary_percent)
    dtype = params_dtype(cfg)
    # Fused kernels default on, as in Megatron-LM, and run only where they exist: CUDA (and
    # for some of them Transformer Engine or apex). On CPU every one is off.
    mla_rope_fusable = not mla or mla["rope_type"] == "yarn"
    softmax_fusion = on_gpu and m.masked_softmax_fusion
    if softmax_fusion and m.window is not None and not te:
        # megatron-core 0.16.1's fused softmax kernels take no window: they would attend to
        # the whole causal prefix (Megatron-LM's GPT-OSS example passes the flag for this).
        warnings.warn("Disabling --masked-softmax-fusion: megatron-core's fused softmax "
                      "kernels ignore --window-size; pass --no-masked-softmax-fusion to "
                      "silence this", stacklevel=2)  # fmt: skip
        softmax_fusion = False
    # The fused (SDPA) attention has no megatron softmax; MLA keeps megatron-core's.
    sdpa = use_sdpa(m.attention_backend, te, on_gpu, m) and not mla
    if softmax_fusion and cfg.data.reset_attention_mask and not te and not sdpa:
        # megatron-core's fused causal softmax builds its own causal mask and ignores the
        # one given (Transformer Engine's spec gets an arbitrary mask type instead).
        warnings.warn("Disabling --masked-softmax-fusion: megatron-core's fused causal softmax "
                      "kernel ignores --reset-attention-mask's document mask; pass "
                      "--no-masked-softmax-fusion to silence this", stacklevel=2)  # fmt: skip
        softmax_fusion = False
    if softmax_fusion and not te and not sdpa and not megatron_softmax_kernels_available():
        # The local spec's attention would import the missing extension at its first step.
        warnings.warn("Disabling --masked-softmax-fusion: megatron-core's fused softmax "
                      "kernels (scaled_masked_softmax_cuda, ...) are not built here; pass "
                      "--no-masked-softmax-fusion to silence this", stacklevel=2)  # fmt: skip
        softmax_fusion = False
    fused = dict(
        bias_dropout_fusion=on_gpu and m.bias_dropout_fusion,
        masked_softmax_fusion=softmax_fusion,
        # MLA's fused RoPE exists for YaRN only (megatron-core refuses it with plain RoPE).
        apply_rope_fusion=on_gpu and te and m.apply_rope_fusion and mla_rope_fusable,
        gradient_accumulation_fusion=gradient_accumulation_fusion(cfg, on_gpu, te),
        persist_layer_norm=on_gpu and te and m.persist_layer_norm,
        bias_activation_fusion=_bias_activation_fusion(m, on_gpu),
        cross_entropy_loss_fusion=on_gpu and m.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=m.cross_entropy_fusion_impl,
    )
    # The local spec has one attention, megatron-core's own, whatever the flag asks of TE.
    backend = AttnBackend[m.attention_backend] if te else AttnBackend.local
    config_class = MLATransformerConfig if mla else TransformerConfig
    mup = cfg.mup.settings(m.hidden_size, m.resolved_kv_channels)
    if mup and m.init_method_xavier_uniform:
        warnings.warn("--use-mup with --init-method-xavier-uniform: Xavier's init replaces "
                      "muP's width-scaled one, which may break muP's initialisation "
                      "assumptions (Megatron-LM's warning)", stacklevel=2)  # fmt: skip
    config = config_class(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=ffn,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        kv_channels=m.resolved_kv_channels,
        gated_linear_unit=m.gated_mlp,
        activation_func=(
            F.silu
            if m.swiglu
            else quick_gelu
            if m.quick_geglu
            else squared_relu
            if m.squared_relu
            else F.gelu
        ),  # fmt: skip
        # A GELU MLP ignores both (Megatron-LM's meaning; megatron-core would refuse its fused
        # GELU with an offset).
        glu_linear_offset=m.glu_linear_offset if m.gated_mlp else 0.0,
        activation_func_clamp_value=m.activation_func_clamp_value if m.gated_mlp else None,
        softmax_type=m.softmax_type,
        window_size=m.window,
        window_attn_skip_freq=m.window_skip_freq,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        layernorm_zero_centered_gamma=m.apply_layernorm_1p,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        test_mode=t.test_mode,
        qk_l2_norm=m.qk_l2_norm,
        qk_clip=m.qk_clip,
        qk_clip_alpha=m.qk_clip_alpha,
        qk_clip_threshold=m.qk_clip_threshold,
        log_max_attention_logit=m.log_max_attention_logit,
        attention_output_gate=m.attention_output_gate,
        apply_query_key_layer_scaling=m.apply_query_key_layer_scaling,
        no_rope_freq=m.no_rope_layers() if m.no_rope_freq is not None else None,
        fp32_residual_connection=m.fp32_residual_connection,
        init_method_std=m.init_method_std,
        embedding_init_method_std=m.embedding_init_method_std,
        # Weights are drawn by tst.init (layout-independent); it reads these two.
        **(
            {
                "init_method": torch.nn.init.xavier_uniform_,
                "output_layer_init_method": torch.nn.init.xavier_uniform_,
            }
            if m.init_method_xavier_uniform
            else {}
        ),  # fmt: skip
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        attention_softmax_in_fp32=m.attention_softmax_in_fp32,
        attention_backend=backend,
        rotary_interleaved=m.rotary_interleaved,
        tensor_model_parallel_size=plan.grid.tp,
        pipeline_model_parallel_size=plan.grid.pp,
        virtual_pipeline_model_parallel_size=plan.vpp,
        # Megatron-LM's rule: p2p overlapped with compute in interleaved schedules (unless
        # --no-overlap-p2p-communication), batched in every other one.
        overlap_p2p_comm=bool(plan.vpp) and p.overlap_p2p_comm,
        batch_p2p_comm=not (bool(plan.vpp) and p.overlap_p2p_comm),
        overlap_p2p_comm_warmup_flush=p.overlap_p2p_comm_warmup_flush,
        defer_embedding_wgrad_compute=p.defer_embedding_wgrad_compute,
        wgrad_deferral_limit=p.wgrad_deferral_limit,
        microbatch_group_size_per_vp_stage=p.microbatch_group_size_per_virtual_pipeline_stage,
        num_layers_in_first_pipeline_stage=p.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=p.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=p.pipeline_model_parallel_layout,
        account_for_embedding_in_pipeline_split=p.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=p.account_for_loss_in_pipeline_split,
        context_parallel_size=plan.grid.cp,
        # One type for every layer is megatron-core's string form; a list is per layer.
        cp_comm_type=(
            (p.cp_comm_type[0] if len(p.cp_comm_type) == 1 else list(p.cp_comm_type))
            if plan.grid.cp > 1
            else None
        ),
        hierarchical_context_parallel_sizes=p.hierarchical_context_parallel_sizes,
        expert_model_parallel_size=plan.grid.ep,
        sequence_parallel=p.sequence_parallel,
        tp_comm_overlap=p.tp_comm_overlap,
        tp_comm_bulk_wgrad=p.tp_comm_bulk_wgrad,
        tp_comm_bulk_dgrad=p.tp_comm_bulk_dgrad,
        tp_comm_overlap_ag=p.tp_comm_overlap_ag,
        tp_comm_overlap_rs=p.tp_comm_overlap_rs,
        tp_comm_overlap_rs_dgrad=p.tp_comm_overlap_rs_dgrad,
        tp_comm_split_ag=p.tp_comm_split_ag,
        tp_comm_split_rs=p.tp_comm_split_rs,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=t.bf16,
        fp16=t.fp16,
        calculate_per_token_loss=True,
        # The spec built (tst.model.layer_spec); megatron-core's FSDP2 wrapper reads it.
        transformer_impl="transformer_engine" if te else "local",
        use_cpu_initialization=not on_gpu,
        delay_wgrad_compute=m.delay_wgrad_compute,
        deterministic_mode=t.deterministic_mode,
        **fused,
        **recompute,
        **activation_offload,
        **moe,
        **fp8,
        **mla,
        **cfg.mtp.transformer_config_fields(),
        # muP's attention scale (megatron-core's MLA keeps its own, as in Megatron-LM 0.19).
        softmax_scale=mup["softmax_scale"] if mup and not mla else None,
    )
    if mup:
        # Megatron-LM 0.19's TransformerConfig fields, which 0.16.1's lacks: tst.init, the
        # bag embedding and the output layer's logit scaling read them here.
        for name in ("use_mup", "mup_width_mult", "mup_embedding_mult", "mup_output_mult"):
            setattr(config, name, mup[name])
    # YaRN of ordinary attention: megatron-core's GPTModel reads these attributes (Megatron-LM
    # 0.19 sets them the same way; MLA keeps its own fields).
    for name, value in m.yarn_config_fields(cfg.mla).items():
        setattr(config, name, value)
    return config


def _bias_activation_fusion(m, on_gpu: bool) -> bool:
    """Megatron-LM's rule (SwiGLU's flag for SwiGLU, GELU's otherwise), on CUDA only.

    megatron-core 0.16.1's dense MLP has no fused bias + quick-GEGLU or squared ReLU (it
    raises), and its fused SwiGLU no offset or clamp: those run unfused, saying so unless the
    flag that turns the fusion off was given.
    """
    if not on_gpu:
        return False
    if m.swiglu:
        if m.bias_swiglu_fusion and (m.glu_linear_offset or m.activation_func_clamp_value):
            # The fused SwiGLU has neither: it would drop them silently (the clamp) or fail.
            warnings.warn("Disabling --bias-swiglu-fusion: the fused SwiGLU has no "
                          "--glu-linear-offset / --activation-func-clamp-value; pass "
                          "--no-bias-swiglu-fusion to silence this", stacklevel=3)  # fmt: skip
            return False
        return m.bias_swiglu_fusion
    if (m.squared_relu or m.quick_geglu) and m.bias_gelu_fusion:
        warnings.warn("Disabling the bias + activation fusion: megatron-core has no fused "
                      f"bias + {m.mlp_name} for a dense MLP; pass --no-bias-gelu-fusion to "
                      "silence this", stacklevel=3)  # fmt: skip
        return False
    return m.bias_gelu_fusion


def fused_wgrad_kernel_available() -> bool:
    """Whether megatron-core found APEX's ``fused_weight_gradient_mlp_cuda`` (its own linear
    layers, the output layer among them, need it for gradient accumulation fusion)."""
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available


def gradient_accumulation_fusion(cfg: Config, on_gpu: bool, te: bool) -> bool:
    """Weight gradients accumulated straight into the main-gradient buffers by the fused
    kernel: on by default as in Megatron-LM, where it can run (CUDA, Transformer Engine, and
    APEX's kernel for megatron-core's own linears; without the kernel megatron-core would
    refuse to build the output layer). ``--defer-embedding-wgrad-compute`` needs it."""
    m, p = cfg.model, cfg.parallel
    if not (m.gradient_accumulation_fusion and on_gpu and te):
        why = ("--no-gradient-accumulation-fusion" if not m.gradient_accumulation_fusion
               else "this run is not on CUDA with Transformer Engine")  # fmt: skip
    elif not fused_wgrad_kernel_available():
        why = "APEX's fused_weight_gradient_mlp_cuda is not importable here"
        if not p.defer_embedding_wgrad_compute:
            warnings.warn(f"Disabling gradient accumulation fusion: {why} (megatron-core's "
                          "linear layers need it); pass --no-gradient-accumulation-fusion to "
                          "silence this", stacklevel=3)  # fmt: skip
    else:
        return True
    if p.defer_embedding_wgrad_compute:
        raise ConfigError(
            "--defer-embedding-wgrad-compute accumulates the deferred output-layer weight "
            f"gradients with the fused weight-gradient kernel (gradient accumulation fusion), "
            f"which megatron-core requires, and this run cannot use it ({why}): drop the flag"
        )
    return False


def _warn_offload_modules_without_effect(modules: list[str], te: bool, m) -> None:
    """expert_fc1 and moe_act offload Transformer Engine's grouped-GEMM experts' inputs only
    (megatron-core's TEGroupedMLP); elsewhere megatron-core skips them silently."""
    idle = [name for name in ("expert_fc1", "moe_act") if name in modules]
    if idle and not (te and m.num_experts and m.moe_grouped_gemm):
        warnings.warn(f"--offload-modules {' '.join(idle)}: only grouped-GEMM experts "
                      "(--moe-grouped-gemm with the Transformer Engine spec) offload there; "
                      "this model's experts keep those inputs (megatron-core skips them)",
                      stacklevel=3)  # fmt: skip


def _check_device_features(cfg: Config, layout: Layout, te: bool) -> None:
    """GPU-only features asked for where they cannot run: one line naming the flag and fix.

    The dry run never gets here (it lays out a GPU cluster's run from anywhere)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    on_gpu = layout.device.type == "cuda"
    check_document_mask_attention(cfg, te, p.context_parallel_size)  # auto, resolved to TE
    if p.context_parallel_size > 1 and not te:
        # tst.attention.ContextParallelAttention: plain causal attention over gathered keys.
        for flag, on, lacks in (
            ("--window-size", m.window_size is not None, "no sliding window"),
            ("--softmax-type " + m.softmax_type, m.softmax_type != "vanilla", "no sinks"),
            ("--qk-clip", m.qk_clip, "no attention scores to clip by"),
            ("--log-max-attention-logit", m.log_max_attention_logit, "no attention scores"),
        ):
            if on:
                raise ValueError(
                    f"{flag} with --context-parallel-size > 1 on the local spec: its "
                    f"context-parallel attention (keys and values gathered over CP, fused "
                    f"causal attention) has {lacks}; use Transformer Engine's spec on a GPU, "
                    "or drop one"
                )
    where = f"this run is on {layout.device.type}" + ("" if te else " without Transformer Engine")
    needs_te = [
        ("--tp-comm-overlap", p.tp_comm_overlap),
        # With --optimizer-cpu-offload megatron-core's hybrid optimizer takes its place.
        (
            "--use-precision-aware-optimizer",
            t.use_precision_aware_optimizer and not t.optimizer_cpu_offload,
        ),
        ("--fp8-param-gather", t.fp8_param_gather),
        ("--delay-wgrad-compute", m.delay_wgrad_compute),
        (
            "--cross-entropy-fusion-impl te",
            m.cross_entropy_fusion_impl == "te" and m.cross_entropy_loss_fusion,
        ),
    ]
    if m.num_experts and m.moe_token_dispatcher_type == "flex":
        import importlib.util

        if not (on_gpu and importlib.util.find_spec("deep_ep")):
            raise ValueError(
                "--moe-token-dispatcher-type flex needs DeepEP on a CUDA GPU; "
                + where
                + (" and DeepEP is not importable" if on_gpu else "")
                + ": use --moe-token-dispatcher-type alltoall"
            )
    if cfg.log.nvtx_ranges and cfg.log.profile and not on_gpu:
        raise ValueError("--nvtx-ranges marks megatron-core's NVTX ranges for NVIDIA's Nsight "
                         f"Systems, which needs a CUDA GPU; {where}: drop --nvtx-ranges "
                         "(--profile's torch trace has the trainer's own ranges)")  # fmt: skip
    if t.deterministic_mode and on_gpu:
        choices = ["Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS"]
        if os.environ.get("NCCL_ALGO") not in choices:
            raise ValueError(f"--deterministic-mode needs NCCL_ALGO set to one of {choices} "
                             "(deterministic all-reduces; Megatron-LM's rule): export it, e.g. "
                             "NCCL_ALGO=Ring")  # fmt: skip
    if (m.qk_clip or m.log_max_attention_logit) and te:
        from megatron.core.utils import is_te_min_version

        if not is_te_min_version("2.9.0"):  # Megatron-LM's rule (TE returns the logits)
            flag = "--qk-clip" if m.qk_clip else "--log-max-attention-logit"
            raise ValueError(f"{flag} with Transformer Engine's spec needs TE >= 2.9 (its "
                             "attention returns the largest logits): upgrade TE, or run the "
                             "local spec (--transformer-impl local), which records them here")  # fmt: skip
    if p.fine_grained_activation_offloading and te and os.environ.get("NVTE_CPU_OFFLOAD_V1") != "1":
        from megatron.core.utils import is_te_min_version

        if is_te_min_version("2.10.0"):  # Megatron-LM's rule
            raise ValueError(
                "--fine-grained-activation-offloading with Transformer Engine >= 2.10 needs "
                "NVTE_CPU_OFFLOAD_V1=1 in the environment (TE's newer offload would move the "
                "weights too): export it before the launch"
            )
    for flag, asked in needs_te:
        if asked and not (on_gpu and te):
            raise ValueError(
                f"{flag} needs a CUDA GPU with Transformer Engine; {where}: drop {flag.split()[0]}"
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
