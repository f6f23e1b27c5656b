"""Reading a run's ``--metrics-file`` (JSON lines): training and evaluation records.

The one reader behind ``plot_runs.py``, ``compare_runs.py`` and ``bench/reproduce.py``. A run
killed while writing a record leaves its last line cut short (no newline at its end): that
line is dropped with a note on stderr, and the records before it are used. A damaged line
anywhere else (or a last line that was written whole, newline included, but does not parse)
is refused naming the file and line: that is damage, not a kill. Records without an
``iteration`` (a run's header: its phase table) are kept apart in ``meta``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tst.errors import InputError  # noqa: E402

__all__ = ["MetricsFileError", "RunMetrics", "read_metrics"]


class MetricsFileError(InputError):
    """A metrics file that is missing, damaged, or holds no evaluation records."""


@dataclass
class RunMetrics:
    name: str
    train: list[dict]
    evals: list[dict]
    meta: list[dict] = field(default_factory=list)  # records that are no step (headers)

    @property
    def switch_iteration(self) -> int | None:
        """The iteration the run switched at: from its phase table (the header record the
        trainer writes), else the first logged recovery step after a superposition one."""
        for record in self.meta:
            phases = record.get("phases")
            if isinstance(phases, list):
                names = [p.get("name") for p in phases]
                if "superposition" in names and "recovery" in names:
                    return phases[names.index("recovery")]["start"]
                return None
        for before, after in zip(self.train, self.train[1:], strict=False):
            if before["phase"] == "superposition" and after["phase"] == "recovery":
                return before["iteration"]
        return None

    @property
    def stage_starts(self) -> list[tuple[int, str]]:
        """Every switch of the run in order, as (iteration, name of the phase it enters): a
        multi-stage schedule (--tst-schedule) switches between bag stages before the switch
        to recovery. From the phase table when the file has one, else from where the logged
        stage (or phase) changes."""
        for record in self.meta:
            phases = record.get("phases")
            if isinstance(phases, list):
                return [(p["start"], p.get("name")) for p in phases[1:]]
        return [
            (before["iteration"], after["phase"])
            for before, after in zip(self.train, self.train[1:], strict=False)
            if (before.get("stage"), before["phase"]) != (after.get("stage"), after["phase"])
        ]


def _parse(line: bytes) -> dict:
    """One record; ValueError (JSON or UTF-8) when the line is not one."""
    record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    return record


def read_metrics(path: str, name: str | None = None) -> RunMetrics:
    """The records of ``path``, split into training and evaluation (``val_loss``) ones."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as error:
        raise MetricsFileError(f"{path}: cannot read the metrics file ({error})") from None
    # After split, a file ending in "\n" ends with b"": a last element that is not empty is
    # a line without its newline, i.e. the one a kill can cut.
    unterminated = len(lines) - 1 if lines[-1] else None
    train, evals, meta = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = _parse(line)
        except ValueError as error:
            if number - 1 == unterminated:
                print(
                    f"{path}:{number}: dropped the last line, cut short ({len(line)} bytes, no "
                    "newline: the run was stopped while writing it); using the records before it",
                    file=sys.stderr,
                )
                continue
            raise MetricsFileError(f"{path}:{number}: not a JSON record ({error})") from None
        if "iteration" not in record or "test_loss" in record:  # the plan; the end's test loss
            meta.append(record)
        else:
            (evals if "val_loss" in record else train).append(record)
    if not evals:
        raise MetricsFileError(
            f"{path}: no evaluation records (val_loss); was --eval-interval set?"
        )
    return RunMetrics(name or path, train, evals, meta)
