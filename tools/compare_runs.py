#!/usr/bin/env python
"""Iso-loss speed-up of one run over another, from their ``--metrics-file`` records.

    python tools/compare_runs.py --baseline base.jsonl --candidate tst.jsonl [--json]

Reports each run's final held-out next-token loss, wall-clock and raw tokens, and the first
evaluation at which the candidate reaches the baseline's final loss (iteration and
wall-clock), with the speed-up that implies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run_metrics import read_metrics  # noqa: E402


def compare(baseline, candidate) -> dict:
    base_final = baseline.evals[-1]
    target = base_final["val_loss"]
    reached = next((e for e in candidate.evals if e["val_loss"] <= target), None)
    result = {
        "baseline_final_val_loss": target,
        "candidate_final_val_loss": candidate.evals[-1]["val_loss"],
        "baseline_iterations": base_final["iteration"],
        "candidate_iterations": candidate.evals[-1]["iteration"],
        "baseline_elapsed_s": base_final["elapsed_s"],
        "candidate_elapsed_s": candidate.evals[-1]["elapsed_s"],
        "baseline_raw_tokens": baseline.train[-1]["raw_tokens"] if baseline.train else None,
        "candidate_raw_tokens": candidate.train[-1]["raw_tokens"] if candidate.train else None,
        "candidate_switch_iteration": candidate.switch_iteration,
        "candidate_stage_starts": [start for start, _ in candidate.stage_starts],
        "reached_baseline_final_at_iteration": reached["iteration"] if reached else None,
        "reached_baseline_final_at_s": reached["elapsed_s"] if reached else None,
    }
    if reached:
        result["speedup_iterations"] = base_final["iteration"] / reached["iteration"]
        result["speedup_wall_clock"] = base_final["elapsed_s"] / max(reached["elapsed_s"], 1e-9)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="baseline metrics file")
    parser.add_argument("--candidate", required=True, help="candidate (TST) metrics file")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = compare(read_metrics(args.baseline, "baseline"),
                     read_metrics(args.candidate, "candidate"))  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'':28} {'baseline':>12} {'candidate':>12}")
    for label, key in (("final next-token val loss", "final_val_loss"),
                       ("iterations", "iterations"), ("wall-clock s", "elapsed_s"),
                       ("raw tokens", "raw_tokens")):  # fmt: skip
        b, c = result[f"baseline_{key}"], result[f"candidate_{key}"]
        fmt = "{:>12.4f}" if isinstance(b, float) and key == "final_val_loss" else "{:>12}"
        print(f"{label:28} {fmt.format(b)} {fmt.format(c)}")
    if result["reached_baseline_final_at_iteration"] is None:
        print("the candidate did not reach the baseline's final loss")
    else:
        print(f"candidate reached the baseline's final loss at iteration "
              f"{result['reached_baseline_final_at_iteration']} "
              f"({result['reached_baseline_final_at_s']:.1f} s): speed-up "
              f"{result['speedup_iterations']:.2f}x in steps, "
              f"{result['speedup_wall_clock']:.2f}x in wall-clock")  # fmt: skip
    print("JSON: " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
