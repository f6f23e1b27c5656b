"""Trainer throughput, side by side in one run (a world of one, mock data).

1. Raw tokens/s in the superposition phase over raw tokens/s in the recovery phase, same
   model and positions per step (target: at least 0.95 x bag_size).
2. Recovery-phase step time of ``pretrain_tst.py`` against a plain megatron-core GPT loop
   with the same configuration (``tests/plain_loop.py``; target: within 3 %).

    python bench/bench_throughput.py [--iters 40] [--repeats 2]

Step times are medians over steps after a warm-up; trainer and plain runs alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

MODELS = {
    "quickstart (4L h192 L64)": [
        "--num-layers", "4", "--hidden-size", "192", "--ffn-hidden-size", "512",
        "--num-attention-heads", "6", "--seq-length", "64",
    ],
    "wider (6L h256 L128)": [
        "--num-layers", "6", "--hidden-size", "256", "--ffn-hidden-size", "704",
        "--num-attention-heads", "8", "--seq-length", "128",
    ],
}  # fmt: skip
COMMON = [
    "--mock-data", "--vocab-size", "4096", "--swiglu", "--untie-embeddings-and-output-weights",
    "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "1e-3",
    "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "100000",
    "--eval-iters", "1",
]  # fmt: skip
WARMUP = 3


def trainer_step_times(argv: list[str]) -> dict[str, list[float]]:
    """Seconds per step of pretrain_tst.py, by phase (from its per-step metrics records)."""
    import pretrain_tst

    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        pretrain_tst.main(argv + ["--metrics-file", metrics])
        with open(metrics) as f:
            records = [r for r in map(json.loads, f) if "positions_per_s" in r]
    times: dict[str, list[float]] = {}
    for record in records:
        positions = record["positions_per_s"]
        step_positions = 16 * int(argv[argv.index("--seq-length") + 1])
        times.setdefault(record["phase"], []).append(step_positions / positions)
    return {phase: t[WARMUP:] for phase, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40, help="steps per phase")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[4, 6])
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from plain_loop import plain_training

    print("| model | bag | superposition ms/step | recovery ms/step | raw tok/s ratio "
          "| target | plain loop ms/step | recovery / plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, model in MODELS.items():
        base = COMMON + model
        plain_times: list[float] = []
        for bag in args.bag_sizes:
            sup, rec = [], []
            run = base + ["--train-iters", str(2 * args.iters), "--tst-bag-size", str(bag),
                          "--tst-iters", str(args.iters)]  # fmt: skip
            for _ in range(args.repeats):
                times = trainer_step_times(run)
                sup += times["superposition"]
                rec += times["recovery"]
                plain = plain_training(base + ["--train-iters", str(args.iters),
                                               "--tst-bag-size", "1"])[1]  # fmt: skip
                plain_times += plain[WARMUP:]
            t_sup, t_rec = statistics.median(sup), statistics.median(rec)
            t_plain = statistics.median(plain_times)
            ratio = bag * t_rec / t_sup  # raw tokens per step scale by bag_size
            print(f"| {name} | {bag} | {1e3 * t_sup:.1f} | {1e3 * t_rec:.1f} | {ratio:.2f} "
                  f"| >= {0.95 * bag:.2f} | {1e3 * t_plain:.1f} | {t_rec / t_plain:.3f} |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
