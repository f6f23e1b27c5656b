"""``--tst-restart-schedule-at-switch``: a fresh optimizer and LR schedule for the recovery phase.

One process, mock data, a tiny untied GPT: 2 superposition steps, then 4 recovery steps, with a
one-step warm-up and cosine decay. The LR each step uses is read from the optimizer just before
the step and compared with the schedule worked out by hand (Megatron-LM's: the LR of a step
is the schedule at the samples read before it, so the first step of a warm-up uses the initial
LR). A run stopped inside the recovery phase (or at the switch) and resumed repeats the
uninterrupted run: LRs exactly, losses to rel 1e-6 (the same computation; tests/distributed/test_trainer.py
states the resume tolerance).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import pretrain_tst

SWITCH, ITERS, WARMUP = 2, 6, 1
LR, MIN_LR = 1e-2, 1e-3
BASE = [
    "--mock-data", "--vocab-size", "384", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--untie-embeddings-and-output-weights",
    "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", str(ITERS),
    "--lr", str(LR), "--min-lr", str(MIN_LR), "--lr-decay-style", "cosine",
    "--lr-warmup-iters", str(WARMUP), "--lr-warmup-init", "0",
    "--adam-beta2", "0.95", "--weight-decay", "0.1",
    "--tst-bag-size", "3", "--tst-iters", str(SWITCH),
    "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1", "--peak-tflops", "1",
]  # fmt: skip
RESTART = ["--tst-restart-schedule-at-switch"]


def cosine_schedule_lr(step: int, length: int) -> float:
    """The LR of the ``step``-th step (0-based) of a schedule of ``length`` steps: linear
    warm-up from 0 over WARMUP steps, then cosine from LR to MIN_LR at ``length``."""
    if step <= WARMUP:
        return LR * step / WARMUP
    progress = (step - WARMUP) / (length - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def _adam_state(trainer) -> list[dict]:
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        for opt in inner
        for state in opt.optimizer.state.values()
    ]


def _train(argv: list[str], metrics: str) -> dict:
    """Run ``argv`` in this process; record the LR each step used and the Adam state around
    the switch controls, and read the metrics."""
    from tst.trainer import Trainer

    seen: dict = {"lrs": [], "calls": []}
    train_step, apply = Trainer.train_step, Trainer.apply_switch_controls

    def spy_step(self, phase):
        seen["lrs"].append(self.optimizer.param_groups[0]["lr"])  # what this step uses
        return train_step(self, phase)

    def spy_apply(self):
        seen["calls"].append(self.iteration)
        seen["adam_before"] = _adam_state(self)
        apply(self)
        seen["adam_after"] = _adam_state(self)

    Trainer.train_step, Trainer.apply_switch_controls = spy_step, spy_apply
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        Trainer.train_step, Trainer.apply_switch_controls = train_step, apply
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    seen["steps"] = [r for r in records if "loss_name" in r]
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("restart")
    return {
        "kept": _train(BASE, str(tmp / "kept.jsonl")),
        "restart": _train(BASE + RESTART, str(tmp / "restart.jsonl")),
    }


def test_lr_per_step_is_the_hand_computed_schedule(runs):
    kept = [cosine_schedule_lr(i, ITERS) for i in range(ITERS)]
    restarted = kept[:SWITCH] + [cosine_schedule_lr(j, ITERS - SWITCH) for j in range(4)]
    # One schedule over the run: 0, 1e-2, then cosine over steps 2..5 of 6.
    assert runs["kept"]["lrs"] == pytest.approx(kept, rel=1e-12, abs=0)
    # Restarted at the switch: the recovery phase warms up again from 0 and decays over its
    # own 4 steps: 0, 1e-2, cos(pi/3), cos(2 pi/3) between 1e-2 and 1e-3.
    assert runs["restart"]["lrs"] == pytest.approx(restarted, rel=1e-12, abs=0)
    assert restarted[SWITCH:] == pytest.approx([0.0, LR, 7.75e-3, 3.25e-3], rel=1e-12)
    # The logged LR (the next step's) ends at the floor in both.
    assert runs["restart"]["steps"][-1]["lr"] == pytest.approx(MIN_LR, rel=1e-12)


def test_restart_also_starts_adam_afresh(runs):
    seen = runs["restart"]
    assert seen["calls"] == [SWITCH]
    moments = [s[k] for s in seen["adam_after"] for k in ("exp_avg", "exp_avg_sq") if k in s]
    assert moments and all(not m.any() for m in moments)
    assert {int(s["step"]) for s in seen["adam_after"] if "step" in s} == {0}
    assert any(m.any() for s in seen["adam_before"] for m in (s["exp_avg"],))  # it had learned
    # Without the flag, the superposition phase's Adam state carries over.
    kept = runs["kept"]
    assert all(
        torch.equal(a["exp_avg"], b["exp_avg"])
        for a, b in zip(kept["adam_before"], kept["adam_after"], strict=True)
    )


@pytest.mark.parametrize("stop", [SWITCH, 4])
def test_resume_continues_the_restarted_schedule_exactly(runs, tmp_path, stop):
    """Stopped at the switch (the restart happens after the resume) or inside the recovery
    phase (the checkpoint holds the restarted schedule), the run goes on as if unbroken."""
    want = runs["restart"]["steps"]
    ckpt = str(tmp_path / "ckpt")
    first = _train(BASE + RESTART + ["--save", ckpt, "--exit-interval", str(stop)],
                   str(tmp_path / "a.jsonl"))  # fmt: skip
    second = _train(BASE + RESTART + ["--load", ckpt], str(tmp_path / "b.jsonl"))
    assert first["lrs"] + second["lrs"] == runs["restart"]["lrs"]
    got = first["steps"] + second["steps"]
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want]
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g, w)


def test_a_warm_up_longer_than_the_recovery_phase_is_refused(tmp_path):
    argv = BASE + RESTART + ["--lr-warmup-iters", str(ITERS - SWITCH)]
    with pytest.raises(ValueError, match="--tst-restart-schedule-at-switch restarts the LR"):
        pretrain_tst.main(argv + ["--metrics-file", str(tmp_path / "m.jsonl")])


def test_restart_needs_a_switch():
    from tst.config import parse_args

    with pytest.raises(
        ValueError, match="--tst-restart-schedule-at-switch need --tst-bag-size > 1"
    ):
        parse_args(BASE + RESTART + ["--tst-bag-size", "1"])  # the last value wins
