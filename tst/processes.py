"""Helper processes that end with the process that started them.

A trainer killed with SIGKILL (the OOM killer, a launcher's restart, a lost node) runs no
clean-up, so a helper process it started that waits for work (megatron-core's persistent
checkpoint writer, the multiprocessing manager that serves its writers' result queue) would
wait forever, one more orphan per killed rank. :func:`exit_with_parent` ends such a helper
once its parent is gone; nothing the helper holds is lost, since the trainer publishes
checkpoints itself and a killed trainer publishes nothing.

A stop signal sent to the whole process group or to every process of a Slurm step (SIGTERM
from ``scancel``, ``timeout`` or ``kill -TERM -PGID``; SIGUSR1 from Slurm's time-limit warning
or ``scancel --signal=USR1``; SIGINT from Ctrl-C) reaches such helpers as well as the trainer.
The trainer answers it by saving at the next step, and that save needs them:
:func:`serve_the_trainer` makes a spawned helper leave the stop to its trainer (ignoring the
signals the trainer handles) and end with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

__all__ = ["STOP_SIGNALS", "exit_with_parent", "parent_pid", "serve_the_trainer",
           "stop_signals_blocked"]  # fmt: skip

# What the trainer answers with a save at the next step (tst.trainer): SIGUSR1's default action
# ends a process, so a helper that kept it died under Slurm's time-limit warning mid-save.
# SIGUSR2 too (Megatron-LM's --exit-signal choice for some Slurm setups): its default action
# ends a process as well.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


def parent_pid() -> int:
    """The pid of the process that started this one, as that process recorded it before the
    fork or spawn (``multiprocessing.parent_process()``). ``os.getppid()`` in the child names
    the reaper that adopted it if the parent died before the child's first line (a spawned
    child spends seconds importing first), and a helper watching the reaper never ends. Outside
    a multiprocessing child, ``os.getppid()``."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None else os.getppid()


def exit_with_parent(parent: int, poll_s: float = 1.0, exit_code: int = 1) -> None:
    """Start a daemon thread that ends this process (``os._exit(exit_code)``) once its
    parent is no longer ``parent`` (the orphan is re-parented: the parent has died)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(exit_code)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def serve_the_trainer(parent: int) -> None:
    """The first call of a spawned helper the trainer's saves depend on: the stop signals
    (:data:`STOP_SIGNALS`) are ignored (the trainer decides when to stop, and stops it) and
    the helper ends with ``parent``. Module-level, so that a spawned process can run it as its
    initializer. Processes the helper forks inherit the ignored signals."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Started under stop_signals_blocked: a stop signal that came while this process was
    # importing waits, blocked; ignored now, it is dropped when unblocked.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    exit_with_parent(parent)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread while a helper is spawned. A spawned process
    spends seconds importing before its first call (:func:`serve_the_trainer`), and a stop
    signal in that time ends it by default (seen once under Slurm: after ``scancel
    --signal=USR1``, the result-queue managers a stop-save had just started were gone on three
    of four ranks, failing the save). The signal mask survives the spawn's exec, so the helper
    starts with the stop signals blocked until it ignores them; here they are delivered when
    the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
