"""Trainer throughput, side by side in one run (a world of one, mock data).

1. Raw tokens/s in the superposition phase over raw tokens/s in the recovery phase, same
   model and positions per step (target: at least 0.95 x bag_size).
2. Recovery-phase step time of ``pretrain_tst.py`` against a plain megatron-core GPT loop
   with the same configuration (``tests/helpers/plain_loop.py``; target: within 3 %).

    python bench/bench_throughput.py [--iters 40] [--repeats 2]

Step times are medians over steps after a warm-up (the 10th percentile beside them: on a
shared machine noise only adds time); trainer and plain runs alternate in ABBA order.
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
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))

MODELS = {
    "quickstart": [
        "--num-layers", "4", "--hidden-size", "192", "--ffn-hidden-size", "512",
        "--num-attention-heads", "6", "--seq-length", "64",
    ],
    "wider": [
        "--num-layers", "6", "--hidden-size", "256", "--ffn-hidden-size", "704",
        "--num-attention-heads", "8", "--seq-length", "128",
    ],
}  # fmt: skip
SHAPES = {"quickstart": "4L h192 L64", "wider": "6L h256 L128"}
COMMON = [
    "--mock-data", "--vocab-size", "4096", "--swiglu", "--untie-embeddings-and-output-weights",
    "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "1e-3",
    "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "100000",
    "--eval-iters", "1", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--adam-beta2", "0.95", "--weight-decay", "0.1",
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


def _low(times: list[float]) -> float:
    """The 10th-percentile step: noise on a shared machine only ever adds time."""
    ordered = sorted(times)
    return ordered[len(ordered) // 10]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40, help="steps per phase")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bag-sizes", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from plain_loop import plain_training

    ratio_rows, step_rows = [], []
    for name in args.models:
        base = COMMON + MODELS[name]
        sup: dict[int, list[float]] = {bag: [] for bag in args.bag_sizes}
        rec: dict[int, list[float]] = {bag: [] for bag in args.bag_sizes}
        plain: list[float] = []
        paired: list[float] = []  # recovery / plain, runs adjacent in time
        for repeat in range(args.repeats):
            # Alternate the order (ABBA) so a drift in machine speed cancels between repeats.
            order = ["trainer", "plain"] if repeat % 2 == 0 else ["plain", "trainer"]
            this_rec, this_plain = [], []
            for what in order:
                if what == "plain":
                    argv = base + ["--train-iters", str(args.iters), "--tst-bag-size", "1"]
                    this_plain = plain_training(argv)[1][WARMUP:]
                    continue
                for bag in args.bag_sizes:
                    times = trainer_step_times(base + [
                        "--train-iters", str(2 * args.iters), "--tst-bag-size", str(bag),
                        "--tst-iters", str(args.iters)])  # fmt: skip
                    sup[bag] += times["superposition"]
                    rec[bag] += times["recovery"]
                    this_rec += times["recovery"]
            plain += this_plain
            paired.append(statistics.median(this_rec) / statistics.median(this_plain))
        for bag in args.bag_sizes:
            t_sup, t_rec = statistics.median(sup[bag]), statistics.median(rec[bag])
            ratio = bag * t_rec / t_sup  # raw tokens per step scale by bag_size
            low = bag * _low(rec[bag]) / _low(sup[bag])
            ratio_rows.append(f"| {name} ({SHAPES[name]}) | {bag} | {1e3 * t_sup:.1f} "
                              f"| {1e3 * t_rec:.1f} | {ratio:.2f} | {low:.2f} "
                              f"| >= {0.95 * bag:.2f} |")  # fmt: skip
        all_rec = [t for bag in args.bag_sizes for t in rec[bag]]
        step_rows.append(
            f"| {name} ({SHAPES[name]}) | {1e3 * statistics.median(all_rec):.1f} "
            f"| {1e3 * statistics.median(plain):.1f} "
            f"| {statistics.median(all_rec) / statistics.median(plain):.3f} "
            f"| {_low(all_rec) / _low(plain):.3f} "
            f"| {min(paired):.3f}..{max(paired):.3f} | <= 1.03 |"
        )
        print(f"{name}: done ({args.repeats} repeats)", file=sys.stderr, flush=True)
    print("Raw tokens/s, superposition over recovery (same model, same positions per step):\n")
    print("| model | bag | superposition ms/step | recovery ms/step | raw tok/s ratio "
          "| p10 ratio | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(ratio_rows))
    print(
        "\nRecovery-phase step time against the plain megatron-core loop (recovery steps of "
        "every bag pooled; p10 = 10th-percentile step; paired = per repeat, adjacent runs):\n"
    )
    print("| model | recovery ms/step | plain ms/step | median ratio | p10 ratio "
          "| paired ratios | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(step_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
