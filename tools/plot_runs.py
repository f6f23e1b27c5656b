#!/usr/bin/env python
"""Plot runs from their ``--metrics-file`` records into one PNG.

    python tools/plot_runs.py --runs base=base.jsonl tst=tst.jsonl --output runs.png
    python tools/plot_runs.py --runs base=s1/m.jsonl base=s2/m.jsonl tst=s1/t.jsonl ...

Panels: next-token validation loss against iteration, wall-clock and raw tokens (each run's
phase switch marked), and the training loss of the superposition phase on its own panel
(multi-hot CE is not comparable with next-token loss). Runs given under one NAME are seeds
of one arm: its line is their mean at each evaluation, with a band from their min to max
(the x value is their median: wall-clock differs between seeds, and one run slowed by a
busy machine should not drag the line).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run_metrics import read_metrics  # noqa: E402


def seed_curve(runs: list, key: str, value=lambda e: e["val_loss"]) -> tuple[list, ...]:
    """(x, mean, min, max) per evaluation over ``runs`` (seeds of one arm), x = median ``key``.

    The seeds must have evaluated at the same iterations.
    """
    iterations = [[e["iteration"] for e in run.evals] for run in runs]
    if any(its != iterations[0] for its in iterations):
        raise SystemExit(
            f"{runs[0].name}: its runs evaluated at different iterations "
            f"({[its[:3] + ['...'] for its in iterations]}); give each seed its own NAME"
        )
    xs, mean, lo, hi = [], [], [], []
    for records in zip(*(run.evals for run in runs), strict=True):
        values = [value(e) for e in records]
        xs.append(statistics.median(e[key] for e in records))
        mean.append(sum(values) / len(values))
        lo.append(min(values))
        hi.append(max(values))
    return xs, mean, lo, hi


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=metrics.jsonl ...")
    parser.add_argument("--output", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: dict[str, list] = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"--runs takes NAME=PATH, got {spec!r}")
        arms.setdefault(name, []).append(read_metrics(path, name))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    axes_by_key = {"iteration": axes[0, 0], "elapsed_s": axes[0, 1], "raw_tokens": axes[1, 0]}
    for name, seeds in arms.items():
        run = seeds[0]
        label = name if len(seeds) == 1 else f"{name} (mean of {len(seeds)}, min-max band)"
        for key, ax in axes_by_key.items():
            xs, mean, lo, hi = seed_curve(seeds, key)
            (line,) = ax.plot(xs, mean, marker=".", label=label)
            if len(seeds) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
            # Dashed: the switch to recovery; dotted: a switch between bag stages.
            for start, entered in run.stage_starts:
                at = next((r for r in run.train if r["iteration"] >= start), None)
                if at is not None:
                    style = "--" if entered == "recovery" else ":"
                    ax.axvline(at[key], color=line.get_color(), linestyle=style, alpha=0.6)
        sup = [r for r in run.train if r["phase"] == "superposition"]
        stages = sorted({r.get("stage", 0) for r in sup})  # one curve per bag stage
        for stage in stages:
            part = [r for r in sup if r.get("stage", 0) == stage]
            which = f", stage {stage}" if len(stages) > 1 else ""
            axes[1, 1].plot([r["iteration"] for r in part], [r["loss"] for r in part],
                            label=f"{name} ({part[0]['loss_name']}{which}, first run)")  # fmt: skip
    for key, ax in axes_by_key.items():
        ax.set_xlabel({"iteration": "iteration", "elapsed_s": "wall-clock (s)",
                       "raw_tokens": "raw tokens consumed"}[key])  # fmt: skip
        ax.set_ylabel("next-token validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1, 1].set_title("superposition training loss (switches: -- recovery, : bag stage)")
    axes[1, 1].set_xlabel("iteration")
    axes[1, 1].grid(alpha=0.3)
    if axes[1, 1].lines:
        axes[1, 1].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
