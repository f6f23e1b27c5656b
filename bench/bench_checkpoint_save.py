#!/usr/bin/env python
"""Time of repeated checkpoint saves with and without --ckpt-assume-constant-structure.

    python bench/bench_checkpoint_save.py [--saves 12] [--repeats 2]

Two gloo ranks (torchrun, DP 2, distributed optimizer, fully parallel saves) train a small
model and save after every step; each ``Trainer.save`` is timed on rank 0 (the collective
save, from the state dict to the published checkpoint). The first two saves of a run are
left out (megatron-core validates its cached plan on the second); the table gives the median
of the rest and its ratio to the run without the flag, ABBA-ordered over the repeats.

Run it with nothing else on the machine: two CPU cores shared with another process slow
torch down 10-40x and make the timings meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "256",
    "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--position-embedding-type", "rope", "--normalization",
    "RMSNorm", "--disable-bias-linear", "--swiglu", "--lr", "1e-3", "--log-interval", "100",
    "--eval-iters", "0", "--tst-bag-size", "2", "--use-distributed-optimizer",
    "--save-interval", "1", "--num-workers", "0",
]  # fmt: skip
FLAG = "--ckpt-assume-constant-structure"


def _worker(out: str, argv: list[str]) -> int:
    """One rank under torchrun: the run, with ``Trainer.save`` timed; rank 0 writes them."""
    sys.path.insert(0, ROOT)
    import pretrain_tst
    from tst.trainer import Trainer

    times: list[float] = []
    original = Trainer.save

    def save(self, directory=None):
        start = time.perf_counter()
        original(self, directory)
        times.append(time.perf_counter() - start)

    Trainer.save = save
    rc = pretrain_tst.main(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    return rc


def save_times(saves: int, flag: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        argv = [*MODEL, "--train-iters", str(saves), "--tst-iters", str(saves // 2),
                "--save", os.path.join(tmp, "ckpt"), *([FLAG] if flag else [])]  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", os.path.abspath(__file__), "--worker", out, *argv]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env["OMP_NUM_THREADS"] = "1"
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return _worker(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=12, help="steps, one save after each")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA repeats")
    args = parser.parse_args(argv)
    runs: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for flag in (False, True) if r % 2 == 0 else (True, False):
            runs[flag] += save_times(args.saves, flag)[2:]
    base = statistics.median(runs[False])
    print(
        f"{'saves (DP 2, distributed optimizer, fully parallel)':<52} {'median s':>9} {'ratio':>6}"
    )
    for flag, label in ((False, "every save planned and validated"), (True, FLAG)):
        med = statistics.median(runs[flag])
        print(f"{label:<52} {med:>9.4f} {med / base:>6.2f}   (n={len(runs[flag])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
