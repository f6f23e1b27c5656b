"""``--optimizer-cpu-offload`` (megatron-core's ``HybridDeviceOptimizer``) through
pretrain_tst.main: the distributed optimizer's training, with the optimizer state stepped
apart.

On this machine the model's tensors play the GPU's part: the offloaded share of the
parameters gets copies of its own, stepped by torch's AdamW and written back after each step,
the rest is stepped in place, as on a GPU (``tst.cpu_compat``). The same Adam on the same
gradients, so across the superposition -> recovery switch the losses, gradient norms and
parameter norms and zero counts must equal the distributed optimizer's (rel 1e-6: torch's fused and
for-each AdamW round alike here, but need not), in fp32 and bf16, all offloaded and half
(with ``--overlap-cpu-optimizer-d2h-h2d``'s one optimizer per parameter). A checkpoint saved
with the offload resumes exactly with it, and the two kinds of checkpoints load into each
other (the same entries: main weights, moments, the step); a fine-tune's load and the
switch's re-drawn embeddings reach the offloaded copies. MoE at PP 2 x VPP 2 x EP 2 puts
two hybrid optimizers in megatron-core's chain (dense and expert parts), saved in the fully
reshardable format.
"""

from __future__ import annotations

import pytest
from test_torch_fsdp2 import BASE as FSDP2_BASE

# The FSDP2 tests' small model (two layers, SwiGLU, untied; both phases, validation every
# two steps), with the distributed optimizer the offload works inside.
BASE = FSDP2_BASE + ["--use-distributed-optimizer"]
OFFLOAD = ["--optimizer-cpu-offload", "--use-precision-aware-optimizer"]
HALF = OFFLOAD + ["--optimizer-offload-fraction", "0.5", "--overlap-cpu-optimizer-d2h-h2d"]
KEYS = ("loss", "grad_norm", "params_norm", "num_zeros_in_grad")


def _run(argv: list[str], metrics: str) -> dict:
    """The run's training records (KEYS by iteration) and validation losses."""
    from trainer_runs import main_records

    records = main_records(argv, metrics)
    train = {r["iteration"]: {k: r.get(k) for k in KEYS} for r in records
             if r.get("loss") is not None and "grad_norm" in r}  # fmt: skip
    valid = {r["iteration"]: r["val_loss"] for r in records if "val_loss" in r}
    return {"train": train, "valid": valid}


def _same(got: dict, want: dict, rel: float = 1e-6, start: int = 1) -> None:
    """``got`` equals ``want`` from iteration ``start`` on (a resumed run has only those)."""
    train = {i: r for i, r in want["train"].items() if i >= start}
    assert got["train"].keys() == train.keys() and train
    for step, w in train.items():
        for key in KEYS:
            g = got["train"][step][key]
            assert abs(g - w[key]) <= rel * abs(w[key]), (step, key, g, w[key])
    valid = {i: v for i, v in want["valid"].items() if i > start - 1}
    assert got["valid"].keys() == valid.keys() and valid
    for step, w in valid.items():
        assert abs(got["valid"][step] - w) <= rel * abs(w), (step, got["valid"], valid)


@pytest.mark.parametrize("dtype", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_offload_trains_and_resumes_as_the_distributed_optimizer(world2, tmp_path, dtype):
    save = ["--save-interval", "2"]  # the runs go on to the end; each keeps iteration 2

    def load(folder):
        return ["--load", str(tmp_path / folder), "--ckpt-step", "2"]

    def run(argv, tag):
        return world2.run(_run, BASE + dtype + argv, str(tmp_path / f"{tag}.jsonl"))[0]

    plain = run(save + ["--save", str(tmp_path / "plain")], "plain")
    for flags, tag in ((OFFLOAD, "all"), (HALF, "half")):
        trained = run(flags + save + ["--save", str(tmp_path / tag)], tag)
        _same(trained, plain)
        # Resumed with the offload, from its own checkpoint: exactly the unbroken run.
        resumed = run(flags + load(tag), f"{tag}-resumed")
        _same(resumed, trained, rel=0.0, start=3)
    # The two kinds of checkpoints load into each other.
    _same(run(load("half"), "half-to-plain"), plain, start=3)
    _same(run(HALF + load("plain"), "plain-to-half"), plain, start=3)
    # Weights changed outside the optimizer (a fine-tune's load; the switch's re-drawn
    # embeddings) reach the offloaded copies as they reach the distributed optimizer's.
    for extra, tag in ((load("plain") + ["--finetune"], "finetune"),
                       (["--tst-reinit-embeddings-at-switch"], "reinit")):  # fmt: skip
        _same(run(HALF + extra, f"{tag}-half"), run(extra, f"{tag}-plain"))
    if dtype:
        # --main-grads-dtype bf16 reduces the gradients in bf16 (Megatron-LM's rule: no fp32
        # accumulation), as --grad-reduce-in-bf16 does for the plain optimizer: the same
        # training. The precision-aware path takes the gradient norm of the bf16 gradients
        # themselves (a bf16 sum of squares), the plain one of fp32 copies: close (rel 1e-2,
        # measured 3e-3), not equal; the losses and weights are equal, and
        # without clipping (which would carry that rounding into the updates).
        got = run(HALF + ["--main-grads-dtype", "bf16", "--clip-grad", "0"], "bf16-grads-half")
        want = run(["--grad-reduce-in-bf16", "--clip-grad", "0"], "bf16-grads-plain")
        assert got["train"].keys() == want["train"].keys() and got["valid"] == want["valid"]
        for step, w in want["train"].items():
            g = got["train"][step]
            assert g["loss"] == w["loss"], (step, g, w)
            assert abs(g["params_norm"] - w["params_norm"]) <= 1e-6 * w["params_norm"], (step, g, w)
            assert abs(g["grad_norm"] - w["grad_norm"]) <= 1e-2 * w["grad_norm"], (step, g, w)


def test_offload_with_experts_and_virtual_pipeline(world4, tmp_path):
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2",
           "--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
           "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1",
           "--bf16"]  # fmt: skip
    # Pinning needs a GPU: on this machine the flags are taken and change nothing.
    # --use-torch-optimizer-for-cpu-offload changes nothing in megatron-core 0.16.1 (warned).
    offload = OFFLOAD + ["--optimizer-offload-fraction", "0.3", "--no-pin-cpu-grads",
                         "--no-pin-cpu-params", "--use-torch-optimizer-for-cpu-offload"]  # fmt: skip
    # Saved fully reshardable: the hybrid optimizer's param groups (which name its optimizer
    # classes) go into the common state, read back by torch's weights_only loader.
    offload += ["--dist-ckpt-optim-fully-reshardable"]
    ckpt = str(tmp_path / "ckpt")
    plain = world4.run(_run, BASE + moe, str(tmp_path / "a.jsonl"))[0]
    trained = world4.run(_run, BASE + moe + offload + ["--save", ckpt, "--save-interval", "2"],
                         str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    _same(trained, plain)
    resumed = world4.run(_run, BASE + moe + offload + ["--load", ckpt, "--ckpt-step", "2"],
                         str(tmp_path / "c.jsonl"))  # fmt: skip
    _same(resumed[0], trained, rel=0.0, start=3)
