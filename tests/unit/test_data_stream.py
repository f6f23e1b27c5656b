"""SampleStream: the data position across the phase switch, resumes, DP ranks and epochs.

The fake dataset's tokens encode their own position (big sample ``i`` holds tokens
``i * S .. (i + 1) * S - 1``), so every row says exactly which units it read.
"""

from __future__ import annotations

import logging

import pytest
import torch
from data_support import write_positional_dataset

from tst.data.stream import SampleStream, big_samples_needed

L = 3
B = 4  # the superposition bag size the big samples are cut for
UNIT = L + 1


class PositionDataset:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        size = B * UNIT
        return {"tokens": torch.arange(i * size, (i + 1) * size)}


def units_of(rows: torch.Tensor) -> list[int]:
    """The units a batch of rows read, in order; checks each row is whole consecutive units."""
    out = []
    for row in rows.tolist():
        assert row == list(range(row[0], row[0] + len(row)))  # contiguous raw tokens
        assert row[0] % UNIT == 0 and len(row) % UNIT == 0
        out += [row[0] // UNIT + k for k in range(len(row) // UNIT)]
    return out


def run(stream: SampleStream, schedule: list[int]) -> list[int]:
    units = []
    for bag in schedule:
        units += units_of(stream.next_micro_batch(bag))
    return units


def test_switch_from_superposition_to_recovery_continues_the_data():
    stream = SampleStream(PositionDataset(100), L, B, micro_batch_size=2, dp_rank=0, dp_size=1)
    phase1 = run(stream, [B] * 3)
    assert stream.consumed_units == 3 * 2 * B
    phase2 = run(stream, [1] * 5)
    # Superposition rows are whole big samples 0..5; recovery rows then read unit by unit
    # from big sample 6 on: nothing read twice, nothing skipped.
    assert phase1 == list(range(24))
    assert phase2 == list(range(24, 34))
    assert stream.consumed_raw_tokens == 34 * UNIT
    assert stream.next_micro_batch(B).shape == (2, B * UNIT)
    assert stream.next_micro_batch(2).shape == (2, 2 * UNIT)


@pytest.mark.parametrize("schedule_split", [2, 5, 9])
def test_resume_continues_exactly(schedule_split):
    schedule = [B] * 4 + [1] * 7 + [2] * 2
    whole = run(SampleStream(PositionDataset(100), L, B, 3, 0, 1), schedule)
    first = SampleStream(PositionDataset(100), L, B, 3, 0, 1)
    before = run(first, schedule[:schedule_split])
    state = first.state_dict()
    resumed = SampleStream(PositionDataset(100), L, B, 3, 0, 1)
    resumed.load_state_dict(state)
    after = run(resumed, schedule[schedule_split:])
    assert before + after == whole
    assert len(set(whole)) == len(whole)
    ctor = SampleStream(PositionDataset(100), L, B, 3, 0, 1, consumed_units=state["consumed_units"])
    assert run(ctor, schedule[schedule_split:]) == after


def test_data_parallel_ranks_split_the_global_rows():
    schedule = [B] * 3 + [1] * 4
    single = SampleStream(PositionDataset(100), L, B, micro_batch_size=4, dp_rank=0, dp_size=1)
    ranks = [SampleStream(PositionDataset(100), L, B, 2, d, 2) for d in range(2)]
    for bag in schedule:
        rows1 = single.next_micro_batch(bag)
        rows2 = [r.next_micro_batch(bag) for r in ranks]
        # Megatron's rule: rank d takes global rows [d * mbs, (d + 1) * mbs).
        assert torch.equal(torch.cat(rows2), rows1)
        assert not set(units_of(rows2[0])) & set(units_of(rows2[1]))
    assert single.consumed_units == ranks[0].consumed_units == ranks[1].consumed_units


def test_epoch_wrap_is_logged(caplog):
    stream = SampleStream(PositionDataset(3), L, B, 1, 0, 1)
    with caplog.at_level(logging.INFO, logger="tst.data.stream"):
        units = run(stream, [B] * 4)
    assert units[12:] == list(range(4))  # big sample 0 again
    assert stream.epoch == 1
    assert "starting epoch 2" in caplog.text


def test_switching_up_realigns_and_logs(caplog):
    stream = SampleStream(PositionDataset(100), L, B, 1, 0, 1)
    with caplog.at_level(logging.WARNING, logger="tst.data.stream"):
        units = run(stream, [1, 1, 1, B])
    assert units == [0, 1, 2, 4, 5, 6, 7]  # unit 3 skipped so the bag-4 row is one big sample
    assert "skipping 1 unit" in caplog.text
    assert stream.consumed_raw_tokens == 7 * UNIT  # skipped units are not counted as served


def test_bad_bag_size_and_mismatched_state():
    stream = SampleStream(PositionDataset(10), L, B, 1, 0, 1)
    with pytest.raises(ValueError, match="must divide"):
        stream.next_micro_batch(3)
    other = SampleStream(PositionDataset(10), L, 2, 1, 0, 1)
    with pytest.raises(ValueError, match="max_bag_size=4"):
        other.load_state_dict(stream.state_dict())


def test_big_samples_needed():
    assert big_samples_needed([(10, 4), (6, 1)], 4) == 12  # 40 + 6 units -> 11.5
    assert big_samples_needed([(10, 1)], 1) == 10


def test_with_real_datasets_no_raw_token_twice(tmp_path):
    from tst.data.datasets import DataConfig, build_datasets

    prefix = str(tmp_path / "pos")
    write_positional_dataset(prefix, [37] * 50)  # distinct ids 1..1850
    cfg = DataConfig(
        data_path=[prefix],
        split="1,0,0",
        seq_length=L,
        bag_size=B,
        vocab_size=4000,
        eod_id=0,
        cache_dir=str(tmp_path / "cache"),
    )
    train, _, _ = build_datasets(cfg, (big_samples_needed([(12, B), (40, 1)], B), 0, 0))
    streams = [SampleStream(train, L, B, 1, d, 2) for d in range(2)]
    served = []
    for bag in [B] * 6 + [1] * 10:
        for s in streams:
            served += s.next_micro_batch(bag).flatten().tolist()
        if bag == 1 and len(served) == 12 * B * UNIT + 4 * UNIT:  # resume mid-recovery
            state = streams[0].state_dict()
            streams = [SampleStream(train, L, B, 1, d, 2) for d in range(2)]
            for s in streams:
                s.load_state_dict(state)
    assert len(served) == (12 * B + 20) * UNIT
    assert len(set(served)) == len(served)
