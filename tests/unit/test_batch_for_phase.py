"""``phase_at`` and ``batch_for_phase``: every phase's batch equals the plain reference's.

The rows are what ``SampleStream`` serves a phase: ``units_per_row`` units of ``L + 1`` tokens.
All comparisons are exact (integer tensors and 0/1 masks).
"""

from __future__ import annotations

import pytest
import torch

from tst.data.batch import batch_for_phase
from tst.phases import RECOVERY, SUPERPOSITION, PhaseSchedule

import reference as ref

SEQ, ROWS, VOCAB = 8, 3, 1000


def _rows(phase, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (ROWS, phase.units_per_row * (SEQ + 1)), generator=gen)


def _assert_batch(got, want_inputs, want_targets, want_mask):
    assert torch.equal(got.input_ids, want_inputs)
    assert torch.equal(got.targets, want_targets)
    assert torch.equal(got.loss_mask, want_mask)
    assert got.input_ids.dtype == got.targets.dtype == torch.int64


@pytest.mark.parametrize("mode", ["full", "input-only", "output-only"])
def test_phase_at_is_the_table(mode):
    schedule = PhaseSchedule.build(10, 4, 3, None, mode, "mce-alt", "paper")
    first, second = schedule.phases
    assert schedule.switch_iteration == 3
    for i in range(10):
        phase = schedule.phase_at(i)
        assert phase is (first if i < 3 else second)
    assert (first.name, first.start, first.end) == (SUPERPOSITION, 0, 3)
    assert (second.name, second.start, second.end, second.steps) == (RECOVERY, 3, 10, 7)
    want = {"full": (4, 4), "input-only": (4, 1), "output-only": (1, 4)}[mode]
    assert (first.input_bag, first.target_bag) == want
    assert first.units_per_row == want[0]  # a row reads one unit per averaged input token
    assert first.loss == ("lm" if want[1] == 1 else "mce-alt")
    assert first.layout == "paper"
    assert (second.input_bag, second.target_bag, second.loss, second.units_per_row) == (
        1, 1, "lm", 1,
    )  # fmt: skip
    for outside in (-1, 10):
        with pytest.raises(ValueError, match="outside the schedule"):
            schedule.phase_at(outside)


def test_phase_at_edges():
    # --tst-fraction 0.3 of 10 steps; bag size 1 and --tst-iters 0 have no superposition;
    # --tst-iters equal to the run has no recovery.
    assert PhaseSchedule.build(10, 4, None, 0.3).switch_iteration == 3
    assert PhaseSchedule.build(10, 4, None, None).switch_iteration == 3  # the paper's 0.3
    for schedule in (PhaseSchedule.build(10, 1, 5, None), PhaseSchedule.build(10, 4, 0, None)):
        assert [p.name for p in schedule.phases] == [RECOVERY]
        assert schedule.phase_at(0) is schedule.phase_at(9)
    only = PhaseSchedule.build(10, 4, 10, None)
    assert [p.name for p in only.phases] == [SUPERPOSITION]
    assert only.phase_at(9).name == SUPERPOSITION


@pytest.mark.parametrize("layout", ["full", "paper"])
@pytest.mark.parametrize("bag_size", [2, 3, 6])
def test_superposition_batch(layout, bag_size):
    phase = PhaseSchedule.build(10, bag_size, 3, None, "full", "mce", layout).phase_at(0)
    rows = _rows(phase, bag_size)
    chunk = rows if layout == "full" else rows[:, : bag_size * SEQ + 1]
    got = batch_for_phase(rows, phase)
    _assert_batch(got, *ref.tst_batch(chunk, bag_size, layout))
    assert got.targets.shape == (ROWS, SEQ, bag_size)
    if layout == "paper":  # the last position has one valid slot, as the paper builds it
        assert (got.targets[:, -1, 1:] == -100).all() and (got.targets[:, :-1] >= 0).all()


@pytest.mark.parametrize("layout", ["full", "paper"])
def test_input_only_batch(layout):
    phase = PhaseSchedule.build(10, 4, 3, None, "input-only", "mce", layout).phase_at(0)
    rows = _rows(phase, 1)
    chunk = rows if layout == "full" else rows[:, : 4 * SEQ + 1]
    got = batch_for_phase(rows, phase)
    _assert_batch(got, *ref.input_only_batch(chunk, 4, layout))
    assert got.targets.shape == (ROWS, SEQ, 1) and got.loss_mask.all()


@pytest.mark.parametrize("layout", ["full", "paper"])
def test_output_only_batch(layout):
    phase = PhaseSchedule.build(10, 4, 3, None, "output-only", "mce", layout).phase_at(0)
    rows = _rows(phase, 2)
    assert rows.shape[1] == SEQ + 1  # output-only reads no more than a recovery row
    _assert_batch(batch_for_phase(rows, phase), *ref.output_only_batch(rows, 4))


@pytest.mark.parametrize("layout", ["full", "paper"])
def test_recovery_batch_is_next_token(layout):
    phase = PhaseSchedule.build(10, 4, 3, None, "full", "mce", layout).phase_at(5)
    rows = _rows(phase, 3)
    _assert_batch(
        batch_for_phase(rows, phase), rows[:, :SEQ], rows[:, 1:, None], torch.ones(3, SEQ)
    )


def test_rows_of_the_wrong_width_are_refused():
    phase = PhaseSchedule.build(10, 4, 3, None).phase_at(0)
    with pytest.raises(ValueError, match="units_per_row = 4"):
        batch_for_phase(torch.zeros(2, 4 * (SEQ + 1) + 1, dtype=torch.long), phase)
    with pytest.raises(ValueError, match=r"\[batch, units_per_row"):
        batch_for_phase(torch.zeros(4 * (SEQ + 1), dtype=torch.long), phase)
