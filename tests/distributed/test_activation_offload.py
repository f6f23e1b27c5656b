"""``--fine-grained-activation-offloading`` (megatron-core's fine-grained activation
offloading) through pretrain_tst.main: the same model trained, with the named modules'
saved inputs moved to host memory and back.

On this machine host and device are one memory, but megatron-core's whole machinery runs:
the saved-tensor hooks, the copies into its (unpinned here) host pool and back, the storage
released after each group's copy, the per-chunk bookkeeping across micro-batches and
virtual pipeline stages, and the warm-up step that plans it. Offloading changes no value,
only strides (a reloaded tensor is a contiguous copy, so a backward may round differently):
the losses, validation losses and gradient and parameter norms must equal the plain run's
within rel 1e-6 (measured: 0 to 4e-8) through the superposition -> recovery switch, with
evaluations between steps (which, unpaused, broke the next step's backward), at PP 2 x
VPP 2, for MoE at EP 2 with MLA, MTP and selective recomputation (Megatron-LM's
functional test's mix), under the combined 1F1B schedule of
--overlap-moe-expert-parallel-comm, and under FSDP2; each dense module must actually have offloaded bytes on
every rank.
"""

from __future__ import annotations

import pytest
from test_torch_fsdp2 import BASE

KEYS = ("loss", "grad_norm", "params_norm")
DENSE = ["attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm"]
# Every tensor counts (these models' activations are far below megatron-core's 1 M default).
OFFLOAD = ["--fine-grained-activation-offloading", "--min-offloaded-tensor-size", "1",
           "--offload-modules"]  # fmt: skip


def _run(argv: list[str], metrics: str) -> tuple[dict, dict]:
    """The run's records (KEYS by iteration, validation losses) and megatron-core's
    offload summary of this rank (bytes per module, planned at the first step)."""
    from megatron.core.pipeline_parallel.fine_grained_activation_offload import (
        PipelineOffloadManager,
    )
    from trainer_runs import main_records

    records = main_records(argv, metrics)
    train = {r["iteration"]: tuple(r.get(k) for k in KEYS) for r in records
             if r.get("loss") is not None and "grad_norm" in r}  # fmt: skip
    valid = {r["iteration"]: r["val_loss"] for r in records if "val_loss" in r}
    offloaded = {}
    if "--fine-grained-activation-offloading" in argv:
        offloaded = PipelineOffloadManager.get_instance().offload_summary_bytes
    return {"train": train, "valid": valid}, offloaded


def _assert_same_model(got: dict, want: dict, label: str) -> None:
    assert sorted(got["train"]) == sorted(want["train"]) and got["train"], label
    assert sorted(got["valid"]) == sorted(want["valid"]) and got["valid"], label
    for step, values in want["train"].items():
        assert got["train"][step] == pytest.approx(values, rel=1e-6), f"{label}: step {step}"
    for step, loss in want["valid"].items():
        assert got["valid"][step] == pytest.approx(loss, rel=1e-6), f"{label}: eval {step}"


def test_dense_offload_at_pp2_vpp2_trains_the_same_model(world2, tmp_path):
    argv = BASE + ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
                   "--num-layers-per-virtual-pipeline-stage", "1", "--eval-interval", "1",
                   "--train-iters", "5", "--tst-iters", "2"]  # fmt: skip
    want = world2.run(_run, argv, str(tmp_path / "want.jsonl"))[0][0]
    results = world2.run(_run, argv + OFFLOAD + DENSE, str(tmp_path / "got.jsonl"))
    _assert_same_model(results[0][0], want, "PP2 x VPP2")
    for rank, (_, offloaded) in enumerate(results):
        assert set(offloaded) == set(DENSE), rank
        assert all(n > 0 for n in offloaded.values()), (rank, offloaded)


