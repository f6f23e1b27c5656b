"""Several ``pretrain_tst.py --dry-run`` command lines in one process.

The GPU scripts' dry modes (``DRY_RUN=1``) check their command lines on the meta device; one
process for all of them imports torch and megatron-core once instead of once per command line.

    python bench/dry_runs.py QUEUE_DIR

Each file in QUEUE_DIR, taken in name order, holds NUL-terminated fields (``printf '%s\\0'``):
the header line to print, how many of the run's last output lines to print (0: all of them),
then the run's ``pretrain_tst.py`` arguments, ``--dry-run`` among them. Every run is tried;
the exit status is 1 if any of them failed (each failure printed with its cause), else 0.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_queue(folder: str) -> list[tuple[str, int, list[str]]]:
    """(header, lines to keep, argv) per queued run, in file-name order."""
    runs = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            fields = f.read().decode().split("\0")
        if len(fields) < 3 or fields[-1] != "" or not fields[1].isdigit():
            raise ValueError(f"{name}: not 'header\\0lines\\0args...\\0' (see this file's doc)")
        header, keep, argv = fields[0], int(fields[1]), fields[2:-1]
        if "--dry-run" not in argv:
            raise ValueError(f"{name} ({header}): no --dry-run in its arguments")
        runs.append((header, keep, argv))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isdir(args[0]):
        print(__doc__.strip().splitlines()[4].strip(), file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    import pretrain_tst

    failed = []
    for header, keep, run_argv in read_queue(args[0]):
        print(header, flush=True)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                rc = pretrain_tst.cli(run_argv)  # errors reported as the command line does
        except SystemExit as stop:  # argparse's exits: a number, None (0) or a message (1)
            rc = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except Exception:  # a bug: its traceback
            rc = 1
            traceback.print_exc()
        lines = out.getvalue().splitlines()
        print("\n".join(lines[-keep:] if keep else lines), flush=True)
        if rc:
            print(f"dry run failed (exit {rc}): {header}", file=sys.stderr)
            failed.append(header)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
