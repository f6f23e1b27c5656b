"""Flags that megatron-core consumes: each reaches its megatron-core object (optimizer,
DDP, TransformerConfig, LR / weight-decay scheduler, metrics sinks) with Megatron-LM's
default when not given and the value given otherwise. Schedules are compared with the
formulas written out here from Megatron-LM's documented behaviour, not with its code."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tst.config import parse_args
from tst.optim import build_scheduler, ddp_config, optimizer_config
from tst.plan import validate

from gpt_helpers import one_rank_layout

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "100",
        "--mock-data", "--vocab-size", "512"]  # fmt: skip


def _cfg(*extra: str):
    cfg = parse_args([*BASE, *extra])
    plan = validate(cfg, 1, 512)
    return cfg, plan


def test_optimizer_flags_default_and_given():
    cfg, _ = _cfg()
    o = optimizer_config(cfg)
    assert (o.adam_eps, o.sgd_momentum, o.loss_scale, o.min_loss_scale, o.loss_scale_window,
            o.initial_loss_scale, o.hysteresis) == (1e-8, 0.9, None, 1.0, 1000, 2**32, 2)  # fmt: skip
    cfg, _ = _cfg("--adam-eps", "1e-6", "--fp16", "--min-loss-scale", "4",
                  "--loss-scale-window", "50", "--initial-loss-scale", "1024", "--hysteresis", "3")  # fmt: skip
    o = optimizer_config(cfg)
    assert (o.adam_eps, o.fp16, o.min_loss_scale, o.loss_scale_window, o.initial_loss_scale,
            o.hysteresis) == (1e-6, True, 4.0, 50, 1024.0, 3)  # fmt: skip
    assert optimizer_config(_cfg("--fp16", "--loss-scale", "128")[0]).loss_scale == 128.0
    o = optimizer_config(_cfg("--optimizer", "sgd", "--sgd-momentum", "0.5")[0])
    assert (o.optimizer, o.sgd_momentum) == ("sgd", 0.5)
    # Megatron-LM's deprecated spelling of --apply-wd-to-qk-layernorm: a warning, then the same.
    assert optimizer_config(_cfg()[0]).apply_wd_to_qk_layernorm is False
    with pytest.warns(UserWarning, match="--no-weight-decay-cond-type is deprecated"):
        cfg, _ = _cfg("--no-weight-decay-cond-type", "apply_wd_to_qk_layernorm")
    assert optimizer_config(cfg).apply_wd_to_qk_layernorm is True


def test_optimizer_offload_flags_default_and_given(monkeypatch):
    import torch

    from tst import megatron_fixes

    megatron_fixes.apply()  # megatron-core's TE version check, as a run applies it

    offload = ("--use-distributed-optimizer", "--use-precision-aware-optimizer")
    o = optimizer_config(_cfg()[0])
    assert (o.optimizer_cpu_offload, o.optimizer_offload_fraction,
            o.use_torch_optimizer_for_cpu_offload, o.overlap_cpu_optimizer_d2h_h2d) == (
        False, 1.0, False, False)  # fmt: skip
    cfg = _cfg(*offload, "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.25",
               "--overlap-cpu-optimizer-d2h-h2d")[0]  # fmt: skip
    o = optimizer_config(cfg)
    assert (o.optimizer_cpu_offload, o.optimizer_offload_fraction,
            o.overlap_cpu_optimizer_d2h_h2d) == (True, 0.25, True)  # fmt: skip
    # Host copies are pinned (Megatron-LM's default) where a GPU is, never without one.
    assert (o.pin_cpu_grads, o.pin_cpu_params) == (False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    o = optimizer_config(cfg)
    assert (o.pin_cpu_grads, o.pin_cpu_params) == (True, True)
    for flag, field in (("--no-pin-cpu-grads", "pin_cpu_grads"),
                        ("--no-pin-cpu-params", "pin_cpu_params")):  # fmt: skip
        o = optimizer_config(_cfg(*offload, "--optimizer-cpu-offload", flag)[0])
        assert getattr(o, field) is False


def test_ddp_flags_default_and_given():
    d = ddp_config(_cfg()[0])
    assert (d.grad_reduce_in_fp32, d.align_param_gather) == (False, True)
    # Under bf16 Megatron-LM reduces gradients in fp32 unless --grad-reduce-in-bf16.
    assert ddp_config(_cfg("--bf16")[0]).grad_reduce_in_fp32 is True
    assert ddp_config(_cfg("--bf16", "--grad-reduce-in-bf16")[0]).grad_reduce_in_fp32 is False
    assert ddp_config(_cfg("--accumulate-allreduce-grads-in-fp32")[0]).grad_reduce_in_fp32
    d = ddp_config(_cfg("--use-distributed-optimizer", "--overlap-param-gather",
                        "--overlap-grad-reduce", "--no-align-param-gather")[0])  # fmt: skip
    assert d.align_param_gather is False
    cfg = _cfg("--overlap-grad-reduce", "--no-align-grad-reduce")[0]
    assert cfg.parallel.align_grad_reduce is False and _cfg()[0].parallel.align_grad_reduce
    # Buckets and reduction details, Megatron-LM's defaults and given; --ddp-num-buckets N
    # sizes the buckets as the model's parameters // N (Megatron-LM's rule).
    d = ddp_config(_cfg()[0], 1000)
    assert (d.bucket_size, d.pad_buckets_for_high_nccl_busbw,
            d.reduce_scatter_with_fp32_accumulation, d.gradient_reduce_div_fusion) == (
        None, False, False, True)  # fmt: skip
    d = ddp_config(_cfg("--ddp-num-buckets", "4", "--ddp-pad-buckets-for-high-nccl-busbw",
                        "--ddp-reduce-scatter-with-fp32-accumulation",
                        "--no-gradient-reduce-div-fusion")[0], 1000)  # fmt: skip
    assert (d.bucket_size, d.pad_buckets_for_high_nccl_busbw,
            d.reduce_scatter_with_fp32_accumulation, d.gradient_reduce_div_fusion) == (
        250, True, True, False)  # fmt: skip
    assert ddp_config(_cfg("--ddp-bucket-size", "77")[0], 1000).bucket_size == 77
    with pytest.raises(ValueError, match="give --ddp-num-buckets or --ddp-bucket-size"):
        _cfg("--ddp-num-buckets", "4", "--ddp-bucket-size", "77")


def test_moe_and_numerics_flags_reach_the_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst.megatron_config import transformer_config

    cpu = one_rank_layout("cpu")

    moe = ["--num-experts", "4", "--moe-router-topk", "2"]
    cfg, plan = _cfg(*moe)
    c = transformer_config(cfg, plan, cpu, check_device=False)
    assert isinstance(c, TransformerConfig)
    assert (c.moe_z_loss_coeff, c.moe_token_drop_policy) == (None, "probs")
    cfg, plan = _cfg(*moe, "--moe-z-loss-coeff", "1e-3", "--moe-token-drop-policy", "position",
                     "--moe-expert-capacity-factor", "1.0")  # fmt: skip
    c = transformer_config(cfg, plan, cpu, check_device=False)
    assert (c.moe_z_loss_coeff, c.moe_token_drop_policy, c.moe_expert_capacity_factor) == (
        1e-3, "position", 1.0)  # fmt: skip
    # The flex dispatcher's SM budgets (DeepEP / HybridEP, CUDA): Megatron-LM's defaults 20 / 16.
    assert (c.moe_deepep_num_sms, c.moe_hybridep_num_sms) == (20, 16)
    cfg, plan = _cfg(*moe, "--moe-deepep-num-sms", "24", "--moe-hybridep-num-sms", "32")
    c = transformer_config(cfg, plan, cpu, check_device=False)
    assert (c.moe_deepep_num_sms, c.moe_hybridep_num_sms) == (24, 32)


def test_bf16_first_and_last_layers_under_fp8_reach_the_transformer_config(monkeypatch):
    """--first-last-layers-bf16 with --num-layers-at-start-in-bf16 / -end-: megatron-core's
    fields (Megatron-LM's defaults 1 and 1), the layers megatron-core then keeps out of FP8,
    and the bound per pipeline stage checked up front. FP8 itself needs a GPU: its device
    check is set aside here, the config is what is read."""
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    from tst import megatron_config
    from tst.errors import ConfigError

    monkeypatch.setattr(megatron_config, "_check_fp8_possible", lambda cfg, layout: None)
    cpu = one_rank_layout("cpu")
    fp8 = ["--num-layers", "6", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise",
           "--first-last-layers-bf16"]  # fmt: skip

    def bf16_layers(*extra):
        cfg, plan = _cfg(*fp8, *extra)
        c = megatron_config.transformer_config(cfg, plan, cpu, check_device=False)
        return (c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16), [
            i for i in range(6) if is_first_last_bf16_layer(c, i)
        ]

    assert bf16_layers() == ((1, 1), [0, 5])
    for flags, wgrad in (
        ((), True),
        (("--no-fp8-wgrad",), False),
        (("--disable-fp8-wgrad",), False),
    ):
        cfg, plan = _cfg(*fp8, *flags)
        assert (
            megatron_config.transformer_config(cfg, plan, cpu, check_device=False).fp8_wgrad
            is wgrad
        )
    with pytest.warns(UserWarning, match="--no-fp8-wgrad has no effect without --fp8-format"):
        _cfg("--no-fp8-wgrad")
    given = ("--num-layers-at-start-in-bf16", "2", "--num-layers-at-end-in-bf16", "0")
    assert bf16_layers(*given) == ((2, 0), [0, 1])
    with pytest.raises(ConfigError, match=r"--num-layers-at-end-in-bf16 4 must be between 0 and "
                       r"the layers per pipeline stage \(6 / PP 2 = 3\)"):  # fmt: skip
        cfg = parse_args([*BASE, *fp8, "--num-layers-at-end-in-bf16", "4",
                          "--pipeline-model-parallel-size", "2"])  # fmt: skip
        validate(cfg, 2, 512)


def test_tp_comm_overlap_toggles_reach_the_transformer_config():
    """Megatron-LM's defaults (every userbuffer overlap on but the reduce-scatter with the
    activation-gradient GEMM), each toggle in both of Megatron-LM's spellings, and a warning
    when there is no --tp-comm-overlap for them to change. The overlap itself needs Transformer
    Engine on a GPU: its device check is set aside here, the config is what is read."""
    from tst import megatron_config
    from tst.platform import Layout

    cpu = Layout(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo",
                 tp=2, pp=1, vpp=None, dp=1, ep=1, tp_rank=0, pp_rank=0, dp_rank=0, ep_rank=0,
                 cpu_patched=False)  # fmt: skip
    fields = ("tp_comm_bulk_wgrad", "tp_comm_bulk_dgrad", "tp_comm_overlap_ag",
              "tp_comm_overlap_rs", "tp_comm_overlap_rs_dgrad", "tp_comm_split_ag",
              "tp_comm_split_rs")  # fmt: skip

    def toggles(*extra):
        cfg = parse_args([*BASE, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                          *extra])  # fmt: skip
        c = megatron_config.transformer_config(cfg, validate(cfg, 2, 512), cpu, check_device=False)
        return tuple(getattr(c, name) for name in fields)

    assert toggles("--tp-comm-overlap") == (True, True, True, True, False, True, True)
    no = [
        "--no-tp-comm-bulk-wgrad",
        "--no-tp-comm-bulk-dgrad",
        "--no-tp-comm-overlap-ag",
        "--no-tp-comm-overlap-rs",
        "--no-tp-comm-split-ag",
        "--no-tp-comm-split-rs",
    ]
    disable = [flag.replace("--no-", "--disable-") for flag in no]  # Megatron-LM's aliases
    for given in (no, disable):
        got = toggles("--tp-comm-overlap", *given, "--tp-comm-overlap-rs-dgrad")
        assert got == (False, False, False, False, True, False, False), given
    with pytest.warns(UserWarning, match=r"--no-tp-comm-overlap-ag, --tp-comm-overlap-rs-dgrad: "
                      "no effect without --tp-comm-overlap"):  # fmt: skip
        toggles("--no-tp-comm-overlap-ag", "--tp-comm-overlap-rs-dgrad")


def test_microbatch_group_size_reaches_the_pipeline_config():
    """--microbatch-group-size-per-virtual-pipeline-stage: megatron-core's default is PP
    (depth-first); given, the interleaved schedule's table follows it. Without virtual stages
    it has no effect, and says so."""
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    from tst.megatron_config import transformer_config
    from tst.platform import Layout

    cpu = Layout(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo",
                 tp=1, pp=2, vpp=2, dp=1, ep=1, tp_rank=0, pp_rank=0, dp_rank=0, ep_rank=0,
                 cpu_patched=False)  # fmt: skip
    vpp = ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
           "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "4",
           "--micro-batch-size", "1"]  # fmt: skip

    def group_size(*extra):
        cfg = parse_args([*BASE, *vpp, *extra])
        return transformer_config(cfg, validate(cfg, 2, 512), cpu, check_device=False
                                  ).microbatch_group_size_per_vp_stage  # fmt: skip

    assert group_size() == 2
    assert group_size("--microbatch-group-size-per-virtual-pipeline-stage", "4") == 4
    # Breadth-first: all 4 micro-batches on the first virtual stage before the second.
    assert [chunk for _, chunk in get_schedule_table(4, 2, 4)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [chunk for _, chunk in get_schedule_table(4, 2, 2)] == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.warns(UserWarning, match="without virtual pipeline stages it has no effect"):
        _cfg("--microbatch-group-size-per-virtual-pipeline-stage", "2")


def _scheduler(*extra: str):
    cfg, plan = _cfg(*extra)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=cfg.training.lr)
    return build_scheduler(optimizer, cfg, plan), optimizer.param_groups[0]


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_increment_follows_megatron_lm(style):
    """--start-weight-decay / --end-weight-decay / --weight-decay-incr-style: weight decay
    goes from start to end over the run's samples (100 steps x 1 sample here)."""
    scheduler, group = _scheduler("--start-weight-decay", "0.01", "--end-weight-decay", "0.1",
                                  "--weight-decay-incr-style", style)  # fmt: skip
    for step in (0, 25, 50, 100):
        scheduler.step(increment=step - scheduler.num_steps)
        ratio = step / 100
        coeff = ratio if style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        assert group["weight_decay"] == pytest.approx(0.01 + coeff * 0.09, rel=1e-9), step
    # Default: constant --weight-decay.
    scheduler, group = _scheduler("--weight-decay", "0.05")
    scheduler.step(increment=60)
    assert group["weight_decay"] == pytest.approx(0.05)


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_decay_follows_megatron_lm(style):
    """WSD: the peak LR until the last --lr-wsd-decay-iters steps, then down to --min-lr in
    --lr-wsd-decay-style."""
    scheduler, group = _scheduler("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20",
                                  "--lr-wsd-decay-style", style, "--min-lr", "1e-4")  # fmt: skip
    peak, low = 1e-3, 1e-4
    for step in (10, 79, 80, 85, 90, 100):
        scheduler.step(increment=step - scheduler.num_steps)
        if step <= 80:
            want = peak
        else:
            r = (step - 80) / 20
            coeff = {"linear": 1 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1),
                     "exponential": 2 * 0.5 ** r - 1, "minus_sqrt": 1 - math.sqrt(r)}[style]  # fmt: skip
            want = low + coeff * (peak - low)
        assert group["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), (style, step)


def test_loss_scale_kept_out_of_tensorboard_when_asked(tmp_path):
    """--no-log-loss-scale-to-tensorboard: the metrics file keeps the loss scale, TensorBoard
    does not get it (the default writes it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tst.metrics import MetricsWriter

    for skip, name in ((frozenset(), "default"), (frozenset({"loss_scale"}), "off")):
        writer = MetricsWriter(True, str(tmp_path / f"{name}.jsonl"), str(tmp_path / name),
                               tensorboard_skip=skip)  # fmt: skip
        writer.write({"iteration": 1, "loss": 2.0, "loss_scale": 65536.0}, "train")
        writer.close()
        tags = EventAccumulator(str(tmp_path / name)).Reload().Tags()["scalars"]
        assert ("train/loss_scale" in tags) == (name == "default") and "train/loss" in tags
        assert "loss_scale" in (tmp_path / f"{name}.jsonl").read_text()
    # The flag is what the trainer reads.
    assert _cfg()[0].log.log_loss_scale_to_tensorboard
    assert not _cfg("--no-log-loss-scale-to-tensorboard")[0].log.log_loss_scale_to_tensorboard


@pytest.mark.parametrize("mlp", [["--swiglu"], []])
def test_fused_kernels_on_by_default_where_the_device_has_them(mlp, monkeypatch):
    """Megatron-LM's fusions are on by default on a GPU and off with its --no-* switches; on
    CPU they are off (no kernels). The ones that need Transformer Engine (RoPE, gradient
    accumulation, persistent layer norm) stay off where TE is missing, whatever the flags."""
    import tst.megatron_config
    from tst.megatron_config import transformer_config

    # Here as if megatron-core's fused softmax extensions were built (the next test: not).
    monkeypatch.setattr(tst.megatron_config, "megatron_softmax_kernels_available", lambda: True)

    activation = "--no-bias-swiglu-fusion" if mlp else "--no-bias-gelu-fusion"
    off = ["--no-bias-dropout-fusion", activation, "--no-masked-softmax-fusion",
           "--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm"]  # fmt: skip
    fields = ("bias_dropout_fusion", "bias_activation_fusion", "masked_softmax_fusion")
    te_fields = ("apply_rope_fusion", "gradient_accumulation_fusion", "persist_layer_norm")
    for device, extra, want in (("cuda", [], True), ("cuda", off, False), ("cpu", [], False)):
        cfg, plan = _cfg(*mlp, *extra)
        c = transformer_config(cfg, plan, one_rank_layout(device), check_device=False)
        assert [getattr(c, f) for f in fields] == [want] * 3, (device, extra)
        assert not any(getattr(c, f) for f in te_fields)  # no Transformer Engine here
    cfg, _ = _cfg(*mlp, *off)
    m = cfg.model
    assert not (m.apply_rope_fusion or m.gradient_accumulation_fusion or m.persist_layer_norm)
    m = _cfg(*mlp)[0].model
    assert m.gradient_accumulation_fusion and m.persist_layer_norm


def test_masked_softmax_fusion_off_with_a_warning_where_its_kernels_are_not_built():
    """The local spec on a GPU without megatron-core's fused softmax extensions (the pip wheel
    ships none) would fail at its first step importing scaled_masked_softmax_cuda: the fusion
    is turned off with a warning naming the flag, as Megatron adjusts flags it cannot honour.
    The other fusions stay on; --no-masked-softmax-fusion asks for it and warns nothing."""
    import warnings

    from tst.megatron_config import transformer_config
    from tst.model import megatron_softmax_kernels_available

    assert not megatron_softmax_kernels_available()  # none here
    cfg, plan = _cfg("--swiglu", "--attention-backend", "unfused")  # megatron-core's attention
    with pytest.warns(UserWarning, match="--masked-softmax-fusion.*not built"):
        c = transformer_config(cfg, plan, one_rank_layout("cuda"), check_device=False)
    assert not c.masked_softmax_fusion
    assert c.bias_dropout_fusion and c.bias_activation_fusion
    # Asked off: no warning; the fused (SDPA) attention, auto's on CUDA: no softmax to fuse.
    for extra in (["--attention-backend", "unfused", "--no-masked-softmax-fusion"], []):
        cfg, plan = _cfg("--swiglu", *extra)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = transformer_config(cfg, plan, one_rank_layout("cuda"), check_device=False)
        assert not [w for w in caught if "masked-softmax" in str(w.message)], extra
        assert not c.masked_softmax_fusion or not extra
    # Multi-latent attention keeps megatron-core's attention, and its softmax, under auto.
    mla = ["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16",
           "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "12"]  # fmt: skip
    cfg, plan = _cfg("--swiglu", *mla)
    with pytest.warns(UserWarning, match="--masked-softmax-fusion.*not built"):
        c = transformer_config(cfg, plan, one_rank_layout("cuda"), check_device=False)
    assert not c.masked_softmax_fusion


def test_wsd_decay_in_samples_is_the_iterations_schedule_at_one_sample_per_step():
    """--lr-wsd-decay-samples with --train-samples (global batch 1) is the same schedule as
    --lr-wsd-decay-iters with --train-iters."""
    by_iters, g1 = _scheduler("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20")
    cfg = parse_args([*(a for a in BASE if a not in ("--train-iters", "100")),
                      "--train-samples", "100", "--lr-decay-style", "WSD",
                      "--lr-wsd-decay-samples", "20"])  # fmt: skip
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=cfg.training.lr)
    by_samples = build_scheduler(optimizer, cfg, validate(cfg, 1, 512))
    g2 = optimizer.param_groups[0]
    for step in (50, 80, 85, 95, 100):
        by_iters.step(increment=step - by_iters.num_steps)
        by_samples.step(increment=step - by_samples.num_steps)
        assert g2["lr"] == g1["lr"], step
    assert g1["lr"] < 1e-3  # it did decay


def test_manual_gc_eval_and_profile_ranks():
    """--no-manual-gc-eval: no collection around evaluation (the default collects there);
    --profile-ranks: only the listed ranks record a trace."""
    import gc

    from tst.trainer import _ManualGC, _Profiler

    calls = []
    collect = gc.collect
    gc.collect = lambda *a, **k: calls.append(k.get("generation", 2)) or 0
    try:
        for flags, want in (([], [2, 0]), (["--no-manual-gc-eval"], []),
                            (["--disable-manual-gc-eval"], [])):  # fmt: skip
            log = _cfg("--manual-gc", *flags)[0].log
            state = _ManualGC(log.manual_gc, log.manual_gc_interval, log.manual_gc_eval)
            calls.clear()
            state.before_eval()
            state.after_eval()
            assert calls == want, flags
    finally:
        gc.collect = collect
        gc.enable()
    log = _cfg("--profile", "--profile-ranks", "1", "3")[0].log
    assert [_Profiler(log, rank, None).enabled for rank in range(4)] == [False, True, False, True]
    log = _cfg("--profile")[0].log  # Megatron-LM's default: rank 0
    assert [_Profiler(log, rank, None).enabled for rank in range(2)] == [True, False]


def test_context_parallelism_on_the_local_spec_refuses_what_its_attention_lacks():
    """CP > 1 launches on any device; on the local spec its attention
    (tst.attention.ContextParallelAttention) is plain causal attention, so sliding windows,
    sinks and the attention-logit flags are refused in one line there (TE's has them). The
    CP runs themselves: tests/distributed/test_context_parallel.py."""
    from tst.megatron_config import _check_device_features

    cp = [*BASE, "--context-parallel-size", "2"]
    _check_device_features(parse_args(cp), one_rank_layout("cpu"), te=False)
    for extra, message in (
        (["--window-size", "4,0"], "--window-size with --context-parallel-size > 1 on the local "
         "spec: .* has no sliding window; use Transformer Engine's spec"),
        (["--softmax-type", "learnable"], "--softmax-type learnable with .* has no sinks"),
        (["--qk-clip"], "--qk-clip with .* has no attention scores to clip by"),
        (["--log-max-attention-logit"], "--log-max-attention-logit with .* no attention scores"),
    ):  # fmt: skip
        cfg = parse_args(cp + extra)
        with pytest.raises(ValueError, match=message):
            _check_device_features(cfg, one_rank_layout("cpu"), te=False)


def test_loss_scale_kept_out_of_tensorboard_in_a_run(tmp_path):
    """The same through pretrain_tst.main (one rank, --fp16): the trainer hands the flag to
    its writer, so TensorBoard holds train/loss_scale only without
    --no-log-loss-scale-to-tensorboard, while the metrics file holds loss_scale either way."""
    import json

    from flags import SMALL_GPT
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import pretrain_tst

    argv = ["--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
            "--train-iters", "2", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0",
            "--num-workers", "0", "--peak-tflops", "1", "--fp16", *SMALL_GPT]  # fmt: skip
    for name, extra in (("default", []), ("off", ["--no-log-loss-scale-to-tensorboard"])):
        metrics, board = tmp_path / f"{name}.jsonl", tmp_path / name
        out = ["--metrics-file", str(metrics), "--tensorboard-dir", str(board)]
        assert pretrain_tst.main([*argv, *extra, *out]) == 0
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        logged = [r["iteration"] for r in records if "loss" in r and "loss_scale" in r]
        assert logged == [1, 2], name  # every step's record (and each overflow's own)
        tags = EventAccumulator(str(board)).Reload().Tags()["scalars"]
        assert "train/loss" in tags and ("train/loss_scale" in tags) == (name == "default")


@pytest.mark.parametrize(
    ("world", "flags", "want"),
    [
        (2, ["--pipeline-model-parallel-size", "2"], (False, True, False)),
        (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "4",
             "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "2"],
         (True, False, False)),
        (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "4",
             "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "2",
             "--overlap-p2p-communication-warmup-flush"], (True, False, True)),
        (4, ["--pipeline-model-parallel-size", "4", "--num-layers", "8",
             "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "4",
             "--no-overlap-p2p-communication"], (False, True, False)),
    ],
    ids=["1F1B", "interleaved", "interleaved-warmup-flush", "interleaved-batched"],
)  # fmt: skip
def test_pipeline_p2p_follows_megatron_lms_rule(world, flags, want):
    """Megatron-LM's p2p: overlapped with compute in interleaved schedules unless
    --no-overlap-p2p-communication (then batched, PP > 2), batched in 1F1B; the warm-up and
    flush overlap with --overlap-p2p-communication-warmup-flush. (overlap_p2p_comm,
    batch_p2p_comm, overlap_p2p_comm_warmup_flush) as the TransformerConfig gets them."""
    from tst.megatron_config import transformer_config
    from tst.platform import Layout

    cfg = parse_args([*BASE, *flags])
    plan = validate(cfg, world, 512)
    layout = Layout(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"),
                    backend="gloo", tp=1, pp=plan.grid.pp, vpp=plan.vpp, dp=1, ep=1, tp_rank=0,
                    pp_rank=0, dp_rank=0, ep_rank=0, cpu_patched=False)  # fmt: skip
    c = transformer_config(cfg, plan, layout, check_device=False)
    assert (c.overlap_p2p_comm, c.batch_p2p_comm, c.overlap_p2p_comm_warmup_flush) == want


def test_test_mode_reaches_the_transformer_config_where_it_can_check():
    from tst.errors import ConfigError
    from tst.megatron_config import transformer_config

    cpu = one_rank_layout("cpu")
    qk = ["--qk-layernorm", "--normalization", "LayerNorm"]
    assert not transformer_config(*_cfg(*qk), cpu, check_device=False).test_mode
    assert transformer_config(*_cfg(*qk, "--test-mode"), cpu, check_device=False).test_mode
    # megatron-core's check reads the norms' biases: RMSNorm has none.
    with pytest.raises(ConfigError, match="--test-mode compares the q / k LayerNorm weights "
                                          "and biases.*--normalization RMSNorm"):  # fmt: skip
        _cfg("--qk-layernorm", "--normalization", "RMSNorm", "--test-mode")
    with pytest.warns(UserWarning, match="this model has none to check"):
        _cfg("--test-mode")


def test_fused_weighted_squared_relu_flag():
    """--use-fused-weighted-squared-relu (Nemotron 3's launch scripts): off by default, on when
    given, in the TransformerConfig; refused up front where megatron-core's grouped-GEMM
    experts would assert at the first step (a bias), a warning where it changes nothing. The
    fused function it selects computes relu(x)^2 * p and its gradients (rel 1e-6)."""
    from megatron.core.fusions.fused_weighted_squared_relu import weighted_squared_relu_impl

    from tst.megatron_config import transformer_config

    cpu = one_rank_layout("cpu")
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--squared-relu"]
    cfg, plan = _cfg(*moe)
    assert transformer_config(cfg, plan, cpu, check_device=False).use_fused_weighted_squared_relu \
        is False  # fmt: skip
    cfg, plan = _cfg(*moe, "--use-fused-weighted-squared-relu")
    assert transformer_config(cfg, plan, cpu, check_device=False).use_fused_weighted_squared_relu
    with pytest.raises(ValueError, match="add --disable-bias-linear"):
        _cfg(*moe, "--moe-grouped-gemm", "--use-fused-weighted-squared-relu")
    _cfg(*moe, "--moe-grouped-gemm", "--use-fused-weighted-squared-relu", "--disable-bias-linear")
    for extra in (["--squared-relu"], ["--num-experts", "4", "--moe-router-topk", "2"]):
        with pytest.warns(UserWarning, match="changes nothing"):
            _cfg(*extra, "--use-fused-weighted-squared-relu")

    torch.manual_seed(0)
    x = torch.randn(6, 5, 8, dtype=torch.float64, requires_grad=True)
    p = torch.rand(30, 1, dtype=torch.float64, requires_grad=True)
    out = weighted_squared_relu_impl(x, p)
    ref = torch.relu(x).pow(2) * p.view(6, 5, 1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    g = torch.randn_like(out)
    gx, gp = torch.autograd.grad(out, (x, p), g)
    rx, rp = torch.autograd.grad(ref, (x, p), g)
    torch.testing.assert_close(gx, rx, rtol=1e-6, atol=0)
    torch.testing.assert_close(gp, rp, rtol=1e-6, atol=0)


def test_defer_embedding_wgrad_compute_rules():
    """--defer-embedding-wgrad-compute / --wgrad-deferral-limit: forwarded to megatron-core
    (its defaults off and 0); its rules said up front in one line each (pipeline parallelism,
    the fused weight-gradient kernel, a limit >= 0), MTP refused (measured here: with MTP the
    deferred gradients pair the wrong inputs and the loss leaves the reference's at the third
    step), and on a machine without a GPU a launch is refused before any process group.
    tests/distributed/test_trainer.py trains with it."""
    import pretrain_tst
    from tst.megatron_config import transformer_config
    from tst.platform import Layout

    pp2 = ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4"]
    cfg, _ = _cfg()
    assert (cfg.parallel.defer_embedding_wgrad_compute, cfg.parallel.wgrad_deferral_limit) == (
        False, 0)  # fmt: skip
    cfg = parse_args([*BASE, *pp2, "--defer-embedding-wgrad-compute", "--wgrad-deferral-limit",
                      "2"])  # fmt: skip
    plan = validate(cfg, 2, 512)
    cpu = Layout(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo",
                 tp=1, pp=2, vpp=None, dp=1, ep=1, tp_rank=0, pp_rank=0, dp_rank=0, ep_rank=0,
                 cpu_patched=False)  # fmt: skip
    # Where the fused kernel cannot run (here: no CUDA) building the config says why.
    with pytest.raises(ValueError, match=r"--defer-embedding-wgrad-compute accumulates the "
                       r"deferred .* \(this run is not on CUDA with Transformer Engine\)"):  # fmt: skip
        transformer_config(cfg, plan, cpu)
    refused = {
        "needs --pipeline-model-parallel-size > 1": ["--defer-embedding-wgrad-compute"],
        "drop --no-gradient-accumulation-fusion": [*pp2, "--defer-embedding-wgrad-compute",
                                                   "--no-gradient-accumulation-fusion"],
        "--wgrad-deferral-limit must be >= 0": [*pp2, "--defer-embedding-wgrad-compute",
                                                "--wgrad-deferral-limit", "-1"],
        "with --mtp-num-layers: megatron-core pairs": [*pp2, "--defer-embedding-wgrad-compute",
                                                       "--mtp-num-layers", "1"],
    }  # fmt: skip
    for message, extra in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            validate(parse_args([*BASE, *extra]), 2 if "--pipeline-model-parallel-size" in extra
                     else 1, 512)  # fmt: skip
    with pytest.warns(UserWarning, match="--wgrad-deferral-limit bounds"):
        _cfg("--wgrad-deferral-limit", "2")
    with pytest.raises(ValueError, match="and this machine has no GPU: drop it"):
        pretrain_tst.main([*BASE, *pp2, "--defer-embedding-wgrad-compute"])


def test_gradient_accumulation_fusion_needs_the_kernel(monkeypatch):
    """On by default where it runs (CUDA, Transformer Engine and APEX's kernel, which
    megatron-core's own linears need: without it megatron-core refuses to build the output
    layer); off with a warning saying why where the kernel is missing, silently with
    --no-gradient-accumulation-fusion or off CUDA."""
    import tst.megatron_config as mc

    cfg, _ = _cfg()
    monkeypatch.setattr(mc, "fused_wgrad_kernel_available", lambda: True)
    assert mc.gradient_accumulation_fusion(cfg, on_gpu=True, te=True) is True
    assert mc.gradient_accumulation_fusion(cfg, on_gpu=False, te=True) is False
    assert mc.gradient_accumulation_fusion(cfg, on_gpu=True, te=False) is False
    off = _cfg("--no-gradient-accumulation-fusion")[0]
    assert mc.gradient_accumulation_fusion(off, on_gpu=True, te=True) is False
    monkeypatch.setattr(mc, "fused_wgrad_kernel_available", lambda: False)
    with pytest.warns(UserWarning, match="fused_weight_gradient_mlp_cuda is not importable"):
        assert mc.gradient_accumulation_fusion(cfg, on_gpu=True, te=True) is False


def test_context_parallel_communication_flags_reach_megatron_core():
    """--cp-comm-type as Megatron-LM takes it (one type for every layer, or one per layer;
    a2a+p2p with --hierarchical-context-parallel-sizes, whose product is CP) reaches the
    TransformerConfig, and megatron-core's process groups get the levels' sizes; its rules are
    one line each. Context parallelism itself runs through Transformer Engine on a GPU."""
    import pretrain_tst
    from tst.megatron_config import transformer_config
    from tst.platform import Layout

    cpu = Layout(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), backend="gloo",
                 tp=1, pp=1, vpp=None, dp=1, ep=1, tp_rank=0, pp_rank=0, dp_rank=0, ep_rank=0,
                 cpu_patched=False)  # fmt: skip
    cp4 = ["--context-parallel-size", "4", "--global-batch-size", "1"]

    def config(*extra):
        cfg = parse_args([*BASE, *cp4, *extra])
        return transformer_config(cfg, validate(cfg, 4, 512), cpu, check_device=False)

    c = config()
    assert (c.cp_comm_type, c.hierarchical_context_parallel_sizes) == ("p2p", None)
    c = config("--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "2")
    assert (c.cp_comm_type, c.hierarchical_context_parallel_sizes) == ("a2a+p2p", [2, 2])
    assert config("--cp-comm-type", "p2p", "a2a").cp_comm_type == ["p2p", "a2a"]  # 2 layers
    for extra, message in (
        (["--cp-comm-type", "a2a+p2p"], "give their sizes with --hierarchical-context-parallel"),
        (["--hierarchical-context-parallel-sizes", "2", "3"], "multiply to 6, not --context-"),
        (["--cp-comm-type", "p2p", "a2a", "a2a"], "one per layer (2), got 3"),
        (["--cp-comm-type", "ring"], "invalid choice: 'ring'"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            config(*extra)
    # The levels reach megatron-core's initialize_model_parallel (a world of one: CP 1 here).
    seen = {}
    from megatron.core import parallel_state

    original = parallel_state.initialize_model_parallel

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    parallel_state.initialize_model_parallel = spy
    try:
        assert pretrain_tst.main([*BASE, "--train-iters", "1", "--eval-iters", "0"]) == 0
    finally:
        parallel_state.initialize_model_parallel = original
    assert "hierarchical_context_parallel_sizes" in seen
    assert seen["hierarchical_context_parallel_sizes"] is None


def test_nccl_user_buffer_flags_reach_ddp_and_need_a_gpu(monkeypatch):
    """--use-nccl-ub / --disable-symmetric-registration (Megatron-LM's): DDP's nccl_ub and
    disable_symmetric_registration (defaults off); a launch without a GPU is refused before
    any process group, and so is PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (megatron-
    core's rule); the second flag alone changes nothing (a warning)."""
    import pretrain_tst

    d = ddp_config(_cfg()[0])
    assert (d.nccl_ub, d.disable_symmetric_registration) == (False, False)
    d = ddp_config(_cfg("--use-nccl-ub", "--disable-symmetric-registration")[0])
    assert (d.nccl_ub, d.disable_symmetric_registration) == (True, True)
    with pytest.raises(ValueError, match="and this machine has no GPU: drop it"):
        pretrain_tst.main([*BASE, "--use-nccl-ub"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64,expandable_segments:True")
    from tst.plan import check_launchable

    with pytest.raises(ValueError, match="expandable_segments:True does not support: unset it"):
        check_launchable(_cfg("--use-nccl-ub")[0])
    with pytest.warns(UserWarning, match="without --use-nccl-ub it changes nothing"):
        check_launchable(_cfg("--disable-symmetric-registration")[0])


def test_this_sessions_flags_through_pretrain_tst(tmp_path):
    """Through pretrain_tst.py, at their defaults and given: a MoE squared-ReLU model trains
    with --use-fused-weighted-squared-relu (the TransformerConfig carries it; the local spec's
    sequential experts compute the same math, so the losses equal the default run's exactly),
    --legacy-tokenizer, --disable-msc and --disable-symmetric-registration (without
    --use-nccl-ub: a warning says so) change nothing, and --cp-comm-type a2a (one type for every
    layer) is taken at CP 1, where megatron-core's config holds none."""
    from trainer_runs import after_training, main_records

    argv = [*BASE, "--num-experts", "4", "--moe-router-topk", "2", "--squared-relu",
            "--disable-bias-linear", "--train-iters", "3", "--log-interval", "1",
            "--eval-iters", "0", "--num-workers", "0"]  # fmt: skip
    seen = []
    with after_training(lambda trainer: seen.append(trainer.config)):
        default = main_records(argv, str(tmp_path / "a.jsonl"))
        with pytest.warns(UserWarning, match="without --use-nccl-ub it changes nothing"):
            given = main_records(argv + ["--use-fused-weighted-squared-relu", "--legacy-tokenizer",
                                         "--disable-msc", "--cp-comm-type", "a2a",
                                         "--disable-symmetric-registration"],
                                 str(tmp_path / "b.jsonl"))  # fmt: skip
    assert [c.use_fused_weighted_squared_relu for c in seen] == [False, True]
    assert [c.cp_comm_type for c in seen] == [None, None]  # CP 1
    losses = [[r["loss"] for r in records if "loss" in r] for records in (default, given)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_sinkhorn_routing_is_kept_at_any_aux_loss_coefficient(tmp_path):
    """--moe-router-load-balancing-type sinkhorn is a routing rule, not a loss: it reaches
    megatron-core at the default --moe-aux-loss-coeff 0 (an auxiliary-loss type there is
    skipped as 'none', which weighs the same), and trains: top-1 as in Megatron-LM's own
    sinkhorn functional tests (which megatron-core refuses for any other balancing without
    --moe-router-pre-softmax), and at top-2 it routes otherwise than no balancing."""
    import json

    import pretrain_tst
    from tst.megatron_config import transformer_config

    cpu = one_rank_layout("cpu")
    moe = ["--num-experts", "4", "--moe-router-topk", "2"]
    for kind, want in (("sinkhorn", "sinkhorn"), ("aux_loss", "none")):
        cfg, plan = _cfg(*moe, "--moe-router-load-balancing-type", kind)
        c = transformer_config(cfg, plan, cpu, check_device=False)
        assert c.moe_router_load_balancing_type == want, kind
    cfg, plan = _cfg(*moe, "--moe-router-load-balancing-type", "aux_loss",
                     "--moe-aux-loss-coeff", "1e-2")  # fmt: skip
    assert transformer_config(cfg, plan, cpu, check_device=False).moe_router_load_balancing_type \
        == "aux_loss"  # fmt: skip

    def losses(name: str, *flags: str) -> list[float]:
        metrics = str(tmp_path / f"{name}.jsonl")
        argv = [*BASE, "--train-iters", "4", "--global-batch-size", "2", "--log-interval", "1",
                "--eval-interval", "100", "--tst-bag-size", "2", "--tst-iters", "2",
                "--hidden-dropout", "0", "--attention-dropout", "0", "--num-experts", "4",
                "--moe-ffn-hidden-size", "32", "--metrics-file", metrics, *flags]  # fmt: skip
        assert pretrain_tst.main(argv) == 0
        with open(metrics) as f:
            return [r["loss"] for r in map(json.loads, f) if r.get("loss") is not None]

    top1 = losses("top1", "--moe-router-topk", "1", "--moe-router-load-balancing-type", "sinkhorn")
    assert len(top1) == 4 and all(math.isfinite(x) for x in top1)
    sinkhorn = losses("s", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "sinkhorn")
    none = losses("n", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "none")
    assert sinkhorn != none


def test_activation_offload_flags_default_and_given(monkeypatch):
    """--fine-grained-activation-offloading / --offload-modules / --min-offloaded-tensor-size
    reach megatron-core's TransformerConfig (Megatron-LM's defaults: off, no modules, 1 M
    elements); with Transformer Engine >= 2.10 the launch needs NVTE_CPU_OFFLOAD_V1=1
    (Megatron-LM's rule)."""
    import megatron.core.utils

    from tst.megatron_config import _check_device_features, transformer_config

    cfg, plan = _cfg()
    tc = transformer_config(cfg, plan, one_rank_layout("cpu"))
    assert (tc.fine_grained_activation_offloading, tc.offload_modules,
            tc.min_offloaded_tensor_size) == (False, [], 1024 * 1024)  # fmt: skip
    flags = ("--fine-grained-activation-offloading", "--offload-modules", "core_attn",
             "attn_proj", "--min-offloaded-tensor-size", "4096")  # fmt: skip
    cfg, plan = _cfg(*flags)
    tc = transformer_config(cfg, plan, one_rank_layout("cpu"))
    assert (tc.fine_grained_activation_offloading, tc.offload_modules,
            tc.min_offloaded_tensor_size) == (True, ["core_attn", "attn_proj"], 4096)  # fmt: skip
    monkeypatch.delenv("NVTE_CPU_OFFLOAD_V1", raising=False)
    monkeypatch.setattr(megatron.core.utils, "is_te_min_version", lambda version: True)
    with pytest.raises(ValueError, match="Transformer Engine >= 2.10 needs NVTE_CPU_OFFLOAD_V1=1"):
        _check_device_features(cfg, one_rank_layout("cpu"), te=True)
    monkeypatch.setenv("NVTE_CPU_OFFLOAD_V1", "1")
    _check_device_features(cfg, one_rank_layout("cpu"), te=True)
    monkeypatch.setattr(megatron.core.utils, "is_te_min_version", lambda version: False)
    monkeypatch.delenv("NVTE_CPU_OFFLOAD_V1")
    _check_device_features(cfg, one_rank_layout("cpu"), te=True)  # an older TE: no variable needed
