"""``--num-workers``: worker processes reading the sample stream's micro-batches ahead.

The trainer's requests are known in advance: a step's bag size is ``phase_at(step)``'s (a
pure function) and its micro-batch count is the plan's, so the sequence of
``(first unit, bag_size)`` keys it will ask for is computed from the data position with
:meth:`SampleStream.plan_micro_batch`. Key ``k`` goes to worker ``k mod N``, each worker
``prefetch_factor`` keys ahead; the trainer takes the results back in key order. Rows are a
pure function of their key, so they are the rows the trainer would read itself; the data
position (what a checkpoint stores) stays in the trainer and counts only what it consumed.

Why not torch's ``DataLoader``: its queues run feeder threads in the trainer, and the
trainer forks (megatron-core's checkpoint writers); a fork taken while such a thread holds a
lock can hang the child. Here the trainer only writes and reads pipes, in its own thread.
Workers are forked from the trainer when the run starts (Megatron-LM's loader forks too; no
separate server process that could outlive it) and set torch to one thread before any op.
They ignore SIGINT / SIGTERM / SIGUSR1: the trainer owns those (it saves at the next step,
then stops them). A worker ends when the loader stops it (end of the run, an error,
interpreter exit) or, within a second, when the trainer is gone (even SIGKILLed).

A worker that is alive but gives no answer for ``stall_timeout_s`` (a micro-batch takes
milliseconds to read; a forked child can deadlock on a lock another of the trainer's threads
held at the fork) is not waited on forever: it writes its Python stacks to standard error
(faulthandler, on a signal of its own), the loader stops, and the trainer reads its data itself
from then on (the same rows; ``--num-workers 0`` does so from the start), saying so.

A worker answers once it is set up, before any key is sent. One that has not answered within
``START_TIMEOUT_S`` is killed and forked again (``_START_TRIES`` forks in all, then the trainer
reads). The case seen: CPython 3.8-3.11 releases older than the fix of python/cpython#112275
(3.11.7 here; 3.12 has the fix) can deadlock a forked child in their own after-fork code,
before any Python line runs, when another thread of the trainer held the interpreter's
thread-state lock at the fork (caught here with gdb, about once in 10,000 forks of a test
rank, an evaluation loader's); a second fork does not meet it.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import wait

import torch

from tst.processes import STOP_SIGNALS, exit_with_parent

__all__ = ["START_TIMEOUT_S", "STALL_TIMEOUT_S", "MicroBatchLoader"]

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_S = 1.0
_STOP_TIMEOUT_S = 5.0
STALL_TIMEOUT_S = 120.0
"""How long a live worker may leave a micro-batch unanswered before the trainer reads it."""
START_TIMEOUT_S = 20.0
"""How long a new worker may take to say it is ready (milliseconds, normally) before it is
forked again."""
_START_TRIES = 3
_READY = "ready"
_READS_ITSELF = (
    "the workers are stopped and this rank reads its data itself from now on (the same rows; "
    "--num-workers 0 does so from the start)"
)
# A worker writes its Python stacks to standard error on this signal (the trainer's stop
# signals are ignored there, and the test harness's ranks use SIGRTMIN + 3 for their own).
_STACKS_SIGNAL = signal.SIGRTMIN + 4


class _Failure:
    """An exception raised in a worker, carried back as a value: the trainer raises the
    original (one-line) error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _work(reader, tasks, results, trainer_pid: int) -> None:
    """A worker: read each key's rows until told to stop (``None``) or the trainer is gone."""
    # First, so that a worker stuck anywhere after the fork can still show where: written
    # straight to the file descriptor, no Python lock taken.
    faulthandler.register(_STACKS_SIGNAL, file=2, all_threads=True)
    for sig in STOP_SIGNALS:  # the trainer's to answer (SIGUSR2 too: --exit-signal SIGUSR2)
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)  # a forked child must not enter the parent's thread pool
    exit_with_parent(trainer_pid, poll_s=_WATCH_INTERVAL_S, exit_code=0)
    results.send(_READY)
    while True:
        try:
            key = tasks.recv()
        except EOFError:  # the trainer closed the pipe (or died)
            return
        if key is None:
            return
        try:
            item = reader.rows(*key).numpy()
        except Exception as error:  # noqa: BLE001 (re-raised in the trainer, unchanged)
            item = _Failure(error)
        results.send((key, item))


