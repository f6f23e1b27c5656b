"""The data position of a TST run: one stream of units, read by both phases.

A big sample (one dataset item) of ``max_bag_size * (L + 1)`` tokens is ``max_bag_size``
*units* of ``L + 1`` tokens. A row of bag size ``b`` reads ``b`` consecutive units of one big
sample (``b * (L + 1)`` tokens); so a superposition row (``b = max_bag_size``) is a whole big
sample and a recovery row (``b = 1``) one unit. The position is a single count of units
consumed, shared by every data-parallel rank; the recovery phase continues where the
superposition phase stopped, and a resume continues where the checkpoint was taken: no unit is
read twice, none is skipped (within an epoch).

Data-parallel split (Megatron's rule): a micro step reads the next ``micro_batch_size *
dp_size`` global rows; rank ``d`` takes rows ``[d * mbs, (d + 1) * mbs)``; every rank
advances the position by all of them. DP=1 and DP=2 with the same global batch therefore read
the same rows per step.

When the position runs past the end of the train dataset it wraps to a new epoch (same
dataset order, which megatron-core already reshuffles per epoch when asked for enough samples)
and logs that it did.

``--num-workers``: :meth:`SampleStream.start_workers` hands the reading of the coming
micro-batches to worker processes (:mod:`tst.data.loader`); the position stays here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["RowReader", "SampleStream", "big_samples_needed"]

logger = logging.getLogger(__name__)


def big_samples_needed(rows: Iterable[tuple[int, int]], max_bag_size: int) -> int:
    """Big samples a run reads, given ``(global rows, bag_size)`` per phase.

    For example a 1,000-step superposition phase and a 2,000-step recovery phase at 32 rows
    per step: ``big_samples_needed([(32_000, 6), (64_000, 1)], 6)``. Pass this to
    :func:`tst.data.datasets.build_datasets` as the train sample count.
    """
    units = 0
    for num_rows, bag_size in rows:
        _check_bag(bag_size, max_bag_size)
        units += num_rows * bag_size
    return -(-units // max_bag_size)


def _check_bag(bag_size: int, max_bag_size: int) -> None:
    if bag_size < 1 or max_bag_size % bag_size:
        raise ValueError(
            f"bag_size {bag_size} must divide the dataset's bag size {max_bag_size} (rows of "
            "a phase are cut from the big samples the datasets were built with)"
        )


class RowReader:
    """Reads rows of whole units out of big samples; what a loader worker runs.

    ``rows(first, bag_size)`` is a pure function of its arguments (and the dataset), so the
    same micro-batch read in the trainer or in a worker process is the same tensor.
    """

    def __init__(self, dataset, seq_length: int, max_bag_size: int, micro_batch_size: int,
                 rows_per_step: int) -> None:  # fmt: skip
        self.dataset = dataset
        self.unit_length = seq_length + 1
        self.seq_length = seq_length
        self.max_bag_size = max_bag_size
        self.micro_batch_size = micro_batch_size
        self.rows_per_step = rows_per_step
        # A big sample is read in pieces over several rows (recovery rows read one unit each):
        # keep the few most recent ones instead of re-reading them from disk.
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict()}  # a worker starts with its own

    def rows(self, first: int, bag_size: int) -> torch.Tensor:
        """``[micro_batch_size, bag_size * (L + 1)]``: consecutive rows of ``bag_size`` units,
        the first starting at unit ``first``."""
        rows = [self._row(first + r * bag_size, bag_size) for r in range(self.micro_batch_size)]
        return torch.stack(rows)

    def _row(self, unit: int, bag_size: int) -> torch.Tensor:
        sample = unit // self.max_bag_size
        offset = (unit % self.max_bag_size) * self.unit_length
        tokens = self._big_sample(sample)
        return tokens[offset : offset + bag_size * self.unit_length]

    def _big_sample(self, index: int) -> torch.Tensor:
        tokens = self._cache.get(index)
        if tokens is None:
            tokens = self.dataset[index % len(self.dataset)]["tokens"]
            expected = self.max_bag_size * self.unit_length
            if tokens.dim() != 1 or tokens.numel() != expected:
                raise ValueError(
                    f"dataset item {index % len(self.dataset)} has shape {tuple(tokens.shape)}, "
                    f"expected [{expected}] = max_bag_size {self.max_bag_size} x (seq_length "
                    f"{self.seq_length} + 1): build the datasets with the same bag size and L"
                )
            self._cache[index] = tokens.long()
            while len(self._cache) > 2 * self.rows_per_step + 2:
                self._cache.popitem(last=False)
        return self._cache[index]


class SampleStream:
    """Serves micro-batches of rows to one data-parallel rank; carries the data position.

    ``dataset[i]["tokens"]`` must be a 1-D tensor of ``max_bag_size * (seq_length + 1)``
    tokens (:func:`tst.data.datasets.build_datasets` yields these).
    """

    def __init__(
        self,
        dataset,
        seq_length: int,
        max_bag_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_units: int = 0,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: no sample to serve")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or seq_length < 1 or max_bag_size < 1:
            raise ValueError("micro_batch_size, seq_length and max_bag_size must be >= 1")
        self.dataset = dataset
        self.seq_length = seq_length
        self.max_bag_size = max_bag_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_units = consumed_units
        self.served_units = consumed_units  # excludes units skipped to realign a bag size
        self._logged_epoch = self.epoch
        self.reader = RowReader(
            dataset, seq_length, max_bag_size, micro_batch_size, micro_batch_size * dp_size
        )
        self._loader = None

    @property
    def unit_length(self) -> int:
        """Tokens per unit: ``seq_length + 1``."""
        return self.seq_length + 1

    @property
    def epoch(self) -> int:
        """Completed passes over the dataset (0 during the first)."""
        return self.consumed_units // self.max_bag_size // len(self.dataset)

    @property
    def consumed_raw_tokens(self) -> int:
        """Raw tokens served so far over all data-parallel ranks (units x ``L + 1``)."""
        return self.served_units * self.unit_length

    def next_micro_batch(self, bag_size: int) -> torch.Tensor:
        """This rank's next ``[micro_batch_size, bag_size * (L + 1)]`` rows (int64).

        Advances the shared position by ``micro_batch_size * dp_size`` rows of ``bag_size``
        units. After :meth:`start_workers` the rows come from the loader's worker processes,
        read ahead; they are the rows this method would read itself (each micro-batch is
        checked against its plan: one the loader did not foresee is read here, and the loader
        stops).
        """
        _check_bag(bag_size, self.max_bag_size)
        start, first, after = self.plan_micro_batch(self.consumed_units, bag_size)
        if start != self.consumed_units:
            logger.warning(
                "bag size %d starts at unit %d, not a multiple of it: skipping %d unit(s) so "
                "that rows stay inside one big sample",
                bag_size,
                self.consumed_units,
                start - self.consumed_units,
            )
        rows = self._loader.get(first, bag_size) if self._loader is not None else None
        if rows is None:
            self.close()  # none, or not the micro-batch it read ahead: read it here
            rows = self.reader.rows(first, bag_size)
        self.served_units += after - start
        self.consumed_units = after
        self._log_epoch()
        return rows

    def plan_micro_batch(self, consumed_units: int, bag_size: int) -> tuple[int, int, int]:
        """(aligned start, this rank's first unit, the position after) of a micro-batch of
        ``bag_size`` rows read at position ``consumed_units``: pure, so a loader plans ahead.

        A row must not straddle two big samples. Going from a bag size to one of its
        divisors (superposition -> recovery) is always aligned; only a switch up from a
        smaller bag size can land mid-way, and then the rest of that big sample is skipped.
        """
        start = -(-consumed_units // bag_size) * bag_size
        first = start + self.dp_rank * self.micro_batch_size * bag_size
        return start, first, start + self.micro_batch_size * self.dp_size * bag_size

    def start_workers(
        self, num_workers: int, bag_sizes: Iterable[int], prefetch_factor: int = 2
    ) -> None:
        """Read the micro-batches of ``bag_sizes`` (the coming requests' bag sizes, in order)
        ahead in ``num_workers`` worker processes (0: read here, on request). The position
        stays here: a checkpoint stores what the trainer consumed, not what was read ahead.
        """
        self.close()
        if num_workers <= 0:
            return
        from tst.data.loader import MicroBatchLoader

        def keys(position: int = self.consumed_units) -> Iterator[tuple[int, int]]:
            for bag_size in bag_sizes:
                _check_bag(bag_size, self.max_bag_size)
                _, first, position = self.plan_micro_batch(position, bag_size)
                yield first, bag_size

        self._loader = MicroBatchLoader(self.reader, keys(), num_workers, prefetch_factor)

    @property
    def worker_pids(self) -> list[int]:
        """The loader's worker processes (empty without workers)."""
        return self._loader.worker_pids if self._loader is not None else []

    def close(self) -> None:
        """Stop the loader's workers, if any (idempotent; for every exit path)."""
        loader, self._loader = self._loader, None
        if loader is not None:
            loader.close()

    def _log_epoch(self) -> None:
        epoch = self.epoch
        if epoch > self._logged_epoch:
            logger.info(
                "data: finished pass %d over the %d samples of the dataset; starting epoch %d "
                "(samples repeat from here)",
                epoch,
                len(self.dataset),
                epoch + 1,
            )
            self._logged_epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """The position, for checkpoints (the same on every data-parallel rank)."""
        return {
            "consumed_units": self.consumed_units,
            "served_units": self.served_units,
            "max_bag_size": self.max_bag_size,
            "seq_length": self.seq_length,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; refuses one cut with another bag size or L."""
        for key in ("max_bag_size", "seq_length"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's data position was taken with {key}={state[key]}, this run "
                    f"has {getattr(self, key)}: units would not line up"
                )
        self.consumed_units = int(state["consumed_units"])
        self.served_units = int(state.get("served_units", self.consumed_units))
        self._logged_epoch = self.epoch
        self.close()  # what it read ahead was planned from the old position
