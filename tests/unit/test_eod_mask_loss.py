"""--eod-mask-loss (Megatron-LM's): the token after each end-of-document token is no target.

Megatron-LM's GPT dataset zeroes the loss mask where the *input* token is EOD, so in
next-token training the first token of each next document is never predicted. Here the
same rule holds in every phase, written per raw token: a bag target loses exactly the slots
of tokens that follow an EOD in the row. Checked against targets built here by index from
the rows (next-token: Megatron-LM's mask itself), for every phase kind and layout, and
through pretrain_tst.main (mock documents end in EOD): the trainer's batches drop those
slots in both phases and in evaluation, and the run's losses change.
"""

from __future__ import annotations

import pytest
import torch

from tst.data.batch import FULL_BAG, PAPER, batch_for_phase
from tst.phases import Phase

EOD, IGNORE = 0, -100


def _rows(bag: int, seq: int) -> torch.Tensor:
    """Two rows of ``bag * (seq + 1)`` tokens with EOD at a few places (one row ending a
    document mid-bag, one with two EODs in a row)."""
    n = bag * (seq + 1)
    rows = torch.arange(1, 2 * n + 1).view(2, n) % 50 + 1
    rows[0, [3, n // 2 + 1]] = EOD
    rows[1, [1, 2, n - 2]] = EOD
    return rows


def _phase(**kw) -> Phase:
    base = dict(name="superposition", stage=0, start=0, end=10, input_bag=4, target_bag=4,
                loss="mce", layout=FULL_BAG, units_per_row=4)  # fmt: skip
    return Phase(**{**base, **kw})


def _want(rows, phase, plain):
    """The plain batch's targets with each slot whose raw token follows an EOD ignored:
    position j, slot k of a bag phase is raw token (j + 1) * bag + k (full layout and
    input-only) or j + 1 + k (output-only)."""
    targets = plain.targets.clone()
    b, positions, slots = targets.shape
    bag = phase.input_bag
    for r in range(b):
        for j in range(positions):
            for k in range(slots):
                t = j + 1 + k if bag == 1 else (j + 1) * bag + k
                if t < rows.shape[1] and rows[r, t - 1] == EOD:
                    targets[r, j, k] = IGNORE
    return targets


@pytest.mark.parametrize(
    "kind",
    ["recovery", "full", "paper", "output-only", "input-only"],
)
def test_the_token_after_each_eod_is_no_target(kind):
    seq = 5
    phase = {
        "recovery": _phase(name="recovery", input_bag=1, target_bag=1, loss="lm", units_per_row=1),
        "full": _phase(),
        "paper": _phase(layout=PAPER),
        "output-only": _phase(input_bag=1, target_bag=4, units_per_row=1),
        "input-only": _phase(target_bag=1),
    }[kind]
    rows = _rows(phase.units_per_row, seq)
    plain = batch_for_phase(rows, phase)
    masked = batch_for_phase(rows, phase, eod=EOD)
    assert torch.equal(masked.input_ids, plain.input_ids)
    want = _want(rows if kind != "paper" else rows[:, : 4 * seq + 1], phase, plain)
    assert torch.equal(masked.targets, want)
    assert torch.equal(masked.loss_mask, (want != IGNORE).any(-1).float())
    assert (masked.targets == IGNORE).sum() > (plain.targets == IGNORE).sum()
    if kind == "recovery":  # Megatron-LM's own mask: zero where the input token is EOD
        megatron = (plain.input_ids != EOD).float()
        assert torch.equal(masked.loss_mask, megatron * plain.loss_mask)


def test_through_the_trainer_in_both_phases_and_evaluation(monkeypatch, tmp_path):
    """The flag reaches every batch the trainer builds (training in both phases, the
    validation split), with the tokenizer's EOD; the run's losses differ from the plain
    run's once an EOD has been read."""
    import json
    import sys
    from pathlib import Path

    import pretrain_tst
    from tst import trainer as trainer_module

    sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
    import fault_injection

    seen = []
    real = trainer_module.Trainer._batch

    def spy(self, chunk, phase):
        batch = real(self, chunk, phase)
        follows = (chunk[:, :-1] == self.tokenizer.eod).sum().item()
        seen.append((phase.name, self.cfg.data.eod_mask_loss, follows,
                     int((batch.targets == IGNORE).sum())))  # fmt: skip
        return batch

    monkeypatch.setattr(trainer_module.Trainer, "_batch", spy)
    argv = [*fault_injection.ARGS, "--train-iters", "8", "--eval-interval", "4"]
    losses = {}
    for flag in ([], ["--eod-mask-loss"]):
        metrics = str(tmp_path / f"eod_mask_{bool(flag)}.jsonl")
        assert pretrain_tst.main([*argv, *flag, "--metrics-file", metrics]) == 0
        with open(metrics) as f:
            losses[bool(flag)] = [r["loss"] for r in map(json.loads, f) if r.get("loss")]
    on = [row for row in seen if row[1]]
    off = [row for row in seen if not row[1]]
    assert {name for name, *_ in on} == {"superposition", "recovery"}
    assert sum(f for _, _, f, _ in on) > 0  # the mock documents' EODs were read
    # With the flag, each batch ignores more slots wherever an EOD had a successor.
    assert all(i_on >= i_off for (_, _, _, i_on), (_, _, _, i_off) in zip(on, off, strict=True))
    assert sum(i for *_, i in on) > sum(i for *_, i in off)
    assert losses[True] != losses[False]
