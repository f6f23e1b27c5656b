#!/usr/bin/env python
"""Step time of a tiny MoE under EP 2: token dispatchers and capacity factor, both phases.

    python bench/bench_moe_dispatch.py [--iters 12] [--repeats 2]

A 4-layer MoE (hidden 128, 8 experts, top-2, expert FFN 256, 256 positions, micro-batch 4,
global batch 16) trains on two gloo ranks with expert parallelism 2 (each rank holds 4
experts), half the steps in the superposition phase (bag 4) and half in the recovery
phase, under four settings: ``--moe-token-dispatcher-type allgather`` or ``alltoall``, each
without and with ``--moe-expert-capacity-factor 1.0`` (tokens over an expert's even share
dropped). Each setting is a fresh 2-rank torchrun; settings run in ABBA order over the
repeats. The table gives, per phase, the median seconds per step (the first ``--skip``
steps of each phase dropped: warm-up and the switch) and the ratio to allgather without a
capacity factor measured in the same run of this script.

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 256
MODEL = [
    "--mock-data", "--vocab-size", "512", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--swiglu", "--lr", "1e-3", "--lr-decay-style", "constant",
    "--log-interval", "1", "--eval-iters", "0", "--tst-bag-size", "4", "--peak-tflops", "1",
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "16",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256",
    "--moe-aux-loss-coeff", "0.01", "--expert-model-parallel-size", "2",
]  # fmt: skip
BASELINE = "allgather"
SETTINGS = {
    "allgather": ["--moe-token-dispatcher-type", "allgather"],
    "allgather + capacity 1.0": ["--moe-token-dispatcher-type", "allgather",
                                 "--moe-expert-capacity-factor", "1.0"],
    "alltoall": ["--moe-token-dispatcher-type", "alltoall"],
    "alltoall + capacity 1.0": ["--moe-token-dispatcher-type", "alltoall",
                                "--moe-expert-capacity-factor", "1.0"],
}  # fmt: skip
PHASES = ("superposition", "recovery")


def _clean_env() -> dict:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_NUM_THREADS": "1"}


def step_times(argv: list[str], skip: int) -> dict[str, list[float]]:
    """Seconds per step of a 2-rank torchrun run (rank 0's records), per phase, the first
    ``skip`` steps of each phase dropped (all kept when a phase has no more)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", os.path.join(ROOT, "pretrain_tst.py"), *argv,
               "--metrics-file", metrics]  # fmt: skip
        done = subprocess.run(cmd, env=_clean_env(), cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
        with open(metrics) as f:
            records = [json.loads(line) for line in f]
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for r in records:
        if "positions_per_s" in r and r.get("phase") in times:
            times[r["phase"]].append(r["batch_size"] * SEQ / r["positions_per_s"])
    return {phase: t[skip:] if len(t) > skip else t for phase, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=12, help="steps per run (half per phase)")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA repeats of the settings")
    parser.add_argument("--skip", type=int, default=2, help="steps dropped at each phase start")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.repeats < 1 or args.skip < 0:
        parser.error("--iters and --repeats must be >= 1, --skip >= 0")

    run_args = [*MODEL, "--train-iters", str(args.iters),
                "--tst-iters", str(max(1, args.iters // 2))]  # fmt: skip
    samples = {name: {phase: [] for phase in PHASES} for name in SETTINGS}
    order = list(SETTINGS)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else reversed(order):  # ABBA
            for phase, times in step_times(run_args + SETTINGS[name], args.skip).items():
                samples[name][phase] += times
            print(f"  ran {name} (repeat {repeat + 1})", flush=True)

    print(f"median s/step, MoE 4L h128 8 experts top-2 EP 2 (gloo, 2 ranks), {args.iters} "
          f"steps, ratio to {BASELINE} without a capacity factor:")  # fmt: skip
    print(f"  {'setting':<26}" + "".join(f"{phase:>28}" for phase in PHASES))
    for name in SETTINGS:
        cells = []
        for phase in PHASES:
            got, base = samples[name][phase], samples[BASELINE][phase]
            if not got or not base:
                cells.append(f"{'-':>28}")
                continue
            med = statistics.median(got)
            cells.append(f"{med:>14.4f} ({med / statistics.median(base):.3f} x)".rjust(28))
        print(f"  {name:<26}" + "".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
