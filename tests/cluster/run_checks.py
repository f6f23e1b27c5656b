"""What the cluster tests read back from a run: its metrics, checkpoints and log."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"

# Lines no healthy run prints: Python tracebacks (a worker's, or torchrun's agent's, e.g. the
# c10d TCPStore "recvValueWithTimeout failed ... Connection was likely closed" at the end of a
# job), megatron-core's per-save warning that ranks disagree on the common state, and srun
# failing to start the launcher (`execve(): torchrun: No such file or directory`).
UNHEALTHY = re.compile(
    r"Traceback|recvValueWithTimeout|Connection was likely closed|common state dict differs"
    r"|execve\(\)"
)


def train_records(metrics: Path) -> list[dict]:
    """The per-step training records (``--log-interval 1``) of every start of the run."""
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if "iteration" in r and "loss_name" in r]


def last_iteration(metrics: Path) -> int:
    records = train_records(metrics)
    return records[-1]["iteration"] if records else 0


def checkpointed(save_dir: Path) -> int | None:
    tracker = save_dir / TRACKER
    return int(tracker.read_text()) if tracker.exists() else None


def assert_every_step_once(metrics: Path, last: int, switch: int) -> list[dict]:
    """Iterations 1..last each logged exactly once, in order, the phase switching after
    ``switch`` steps, and the data position advancing by one step's worth each step (no
    batch read twice or skipped across a stop and resume)."""
    records = train_records(metrics)
    iterations = [r["iteration"] for r in records]
    assert iterations == list(range(1, last + 1)), iterations
    phases = [r["phase"] for r in records]
    assert phases == ["superposition"] * switch + ["recovery"] * (last - switch), phases
    units = [0] + [r["data_units"] for r in records]
    moves = list(zip(records, units[:-1], units[1:], strict=True))
    steps = {r["phase"]: b - a for r, a, b in moves}
    for r, a, b in moves:
        assert b - a == steps[r["phase"]], f"iteration {r['iteration']}: {a} -> {b} units"
    return records


def assert_healthy(log: str) -> None:
    bad = [line for line in log.splitlines() if UNHEALTHY.search(line)]
    assert not bad, "unexpected lines in the job output:\n" + "\n".join(bad[:20]) + "\n\n" + log


def wait_for(ready, timeout_s: float, what: str, poll_s: float = 0.2) -> float:
    """Poll until ``ready()`` is true; return the time it became true (time.monotonic)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)
    return time.monotonic()
