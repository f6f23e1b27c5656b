"""Reading a run's ``--metrics-file`` (JSON lines): training and evaluation records."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class RunMetrics:
    name: str
    train: list[dict]
    evals: list[dict]

    @property
    def switch_iteration(self) -> int | None:
        """First logged recovery step after a superposition step, if the run switched."""
        for before, after in zip(self.train, self.train[1:], strict=False):
            if before["phase"] == "superposition" and after["phase"] == "recovery":
                return before["iteration"]
        return None


def read_metrics(path: str, name: str | None = None) -> RunMetrics:
    train, evals = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}:{number}: not a JSON record ({error})") from None
            (evals if "val_loss" in record else train).append(record)
    if not evals:
        raise SystemExit(f"{path}: no evaluation records (val_loss); was --eval-interval set?")
    return RunMetrics(name or path, train, evals)