def _process_state(pid: int) -> str:
    """What Linux's /proc says of process ``pid``: its state, the kernel function it waits
    in and the CPU time it used, e.g. "sleeping in futex_wait_queue, 0.00 s of CPU since its
    fork"; "" where /proc cannot say (another OS, the process gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # from field 3: the name may hold spaces
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
    except (OSError, IndexError):
        return ""
    states = {"R": "running", "S": "sleeping", "D": "in uninterruptible sleep", "T": "stopped"}
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    where = f" in {wchan}" if wchan not in ("", "0") else ""
    return (
        f"{states.get(fields[0], 'state ' + fields[0])}{where}, {cpu_s:.2f} s of CPU since its fork"
    )


class MicroBatchLoader:
    """Reads the micro-batches named by ``keys`` in ``num_workers`` forked processes."""

    def __init__(
        self,
        reader,
        keys: Iterator[tuple[int, int]],
        num_workers: int,
        prefetch_factor: int = 2,
        stall_timeout_s: float | None = None,  # None: STALL_TIMEOUT_S
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1 for a loader, got {num_workers}")
        self._context = multiprocessing.get_context("fork")
        self._reader = reader
        self._keys = keys
        self.stall_timeout_s = STALL_TIMEOUT_S if stall_timeout_s is None else stall_timeout_s
        self._workers: list = [None] * num_workers
        self._tasks: list = [None] * num_workers
        self._results: list = [None] * num_workers
        self._pending: deque[tuple[int, tuple[int, int]]] = deque()  # (worker, key), in order
        self._sent = 0
        self._open = True
        # Before multiprocessing's own exit hook, which would wait for daemonic workers
        # that ignore SIGTERM.
        atexit.register(self.close)
        for index in range(num_workers):
            self._fork(index)
        self._await_ready()
        self.worker_pids = [w.pid for w in self._workers] if self._open else []
        for _ in range(num_workers * prefetch_factor if self._open else 0):
            self._send_next()

    def _fork(self, index: int) -> None:
        """Start worker ``index`` (again) with pipes of its own."""
        task_read, task_write = self._context.Pipe(duplex=False)
        result_read, result_write = self._context.Pipe(duplex=False)
        worker = self._context.Process(
            target=_work, args=(self._reader, task_read, result_write, os.getpid()),
            name=f"tst-data-worker-{index}", daemon=True,
        )  # fmt: skip
        try:
            worker.start()
        except OSError as error:  # fork(2) failed: out of processes (EAGAIN) or memory
            for end in (task_read, task_write, result_read, result_write):
                end.close()
            self.close()  # the workers forked before this one stop now, not at exit
            raise RuntimeError(
                f"could not fork data loader worker {index} ({error}): the machine is out of "
                f"processes or memory; use fewer --num-workers, or --num-workers 0 to read in "
                f"the trainer"
            ) from error
        task_read.close()  # the worker's ends: a dead worker then reads as EOF here
        result_write.close()
        self._workers[index], self._tasks[index], self._results[index] = (
            worker, task_write, result_read,
        )  # fmt: skip

    def _await_ready(self) -> None:
        """Wait for every worker's ready message; fork again those that give none within
        ``START_TIMEOUT_S`` (see the module's docstring), ``_START_TRIES`` forks in all; after
        that the loader stops and the rank reads its data itself."""
        waiting = list(range(len(self._workers)))
        for attempt in range(1, _START_TRIES + 1):
            deadline = time.monotonic() + START_TIMEOUT_S
            waiting = [index for index in waiting if not self._ready(index, deadline)]
            if not waiting:
                return
            for index in waiting:
                pid = self._workers[index].pid
                seen = _process_state(pid)
                self._workers[index].kill()
                self._workers[index].join(_STOP_TIMEOUT_S)
                self._tasks[index].close()
                self._results[index].close()
                if attempt < _START_TRIES:
                    self._fork(index)
                logger.warning(
                    "data loader worker %d (pid %d) was not ready %.0f s after its fork (%sa "
                    "child blocked before its first Python line, asleep with no CPU used: "
                    "CPython 3.11 and older can deadlock there when another thread held the "
                    "interpreter's thread-state lock at the fork, python/cpython#112275; one "
                    "that used CPU was slow instead, on a loaded machine): %s",
                    index,
                    pid,
                    START_TIMEOUT_S,
                    f"it was {seen}; " if seen else "",
                    f"forked it again (fork {attempt + 1} of {_START_TRIES})"
                    if attempt < _START_TRIES
                    else _READS_ITSELF,
                )
        self.close()

    def _ready(self, index: int, deadline: float) -> bool:
        """Whether worker ``index`` said it is ready by ``deadline`` (raises if it died)."""
        message = self._receive(index, deadline, " at its start")
        assert message in (None, _READY), message
        return message is not None

    def _receive(self, index: int, deadline: float, when: str):
        """Worker ``index``'s next answer, or None once ``deadline`` passes; a worker that
        died first (its pipe at its end) stops the loader with an error naming it."""
        connection, process = self._results[index], self._workers[index]
        while not connection.poll():
            if not process.is_alive() and not connection.poll():
                break
            if time.monotonic() >= deadline:
                return None
            wait([connection, process.sentinel], timeout=_WATCH_INTERVAL_S)
        else:
            with contextlib.suppress(EOFError):  # the worker's end closed: it died
                return connection.recv()
        process.join(_STOP_TIMEOUT_S)
        self.close()
        raise RuntimeError(
            f"data loader worker {index} (pid {process.pid}) died{when} (exit code "
            f"{process.exitcode}): rerun with --num-workers 0 to read in the trainer"
        )

    def _send_next(self) -> None:
        key = next(self._keys, None)
        if key is None:
            return
        worker = self._sent % len(self._workers)
        self._tasks[worker].send(key)
        self._pending.append((worker, key))
        self._sent += 1

    def get(self, first: int, bag_size: int) -> torch.Tensor | None:
        """The rows of key ``(first, bag_size)``, or None when the next micro-batch read
        ahead is another one (or none is left), or its worker has stalled: the caller then
        reads it and stops us."""
        if not self._open or not self._pending:
            return None
        worker, key = self._pending.popleft()
        if key != (first, bag_size):
            return None
        answer = self._receive(worker, time.monotonic() + self.stall_timeout_s, "")
        if answer is None:
            self._stalled(worker, self._workers[worker])
            return None
        got, item = answer
        assert got == key, (got, key)  # each worker answers its keys in order
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        self._send_next()
        return torch.from_numpy(item)

    def _stalled(self, worker: int, process) -> None:
        """A live worker left its micro-batch unanswered too long: its stacks to standard
        error, a warning, and the loader stops (the caller reads the rows itself)."""
        with contextlib.suppress(OSError):  # gone in the meantime
            os.kill(process.pid, _STACKS_SIGNAL)
        time.sleep(0.5)  # the dump is a few writes
        logger.warning(
            "data loader worker %d (pid %d) gave no micro-batch in %.0f s while alive (its "
            "Python stacks are above, on standard error): %s",
            worker,
            process.pid,
            self.stall_timeout_s,
            _READS_ITSELF,
        )
        self.close()

    def close(self) -> None:
        """Stop and join the workers (idempotent)."""
        if not self._open:
            return
        self._open = False
        atexit.unregister(self.close)
        forked = [
            (worker, tasks, results)
            for worker, tasks, results in zip(
                self._workers, self._tasks, self._results, strict=True
            )
            if worker is not None  # a fork that failed left its slot empty
        ]
        for _, tasks, _ in forked:
            with contextlib.suppress(OSError):  # that worker is gone already
                tasks.send(None)
        deadline = time.time() + _STOP_TIMEOUT_S
        for worker, _, results in forked:
            # A worker blocked sending a result it read ahead finishes once it is drained.
            while worker.is_alive() and time.time() < deadline:
                if results.poll(0.05):
                    with contextlib.suppress(EOFError):
                        results.recv()
            if worker.is_alive():
                worker.kill()
            worker.join(_STOP_TIMEOUT_S)
        for _, tasks, results in forked:
            tasks.close()
            results.close()
