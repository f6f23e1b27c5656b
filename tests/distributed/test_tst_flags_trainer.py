"""Every documented TST flag through ``pretrain_tst.py``: first-step loss against the oracle,
TP 1 against TP 2, and a resume.

For each flag a short run (3 superposition steps, then 2 recovery steps) trains at TP=1 (DP=2)
and at TP=2 (DP=1) in a world of two gloo ranks. Its first logged loss must equal the plain
reference's value (``tests/helpers/reference.py``) for the same global batch and initial weights: the
oracle reads the run's first rows from its data stream, builds the batch with the reference's
loops, takes the logits of the same model (layout-independent initial weights, in a world of
one) and applies the reference loss, in its per-position or per-slot (``--tst-layout paper``)
form. Then the TP=1 run resumed from its checkpoint at step 2 (inside the superposition
phase) must repeat its steps 3-5.

Tolerances: the first step to rel 2e-6 (measured up to 2e-7: fp32, the same model on other
batch shapes and vocabulary shards, reductions in another order), against a gap of 0.04-0.1
nats between the paper's loss form and ours where slots are empty; TP=2 against TP=1 over all
steps to rel 2e-4 (a few Adam steps amplify the differences); a resume under the same layout
to rel 1e-6.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import pretrain_tst
from tst.checkpointing import TRACKER

import reference as ref

BAG, SEQ = 4, 8
BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--untie-embeddings-and-output-weights", "--init-method-std", "0.2",
    "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
    "--train-iters", "5", "--lr", "3e-3", "--min-lr", "0", "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "1", "--adam-beta2", "0.95", "--weight-decay", "0.1",
    "--tst-bag-size", str(BAG), "--tst-iters", "3",
    "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--peak-tflops", "1",
]  # fmt: skip
# The flag (or pair) under test -> (the superposition phase's logged loss name, whether some
# positions lack target slots, where the paper's per-slot and our per-position forms differ).
CASES = {
    "input-only": (["--tst-mode", "input-only"], "lm", False),
    "output-only": (["--tst-mode", "output-only"], "mce", True),
    "output-only-paper": (["--tst-mode", "output-only", "--tst-layout", "paper"], "mce", True),
    "paper": (["--tst-layout", "paper"], "mce", True),
    "paper-power": (["--tst-layout", "paper", "--tst-slot-weights", "power"], "mce", True),
    "mce-alt": (["--tst-loss", "mce-alt"], "mce-alt", False),
    "power": (["--tst-slot-weights", "power"], "mce", False),
}
FIRST_STEP_REL, LAYOUT_REL, RESUME_REL = 2e-6, 2e-4, 1e-6


def _flag(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def _reference_batch(rows: torch.Tensor, mode: str, layout: str):
    """The batch a superposition step trains on, from the reference's loops."""
    if mode == "output-only":
        return ref.output_only_batch(rows, BAG)
    chunk = rows[:, : BAG * SEQ + 1] if layout == "paper" else rows
    if mode == "input-only":
        return ref.input_only_batch(chunk, BAG, layout)
    return ref.tst_batch(chunk, BAG, layout)


def _reference_loss(logits, targets, mask, argv) -> tuple[float, float]:
    """The run's loss of the global batch, and how far the MCE's two forms are apart on it."""
    weights = None
    if _flag(argv, "--tst-slot-weights", "uniform") == "power":
        weights = torch.tensor([1.0 / i for i in range(1, BAG + 1)])  # the paper's 1/i
    mce = ref.multi_hot_ce(logits, targets, slot_weights=weights)
    position_form = float((mce * mask).sum() / mask.sum())
    paper_form = float(ref.paper_multi_hot_ce(logits, targets, slot_weights=weights))
    gap = abs(paper_form - position_form)
    if _flag(argv, "--tst-loss", "mce") == "mce-alt":  # per position in either layout
        alt = ref.multi_hot_ce_alt(logits, targets, slot_weights=weights)
        return float((alt * mask).sum() / mask.sum()), gap
    if _flag(argv, "--tst-layout", "full") == "paper":
        return paper_form, gap
    return position_form, gap


def _oracle(argv: list[str]) -> tuple[float, float]:
    """The reference's first-step loss for ``argv`` (and the gap between the MCE's forms),
    computed in this process (a world of one) from the run's own first rows and weights."""
    from tst.model import apply_phase
    from tst.trainer import Trainer

    original, seen = Trainer.train, {}

    def first_step_reference(self) -> int:
        cfg = self.cfg
        phase = self.schedule.phase_at(0)
        micro = cfg.training.global_batch_size // cfg.training.micro_batch_size
        rows = torch.cat(
            [self.train_stream.next_micro_batch(phase.units_per_row) for _ in range(micro)]
        )
        inputs, targets, mask = _reference_batch(rows, cfg.tst.tst_mode, cfg.tst.tst_layout)
        apply_phase(self.model, phase)  # logits, no target loss
        positions = torch.arange(SEQ).expand(inputs.shape[0], -1)
        with torch.no_grad():
            logits = self.raw_chunks[0](inputs, positions, attention_mask=None)  # [b, L, V]
        seen["losses"] = _reference_loss(logits, targets, mask, argv)
        return 0

    Trainer.train = first_step_reference
    try:
        assert pretrain_tst.main(argv) == 0
    finally:
        Trainer.train = original
    return seen["losses"]


def _train(argv: list[str], metrics: str) -> list[dict]:
    import torch.distributed as dist

    assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    dist.barrier()
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss_name" in r]  # the training steps


def _close(got: list[dict], want: list[dict], rel: float, label: str) -> None:
    assert [(r["iteration"], r["loss_name"]) for r in got] == [
        (r["iteration"], r["loss_name"]) for r in want
    ], label
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=rel), f"{label}: {g} vs {w}"


@pytest.mark.parametrize("case", list(CASES))
def test_flag_through_the_trainer(world2, tmp_path, case):
    flags, loss_name, empty_slots = CASES[case]
    argv = BASE + flags
    want, gap = _oracle(argv)
    ckpt = str(tmp_path / "ckpt")
    tp1 = world2.run(_train, argv + ["--save", ckpt, "--save-interval", "2"],
                     str(tmp_path / "tp1.jsonl"))[0]  # fmt: skip
    tp2 = world2.run(_train, argv + ["--tensor-model-parallel-size", "2"],
                     str(tmp_path / "tp2.jsonl"))[0]  # fmt: skip
    assert [r["loss_name"] for r in tp1] == [loss_name] * 3 + ["lm"] * 2
    for name, run in (("TP1", tp1), ("TP2", tp2)):
        assert run[0]["loss"] == pytest.approx(want, rel=FIRST_STEP_REL), f"{case} {name}"
    if empty_slots:  # the check tells the paper's loss form from ours
        assert gap > 10 * FIRST_STEP_REL * want, (want, gap)
    _close(tp2, tp1, LAYOUT_REL, f"{case}: TP2 vs TP1")
    # Resume from the checkpoint at step 2 (the tracker names the newest; point it back).
    assert os.path.isdir(os.path.join(ckpt, "iter_0000002"))
    with open(os.path.join(ckpt, TRACKER), "w") as f:
        f.write("2")
    resumed = world2.run(_train, argv + ["--load", ckpt], str(tmp_path / "resumed.jsonl"))[0]
    _close(resumed, tp1[2:], RESUME_REL, f"{case}: resume at step 2")