def test_moe_mla_mtp_offload_with_recomputation_trains_the_same_model(world2, tmp_path):
    """The shape of Megatron-LM's functional test gpt3_moe_..._fine_grained_offloading:
    MLA, MTP, a dense first layer then MoE layers (shared expert, all-to-all over EP 2),
    selective recomputation of layernorm / mla_up_proj / mlp / moe_act, all seven modules
    offloaded (expert_fc1 and moe_act are TE's grouped experts' only: warned, skipped)."""
    moe = ["--num-layers", "3", "--num-experts", "4", "--moe-router-topk", "2",
           "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
           "--moe-layer-freq", "[0,1,1]", "--moe-ffn-hidden-size", "16",
           "--moe-shared-expert-intermediate-size", "16", "--multi-latent-attention",
           "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
           "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--mtp-num-layers", "1",
           "--recompute-granularity", "selective", "--recompute-modules", "layernorm",
           "mla_up_proj", "mlp", "moe_act"]  # fmt: skip
    argv = BASE + moe
    want = world2.run(_run, argv, str(tmp_path / "want.jsonl"))[0][0]
    with pytest.warns(UserWarning, match="--offload-modules expert_fc1 moe_act: only "
                      "grouped-GEMM experts"):  # fmt: skip
        from tst.config import parse_args
        from tst.megatron_config import _warn_offload_modules_without_effect

        cfg = parse_args(argv + OFFLOAD + ["expert_fc1", "moe_act", *DENSE])
        _warn_offload_modules_without_effect(cfg.parallel.offload_modules, False, cfg.model)
    results = world2.run(_run, argv + OFFLOAD + ["expert_fc1", "moe_act", *DENSE],
                         str(tmp_path / "got.jsonl"))  # fmt: skip
    _assert_same_model(results[0][0], want, "MoE + MLA + MTP")
    for rank, (_, offloaded) in enumerate(results):
        assert {"qkv_linear", "core_attn", "attn_proj"} <= set(offloaded), (rank, offloaded)
        assert all(n > 0 for n in offloaded.values()), (rank, offloaded)


def _dense_offload_trains_the_same_model(world2, tmp_path, argv: list[str], label: str):
    """``argv`` with the dense modules offloaded trains ``argv``'s model, every rank having
    offloaded inputs of each of them."""
    want = world2.run(_run, argv, str(tmp_path / "want.jsonl"))[0][0]
    results = world2.run(_run, argv + OFFLOAD + DENSE, str(tmp_path / "got.jsonl"))
    _assert_same_model(results[0][0], want, label)
    for rank, (_, offloaded) in enumerate(results):
        assert set(offloaded) == set(DENSE) and all(offloaded.values()), (rank, offloaded)


def test_offload_with_expert_parallel_comm_overlap_trains_the_same_model(world2, tmp_path):
    """megatron-core's combined 1F1B schedule (--overlap-moe-expert-parallel-comm, EP 2,
    bf16) resets the offload manager on its own path: the same model as without it."""
    argv = BASE + ["--num-experts", "4", "--expert-model-parallel-size", "2", "--bf16",
                   "--overlap-moe-expert-parallel-comm", "--moe-token-dispatcher-type",
                   "alltoall", "--moe-ffn-hidden-size", "16"]  # fmt: skip
    _dense_offload_trains_the_same_model(world2, tmp_path, argv, "combined 1F1B")


def test_offload_under_torch_fsdp2_trains_the_same_model(world2, tmp_path):
    """PyTorch FSDP2 (DP 2) gathers each layer's weights for its forward: the offload hooks
    move only activations (megatron-core marks the parameters not offloadable)."""
    _dense_offload_trains_the_same_model(world2, tmp_path, BASE + ["--use-torch-fsdp2"], "FSDP2")


def test_at_the_default_minimum_size_these_small_tensors_stay(world2, tmp_path):
    """--min-offloaded-tensor-size at its default (1,048,576 elements, Megatron-LM's): every
    tensor of this small model is below it, so nothing is offloaded and the model is the
    plain run's."""
    want = world2.run(_run, BASE, str(tmp_path / "want.jsonl"))[0][0]
    argv = BASE + ["--fine-grained-activation-offloading", "--offload-modules", *DENSE]
    results = world2.run(_run, argv, str(tmp_path / "got.jsonl"))
    _assert_same_model(results[0][0], want, "default size")
    for rank, (_, offloaded) in enumerate(results):
        assert not any(offloaded.values()), (rank, offloaded)
