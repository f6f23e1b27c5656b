"""tools/plot_runs.py: seeds of one arm are averaged with a min-max band; a PNG is written."""

from __future__ import annotations

import json
import os

import pytest
from data_support import load_tool

plot_runs = load_tool("plot_runs")
run_metrics = load_tool("run_metrics")


def _evals(values, elapsed):
    return [
        {"iteration": 10 * (i + 1), "val_loss": v, "elapsed_s": t, "raw_tokens": 100 * (i + 1)}
        for i, (v, t) in enumerate(zip(values, elapsed, strict=True))
    ]


def test_seed_curve_is_mean_min_max_per_evaluation():
    seeds = [
        run_metrics.RunMetrics("a", [], _evals([5.0, 4.0], [1.0, 2.0])),
        run_metrics.RunMetrics("a", [], _evals([6.0, 3.0], [3.0, 4.0])),
        run_metrics.RunMetrics("a", [], _evals([5.5, 3.2], [2.0, 30.0])),  # a slowed run
    ]
    xs, mean, lo, hi = plot_runs.seed_curve(seeds, "elapsed_s")
    assert xs == pytest.approx([2.0, 4.0])  # wall-clock: the seeds' median
    assert mean == pytest.approx([5.5, 3.4])
    assert (lo, hi) == ([5.0, 3.0], [6.0, 4.0])
    assert plot_runs.seed_curve(seeds[:1], "iteration") == ([10.0, 20.0], [5.0, 4.0],
                                                            [5.0, 4.0], [5.0, 4.0])  # fmt: skip


def test_seed_curve_refuses_seeds_evaluated_at_other_iterations():
    a = run_metrics.RunMetrics("a", [], _evals([5.0, 4.0], [1.0, 2.0]))
    b = run_metrics.RunMetrics("a", [], _evals([5.0], [1.0]))
    with pytest.raises(SystemExit, match="evaluated at different iterations"):
        plot_runs.seed_curve([a, b], "iteration")


def _write_run(path, seed, switch):
    with open(path, "w") as f:
        for it in range(5, 41, 5):
            phase = "superposition" if switch and it <= switch else "recovery"
            f.write(json.dumps({"iteration": it, "phase": phase, "loss": 6.0 - it / 20 + seed,
                                "loss_name": "mce" if phase == "superposition" else "lm",
                                "elapsed_s": it * 0.1, "raw_tokens": it * 64}) + "\n")  # fmt: skip
            if it % 10 == 0:
                f.write(json.dumps({"iteration": it, "val_loss": 6.0 - it / 25 + 0.1 * seed,
                                    "elapsed_s": it * 0.1, "raw_tokens": it * 64}) + "\n")  # fmt: skip


def test_plot_writes_a_png_from_seed_groups(tmp_path, capsys):
    paths = {}
    for name, seed, switch in [("base", 1, None), ("base", 2, None), ("tst", 1, 15)]:
        paths[(name, seed)] = str(tmp_path / f"{name}{seed}.jsonl")
        _write_run(paths[(name, seed)], seed, switch)
    out = str(tmp_path / "plots" / "runs.png")
    runs = [f"{name}={path}" for (name, _), path in paths.items()]
    assert plot_runs.main(["--runs", *runs, "--output", out]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 10_000
    with pytest.raises(SystemExit):
        plot_runs.main(["--runs", "no-equals-sign", "--output", out])
