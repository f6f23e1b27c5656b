"""megatron-core's DDP wrapper, optimizer and LR scheduler as the flags describe them.

One place maps the Megatron-LM flags onto megatron-core's ``DistributedDataParallelConfig``,
``OptimizerConfig`` and ``OptimizerParamScheduler``, with Megatron-LM's semantics: gradients
reduce in the parameters' dtype unless ``--accumulate-allreduce-grads-in-fp32`` (on by
itself with ``--bf16``), fp16 gets megatron-core's loss scaler (dynamic unless
``--loss-scale``), and the scheduler counts samples, so warm-up, decay and a batch-size
ramp-up are all in one unit.
"""

from __future__ import annotations

import torch

from tst.config import Config
from tst.plan import RunPlan

__all__ = [
    "NO_OFFLOAD",
    "build_scheduler",
    "ddp_config",
    "optimizer_config",
    "optimizer_overrides",
    "params_dtype",
]

# --optimizer-cpu-offload and its options at their defaults: for a configuration that builds
# no optimizer (the dry run's one-process parameter count, an export).
NO_OFFLOAD = dict(optimizer_cpu_offload=False, optimizer_offload_fraction=1.0,
                  use_torch_optimizer_for_cpu_offload=False, overlap_cpu_optimizer_d2h_h2d=False,
                  pin_cpu_grads=True, pin_cpu_params=True)  # fmt: skip


# Megatron-LM's names for the precision-aware optimizer's dtypes (fp8 state is kept as uint8).
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp8": torch.uint8}  # fmt: skip


def params_dtype(cfg: Config) -> torch.dtype:
    t = cfg.training
    return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32


def ddp_config(cfg: Config, num_parameters: int | None = None):
    """megatron-core's DDP settings; ``num_parameters`` (this rank's model) sizes the buckets of
    --ddp-num-buckets as Megatron-LM does (parameters // N)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p, r = cfg.parallel, cfg.rerun
    bucket_size = p.ddp_bucket_size
    if p.ddp_num_buckets is not None:
        if num_parameters is None:
            raise ValueError("--ddp-num-buckets needs the model's parameter count")
        bucket_size = max(1, num_parameters // p.ddp_num_buckets)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=p.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        align_param_gather=p.align_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # Non-finite gradients are caught by the trainer (one vote per step); megatron-core
        # checks each bucket's norm too where the rerun engine validates (tst.rerun).
        check_for_nan_in_grad=(
            r.mode in ("validate_results", "report_stats") and r.check_for_nan_in_loss_and_grad
        ),  # fmt: skip
        check_for_large_grads=r.engine_on and r.check_for_large_grads,
        bucket_size=bucket_size,
        pad_buckets_for_high_nccl_busbw=p.ddp_pad_buckets_for_high_nccl_busbw,
        reduce_scatter_with_fp32_accumulation=p.ddp_reduce_scatter_with_fp32_accumulation,
        gradient_reduce_div_fusion=p.gradient_reduce_div_fusion,
        fp8_param_gather=cfg.training.fp8_param_gather,
        num_distributed_optimizer_instances=p.num_distributed_optimizer_instances,
        nccl_ub=p.use_nccl_ub,
        disable_symmetric_registration=p.disable_symmetric_registration,
    )


def optimizer_config(cfg: Config):
    from megatron.core.optimizer import OptimizerConfig

    t, p, log = cfg.training, cfg.parallel, cfg.log
    return OptimizerConfig(
        optimizer=t.optimizer,
        lr=t.lr,
        min_lr=t.min_lr,
        decoupled_lr=t.decoupled_lr,
        decoupled_min_lr=t.decoupled_min_lr,
        weight_decay=t.weight_decay,
        apply_wd_to_qk_layernorm=t.apply_wd_to_qk_layernorm,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        sgd_momentum=t.sgd_momentum,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=params_dtype(cfg),
        loss_scale=t.loss_scale,
        initial_loss_scale=t.initial_loss_scale,
        min_loss_scale=t.min_loss_scale,
        loss_scale_window=t.loss_scale_window,
        hysteresis=t.hysteresis,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
        overlap_param_gather_with_optimizer_step=p.overlap_param_gather_with_optimizer_step,
        use_precision_aware_optimizer=t.use_precision_aware_optimizer,
        main_grads_dtype=_DTYPES[t.main_grads_dtype],
        main_params_dtype=_DTYPES[t.main_params_dtype],
        exp_avg_dtype=_DTYPES[t.exp_avg_dtype],
        exp_avg_sq_dtype=_DTYPES[t.exp_avg_sq_dtype],
        optimizer_cpu_offload=t.optimizer_cpu_offload,
        optimizer_offload_fraction=t.optimizer_offload_fraction,
        use_torch_optimizer_for_cpu_offload=t.use_torch_optimizer_for_cpu_offload,
        overlap_cpu_optimizer_d2h_h2d=t.overlap_cpu_optimizer_d2h_h2d,
        # Pinned host memory needs a GPU; without one the "host copies" are plain tensors.
        pin_cpu_grads=t.pin_cpu_grads and torch.cuda.is_available(),
        pin_cpu_params=t.pin_cpu_params and torch.cuda.is_available(),
        log_num_zeros_in_grad=log.log_num_zeros_in_grad,
    )


def optimizer_overrides(opt_config, transformer_config) -> dict | None:
    """Per-parameter-group settings for ``get_megatron_optimizer`` with ``opt_config`` (its
    :func:`optimizer_config`): None (megatron-core's standard ones: no weight decay on biases
    and 1-D weights, --decoupled-lr on the embedding and output weights) unless muP adds its
    learning rates and Adam epsilon (:func:`tst.config_mup.mup_optimizer_overrides`), as
    Megatron-LM 0.19 does."""
    from megatron.core.optimizer import get_standard_config_overrides

    from tst.config_mup import mup_optimizer_overrides

    if not getattr(transformer_config, "use_mup", False):
        return None
    mup = mup_optimizer_overrides(opt_config, transformer_config.mup_width_mult)
    return {**get_standard_config_overrides(opt_config), **mup}


def build_scheduler(optimizer, cfg: Config, plan: RunPlan, *, steps=None):
    """megatron-core's ``OptimizerParamScheduler`` over the run (lengths in samples).

    ``steps``: a schedule with its own warm-up that decays over ``steps`` samples from its
    own clock at zero (``--tst-restart-schedule-at-switch``).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t, run = cfg.training, cfg.run
    decay = steps if steps is not None else plan.lr_decay_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=t.lr_warmup_init,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=plan.lr_warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.start_weight_decay,
        end_wd=t.end_weight_decay,
        wd_incr_steps=plan.wd_incr_steps,
        wd_incr_style=t.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=run.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=run.override_opt_param_scheduler,
        wsd_decay_steps=plan.wsd_decay_steps,
        lr_wsd_decay_style=t.lr_wsd_decay_style if t.lr_decay_style == "WSD" else None,
    )
