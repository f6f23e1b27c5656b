"""The project's error hierarchy; free of heavy imports so every tool can catch it cheaply.

Every error raised on purpose is a :class:`TSTError`, whose message names the cause and the
fix, so an entry point catches that one class and prints one line instead of a traceback
(``tools/_cli.py``, ``pretrain_tst.py``). Two branches say whose move it is:

- :class:`InputError` (also a ``ValueError``): something to fix before a run starts: a flag
  (:class:`ConfigError`, raised by every flag check), a file or an input (the tokenizer,
  dataset, corpus, preprocessing, export and metrics-file errors derive from it where they
  are defined). ``pretrain_tst.py`` exits 2.
- :class:`RunError` (also a ``RuntimeError``): a run that failed on its way: a checkpoint
  that cannot be written or loaded (``tst.checkpointing.CheckpointError``), a loss that stays
  non-finite (:class:`NonFiniteLossError`). ``pretrain_tst.py`` exits 3.

The builtin bases keep ``except ValueError`` / ``except RuntimeError`` callers working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputError", "NonFiniteLossError", "RunError", "TSTError",
           "exit_code"]  # fmt: skip


class TSTError(Exception):
    """An error the project raises on purpose; the message names the cause and the fix."""


class InputError(TSTError, ValueError):
    """Something the user can fix before starting: a flag, a file, an input."""


class ConfigError(InputError):
    """A flag value, or a combination of flags, that cannot run; the message names the flag."""


class RunError(TSTError, RuntimeError):
    """A run that failed on its way (a checkpoint, a diverged loss); the message says where
    the last good state is and what to change."""


class NonFiniteLossError(RunError):
    """Too many consecutive steps with a non-finite loss or gradients; the message says what
    to change, and where the last good state was saved."""


def exit_code(error: BaseException) -> int:
    """``pretrain_tst.py``'s exit status for an error: 2 for inputs (argparse's usage code,
    as the flags are inputs), 3 for a failed run, 1 otherwise."""
    if isinstance(error, RunError):
        return 3
    if isinstance(error, ValueError):
        return 2
    return 1


_COLLECTIVE_FAILURES = (
    "Timed out waiting",  # gloo
    "timed out",
    "Connection closed by peer",
    "Connection reset by peer",
    "Watchdog caught collective operation timeout",  # NCCL
    "NCCL error",
)


def collective_failure(error: BaseException, rank: int, timeouts: str) -> RunError | None:
    """A :class:`RunError` in one line for a collective that did not complete (gloo's and
    NCCL's timeout and broken-connection errors), or None for any other error. ``timeouts``
    names the timeouts that applied."""
    if isinstance(error, TSTError) or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not any(marker in text for marker in _COLLECTIVE_FAILURES):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return RunError(
        f"rank {rank}: a collective operation did not complete ({first[:300]}). Another rank "
        f"stalled or died (its own log says why) or the network failed; collectives wait "
        f"{timeouts}. Resume from the last checkpoint (--load) once the cause is fixed"
    )
