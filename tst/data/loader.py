"""``--num-workers``: worker processes reading the sample stream's micro-batches ahead.

The trainer's requests are known in advance: a step's bag size is ``phase_at(step)``'s (a
pure function) and its micro-batch count is the plan's, so the sequence of
``(first unit, bag_size)`` keys it will ask for is computed from the data position with
:meth:`SampleStream.plan_micro_batch`. A torch ``DataLoader`` over those keys (one item =
one micro-batch of this rank) reads them in ``num_workers`` processes, ``prefetch_factor``
micro-batches per worker ahead, and hands them back in order. Rows are a pure function of
their key, so they are the rows the trainer would read itself; the data position (what a
checkpoint stores) stays in the trainer and counts only what it consumed.

Workers start from a ``forkserver`` (a fork of the trainer, which runs communication
threads, could inherit a held lock) that has imported the dataset modules once. They ignore
SIGINT / SIGTERM / SIGUSR1: the trainer owns those signals (it saves at the next step and
stops the loader); a worker ends when the loader stops it (at the end of the run, on an error,
at interpreter exit) or, within a second, when the trainer is gone (even SIGKILLed).
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["MicroBatchLoader"]

_WATCH_INTERVAL_S = 1.0
_PRELOAD = ["__main__", "tst.data.loader", "tst.data.stream", "tst.data.datasets"]


class _Failure:
    """An exception raised in a worker, carried back as a value so that the trainer raises
    the original (one-line) error, not torch's re-wrapped traceback."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _MicroBatches(Dataset):
    """Key ``(first, bag_size)`` -> ``(key, rows)``: one micro-batch, read by a worker."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __getitem__(self, key: tuple[int, int]):
        try:
            return key, self.reader.rows(*key)
        except Exception as error:  # noqa: BLE001 (re-raised in the trainer, unchanged)
            return key, _Failure(error)


def _as_is(item):
    return item  # torch's default would turn the key into a list


def _worker_init(trainer_pid: int, _worker_id: int) -> None:
    # The trainer decides what a signal means (save, then stop the loader); a worker that
    # died on Ctrl-C would turn the trainer's clean stop into a crash.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # torch's worker watches its parent, here the forkserver, which outlives a killed
    # trainer as long as a worker holds its liveness pipe (each child does): watch the
    # trainer itself, so that a SIGKILLed run leaves no worker (nor forkserver) behind.
    threading.Thread(target=_exit_with, args=(trainer_pid,), daemon=True).start()


def _exit_with(pid: int) -> None:
    while True:
        time.sleep(_WATCH_INTERVAL_S)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # the pid was reused by another user's process
            os._exit(0)


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
    return context


class MicroBatchLoader:
    """Reads the micro-batches named by ``keys`` in ``num_workers`` processes, in order."""

    def __init__(
        self, reader, keys: Iterator[tuple[int, int]], num_workers: int, prefetch_factor: int = 2
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1 for a loader, got {num_workers}")
        loader = DataLoader(
            _MicroBatches(reader),
            batch_size=None,  # one item is already a micro-batch
            collate_fn=_as_is,
            sampler=_Keys(keys),
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=functools.partial(_worker_init, os.getpid()),
            multiprocessing_context=_context(),
        )
        self._iterator = iter(loader)
        self._workers = list(self._iterator._workers)
        self.worker_pids = [w.pid for w in self._workers]
        # Before multiprocessing's own exit hook, which would SIGTERM the workers (they
        # ignore it) and wait for them forever.
        atexit.register(self.close)

    def get(self, first: int, bag_size: int) -> torch.Tensor | None:
        """The rows of key ``(first, bag_size)``, or None when the next micro-batch read
        ahead is another one (or none is left): the caller then reads it and stops us."""
        if self._iterator is None:
            return None
        try:
            key, rows = next(self._iterator)
        except StopIteration:
            return None
        if key != (first, bag_size):
            return None
        if isinstance(rows, _Failure):
            self.close()
            raise rows.error
        return rows

    def close(self) -> None:
        """Stop and join the workers (idempotent)."""
        iterator, self._iterator = self._iterator, None
        if iterator is None:
            return
        atexit.unregister(self.close)
        iterator._shutdown_workers()  # asks them to stop, waits a few seconds
        for worker in self._workers:
            if worker.is_alive():  # stuck: they ignore SIGTERM, so kill
                worker.kill()
                worker.join(timeout=_WATCH_INTERVAL_S)


class _Keys:
    """The sampler: the planned keys, drawn lazily as the loader needs them."""

    def __init__(self, keys: Iterator[tuple[int, int]]) -> None:
        self.keys = keys

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.keys
