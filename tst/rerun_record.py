"""The rerun engine's exit record (``<--save>/rerun_exit.json``), for whatever launches the
run again: torchrun turns a worker's exit code 16 or 17 into its own 1, so the trainer writes
the code, the rejected nodes and what to do next here (:meth:`tst.rerun.RerunEngine.
exit_record` builds it), and the next run's start removes it.

The launch scripts read it through this module's command line (no torch import)::

    python -m tst.rerun_record clear SAVE_DIR            # before a launch
    python -m tst.rerun_record exit-status SAVE_DIR RC   # RC, or the record's code if RC != 0
    python -m tst.rerun_record fields SAVE_DIR           # one tab-separated line (Slurm job,
                                                         # start, code, next, nodes, why)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

__all__ = ["EXIT_RECORD", "clear", "path", "read", "write"]

EXIT_RECORD = "rerun_exit.json"


def path(save_dir: str) -> str:
    """Where the record of a run saving into ``save_dir`` is."""
    return os.path.join(save_dir, EXIT_RECORD)


def write(save_dir: str, record: dict) -> str:
    """``record`` into ``save_dir``, whole or not at all; returns its path."""
    target = path(save_dir)
    tmp = f"{target}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, target)
    return target


def read(save_dir: str) -> dict | None:
    """The record in ``save_dir``, or None (none there, or not readable as one)."""
    try:
        with open(path(save_dir)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "exit_code" in record else None


def clear(save_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path(save_dir))


def main(argv: list[str]) -> int:
    usage = "usage: python -m tst.rerun_record {clear SAVE_DIR | exit-status SAVE_DIR RC | fields SAVE_DIR}"
    if len(argv) < 2 or argv[0] not in ("clear", "exit-status", "fields"):
        print(usage, file=sys.stderr)
        return 2
    command, save_dir = argv[0], argv[1]
    if command == "clear":
        clear(save_dir)
        return 0
    record = read(save_dir)
    if command == "exit-status":
        status = int(argv[2]) if len(argv) > 2 else 0
        if status != 0 and record is not None:
            status = int(record["exit_code"])
            print(f"the rerun engine ended the run with exit code {status} (see "
                  f"{path(save_dir)})", file=sys.stderr)  # fmt: skip
        print(status)
        return 0
    if record is not None:
        why = f"iteration {record['iteration']}: {record['diagnosis']}"
        print(record["slurm_job_id"], record["slurm_restart_count"], record["exit_code"],
              record["next"], ",".join(record["nodes"]), why, sep="\t")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
