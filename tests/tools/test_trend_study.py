"""bench/trend_study.py: the plan of the real study, and its dry mode end to end (every part at
tiny sizes: data made with the project's tools, child runs, the table, JSON, plots, resume).

The dry run's figures are checked against the runs' own metrics files, read here plainly
(the last ``val_loss`` record), and the iso-loss reading against log-linear interpolation
written out in the test (exact up to float rounding: rel 1e-9).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import trend_study as ts  # noqa: E402

DRY_ARMS = {
    "bytes": {"baseline", "tst_b2_r0.3"},
    "length": {"baseline", "baseline_1.5x", "baseline_2x", "tst_multistage"},
    "size": {"baseline", "tst_b4_r0.2"},
    "controls": {"baseline", "reinit_both", "reinit_input"},
}


def test_real_plan_runs_steps_and_flags():
    a = ts.get_args([])
    sizes = {n: ts.params(m, 257 if m.data == "bytes" else 4096) for n, m in ts.MODELS.items()}
    # megatron-core's layer sums for the two shapes the issue names (vocabulary 4,096 and
    # 257 padded to 384, SwiGLU, RMSNorm, no biases): the tied 2-layer d 128 model, and the
    # quickstart shape on bytes.
    layer = lambda h, f: 4 * h * h + 3 * h * f + 2 * h  # noqa: E731
    assert sizes["d128x2"] == 4096 * 128 + 2 * layer(128, 384) + 128 == 950_912
    assert sizes["bytes1.9m"] == 2 * 384 * 192 + 4 * layer(192, 512) + 192
    runs = ts.plan_runs(a, ts.MODELS, sizes)
    by_part = {p: [r for r in runs if r.part == p] for p in ts.PARTS}
    assert len(by_part["bytes"]) == 3 * 6 * 3  # lengths x arms x seeds
    assert len(by_part["length"]) == 3 * 5 * 2
    assert len(by_part["size"]) == 4 * 2 * 2
    assert len(by_part["controls"]) == 5 * 2
    assert {r.steps for r in by_part["bytes"]} == {1000, 3000, 10000}
    iters = {(r.arm.name, r.steps): r.iters for r in by_part["length"]}
    assert iters[("baseline_1.5x", 3000)] == 4500 and iters[("baseline_2x", 20000)] == 40000
    # Size: 1 token per parameter at 1,024 positions a step, unless 15 estimated minutes cap it.
    steps = {r.model: r.steps for r in by_part["size"]}
    assert steps["d128x2"] == round(950_912 / 1024) and steps["q3.3m"] == round(3_344_064 / 1024)
    for name in ("d320x6", "d448x8"):
        per_step = 0.015 + 6 * sizes[name] * 1024 / 0.15e12
        assert steps[name] == round(15 * 60 / per_step) < sizes[name] / 1024
    # Flags that make each arm what its name says.
    data = {"sp": "/d/sp", "bytes": "/d/bytes", "tokenizer": "/d/tok.model"}
    for run in runs:
        argv = ts.run_argv(a, run, ts.MODELS[run.model], data, {"sp": 7, "bytes": 9})
        flag = dict(zip(argv, argv[1:], strict=False))
        assert int(flag["--train-iters"]) == run.iters and flag["--seed"] == str(run.seed)
        assert int(flag["--save-interval"]) == run.iters // 5  # resumable
        untied = "--untie-embeddings-and-output-weights" in argv
        assert untied == (run.model != "d128x2")
        if run.part == "bytes":
            assert flag["--tokenizer-type"] == "ByteTokenizer" and flag["--seq-length"] == "128"
            assert flag["--eval-iters"] == "9"
        if run.arm.name == "tst_multistage":
            assert flag["--tst-schedule"] == "4:0.1,2:0.2,1"
        if run.arm.name.startswith("reinit_"):
            assert {"reinit_both": "--tst-reinit-embeddings-at-switch",
                    "reinit_input": "--tst-reinit-input-embedding-at-switch",
                    "reinit_output": "--tst-reinit-output-layer-at-switch"}[run.arm.name] in argv  # fmt: skip


def _dry(work, *extra):
    """The study's ``main`` in this process (its training runs are children either way), so
    the reruns below pay megatron-core's import once; its printed output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ts.main(["--dry", "--work", work, *extra]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("trend"))
    return work, _dry(work)


def _json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def _last_val_loss(path):
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "val_loss" in r][-1]


def _val_losses(arm_dir):
    """Seed 1's held-out losses by iteration, read plainly from its metrics file."""
    with open(os.path.join(arm_dir, "seed1", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["iteration"]: r["val_loss"] for r in records if "val_loss" in r}


def test_dry_run_outputs(dry):
    work, out = dry
    for part in ts.PARTS:
        assert f"  {part} " in out  # its estimate, printed before training
    assert "estimated training time" in out.split("training\n")[0]
    report = _json(work, "results.json")
    rows = report["rows"]
    got = {}
    for row in rows:
        got.setdefault(row["part"], set()).add(row["arm"])
    assert got == DRY_ARMS
    assert {r["model"] for r in rows if r["part"] == "size"} == {"d128x2", "d320x6"}
    for row in rows:
        run = os.path.join(work, row["part"], row["model"], f"steps{row['steps']}", row["arm"])
        last = _last_val_loss(os.path.join(run, "seed1", "metrics.jsonl"))
        assert last["iteration"] == row["iterations"]  # held-out loss at the end of the run
        assert row["final_val_loss"] == [last["val_loss"]] and row["seeds"] == [1]
        assert row["final_val_loss_mean"] == last["val_loss"]
        assert os.path.exists(os.path.join(run, "seed1", "done"))
        if row["arm"].startswith("baseline"):
            assert "gap_mean" not in row
            continue
        base = next(r for r in rows if r["arm"] == "baseline" and r["part"] == row["part"]
                    and r["model"] == row["model"] and r["steps"] == row["steps"])  # fmt: skip
        assert row["gap_mean"] == pytest.approx(last["val_loss"] - base["final_val_loss"][0])
        # The gap on the plateau: the last evaluation both made before the decay's 10%.
        start = row["iterations"] - max(1, row["iterations"] // 10)
        mine, theirs = _val_losses(run), _val_losses(os.path.dirname(run) + "/baseline")
        step = max(i for i in mine if i <= start and i in theirs)
        assert step < row["iterations"] and row["pre_decay_iteration"] == step
        assert row["pre_decay_gap"] == [pytest.approx(mine[step] - theirs[step], abs=1e-12)]
        assert ("iso_loss_steps" in row) == (row["part"] == "length")
    # Every arm of a data kind is scored on the same evaluation batches.
    # The dry run trains 2 runs at once, the cores shared out between them.
    evals = {}
    for row in rows:
        command = _json(work, row["part"], row["model"], f"steps{row['steps']}", row["arm"],
                        "seed1", "command.json")  # fmt: skip
        assert command["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
        argv = command["argv"]
        kind = argv[argv.index("--tokenizer-type") + 1]
        evals.setdefault(kind, set()).add(argv[argv.index("--eval-iters") + 1])
    assert all(len(v) == 1 for v in evals.values()) and len(evals) == 2
    # Iso-loss: the baselines at 20, 30, 40 steps, log-linear between them.
    length = {r["arm"]: r for r in rows if r["part"] == "length"}
    pts = sorted((length[n]["iterations"], length[n]["final_val_loss_mean"])
                 for n in ("baseline", "baseline_1.5x", "baseline_2x"))  # fmt: skip
    for arm in ("tst_multistage",):
        r = length[arm]
        loss = r["final_val_loss_mean"]
        (x0, y0), (x1, y1) = pts[:2] if loss >= pts[1][1] else pts[1:]
        if y1 >= y0 or r["iso_loss_steps"] is None:
            continue  # baselines that do not improve: no reading (tiny runs are noisy)
        t = (loss - y0) / (y1 - y0)
        want = math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
        assert r["iso_loss_steps"] == pytest.approx(want, rel=1e-9)
        assert r["speedup"] == pytest.approx(want / 20, rel=1e-9)
    # The multi-stage arm ran its stages: bag 4 for 2 steps, bag 2 for 4, then next-token.
    meta = _last_phases(os.path.join(work, "length", "d128x2", "steps20", "tst_multistage"))
    assert [(p["start"], p["end"], p["input_bag"]) for p in meta] == [(0, 2, 4), (2, 6, 2),
                                                                       (6, 20, 1)]  # fmt: skip
    # The table: a row per arm, and the plots.
    with open(os.path.join(work, "summary.md")) as f:
        table = f.read()
    for part, arms in DRY_ARMS.items():
        assert f"### {part}" in table
        for arm in arms:
            assert f"| {arm} |" in table
    assert "| gap before the LR decay (step) |" in table
    assert sorted(os.path.basename(p) for p in report["plots"]) == [
        "trend_bytes.png", "trend_controls.png", "trend_length.png", "trend_size.png"]  # fmt: skip
    for path in report["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _ledger(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _unfinish(work, run_dir):
    """Make a finished run unfinished: its marker and its ledger line go."""
    os.remove(os.path.join(run_dir, "done"))
    key = os.path.relpath(run_dir, work)
    ledger = os.path.join(work, "ledger.jsonl")
    kept = [r for r in _ledger(ledger) if r["run"] != key]
    assert len(kept) == len(_ledger(ledger)) - 1, key
    with open(ledger, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


def _last_phases(arm_dir):
    with open(os.path.join(arm_dir, "seed1", "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "phases" in record:
                return record["phases"]
    raise AssertionError("no phase table")


def test_dry_rerun_skips_finished_runs_and_trains_an_unfinished_one(dry):
    work, _ = dry
    before = _json(work, "results.json")["rows"]
    n = len(before)
    out = _dry(work, "--only", "controls")
    assert "3 of 3 runs finished earlier: skipped" in out and " training\n" not in out
    target = os.path.join(work, "controls", "d128x2u", "steps20", "reinit_input", "seed1")
    _unfinish(work, target)
    shutil.copy(os.path.join(target, "metrics.jsonl"), os.path.join(work, "old.jsonl"))
    # --report: the finished runs' table, nothing trained (the unfinished arm has no row).
    out = _dry(work, "--only", "controls", "--report")
    assert "--report: the 2 finished runs, nothing trained" in out and " training\n" not in out
    report = _json(work, "results.json")
    assert report["plan"]["finished_runs_only"]
    assert {r["arm"] for r in report["rows"]} == DRY_ARMS["controls"] - {"reinit_input"}
    assert all("gap_mean" in r for r in report["rows"] if r["arm"] != "baseline")
    out = _dry(work, "--only", "controls")
    assert "2 of 3 runs finished earlier: skipped" in out
    assert out.count(" training\n") == 1 and "reinit_input 20 seed 1] training" in out
    assert os.path.exists(os.path.join(target, "done"))
    after = {r["arm"]: r for r in _json(work, "results.json")["rows"]}
    assert set(after) == DRY_ARMS["controls"] and n > len(after)
    # The retrained run starts afresh with its seed: the same loss as the first time.
    old = _last_val_loss(os.path.join(work, "old.jsonl"))["val_loss"]
    assert after["reinit_input"]["final_val_loss"] == [pytest.approx(old, rel=1e-5)]


@pytest.mark.parametrize("children", ["spawn", "fork"])
def test_sigterm_stops_the_study_and_its_training_child(dry, children):
    """A study stopped with SIGTERM (a scheduler's kill, `kill PID`) stops the child it is
    training (which checkpoints and exits) rather than leaving it running on its own: a
    `python pretrain_tst.py` process (--children spawn, the real runs' way) or one forked
    from the preloaded server (the dry runs' way), whose processes all end with it."""
    import signal
    import time

    work, _ = dry
    target = os.path.join(work, "controls", "d128x2u", "steps20", "reinit_both", "seed1")
    _unfinish(work, target)
    study = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bench", "trend_study.py"), "--dry", "--work", work,
         "--only", "controls", "--children", children], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    seen = ""
    for line in study.stdout:
        seen += line
        if line.endswith(" training\n"):
            break
    # The line comes just before the child starts. Its start can take seconds on a loaded
    # machine (the suite's other workers) while the whole 20-step run takes under 3 s on an
    # idle one: the signal goes as soon as the child is there, not after a fixed wait.
    deadline = time.monotonic() + 120
    trainers = _trainers(study.pid)
    while not trainers and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        trainers = _trainers(study.pid)
    assert trainers, (study.poll(), seen)
    descendants = [p.pid for p in psutil.Process(study.pid).children(recursive=True)]
    study.send_signal(signal.SIGTERM)
    study.wait(timeout=120)
    assert study.returncode == 128 + signal.SIGTERM, seen + study.stdout.read()
    deadline = time.monotonic() + 30  # a forkserver ends once the study's pipe closes
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in descendants):
        time.sleep(0.05)
    alive = [pid for pid in descendants if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
    assert alive == [], f"the study's processes {alive} outlived it"
    _dry(work, "--only", "controls")  # a rerun finishes the run
    assert os.path.exists(os.path.join(target, "done"))


def _trainers(pid: int) -> list[int]:
    """The study's training processes: a spawned `pretrain_tst.py`, or a child of the
    forkserver (the study's own children are the forkserver and its resource tracker)."""
    found = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            cmdline = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "pretrain_tst.py" in cmdline or process.ppid() != pid:  # the forkserver's children
            found.append(process.pid)
    return found


def test_ledger_carries_finished_runs_to_a_fresh_run_folder(dry, tmp_path):
    """The ledger alone (no run folders: another machine) makes the runs finished, reported
    with the losses their metrics files hold; a record made with other flags does not count."""
    work, _ = dry
    ledger = os.path.join(work, "ledger.jsonl")
    records = {r["run"]: r for r in _ledger(ledger)}
    size = [k for k in records if k.startswith("size/")]
    assert len(size) == 4  # 2 models x 2 arms, one line each
    for key in size:
        r = records[key]
        last = _last_val_loss(os.path.join(work, key, "metrics.jsonl"))
        assert r["final_val_loss"] == last["val_loss"] and r["val_loss"][-1] == [
            last["iteration"], last["val_loss"]]  # fmt: skip
        assert r["iterations"] == last["iteration"] and "--seed" in r["flags"]
        assert not any(work in f for f in r["flags"])  # no local paths
    # A study from before the ledger (or one whose ledger was lost): its finished run
    # folders fill the ledger in again, with the flags they were trained with.
    os.rename(ledger, ledger + ".bak")
    out = _dry(work, "--only", "size")
    assert "4 of 4 runs finished earlier: skipped" in out and " training\n" not in out
    refilled = {r["run"]: r for r in _ledger(ledger)}
    assert set(refilled) == set(size)
    for key in size:
        for field in ("flags", "final_val_loss", "val_loss", "iterations"):
            assert refilled[key][field] == records[key][field], (key, field)
    os.replace(ledger + ".bak", ledger)
    fresh = str(tmp_path / "fresh")
    out = _dry(fresh, "--only", "size", "--ledger", ledger)
    assert "4 of 4 runs finished earlier: skipped" in out and " training\n" not in out
    rows = {(r["model"], r["arm"]): r for r in _json(fresh, "results.json")["rows"]}
    assert len(rows) == 4
    for key in size:
        part, model, steps, arm, seed = key.split("/")
        assert rows[(model, arm)]["final_val_loss"] == [records[key]["final_val_loss"]]
    # A record whose flags differ from the plan's is not this run: not finished, not reported.
    changed = dict(records[size[0]])
    i = changed["flags"].index("--lr")
    changed["flags"] = [*changed["flags"][: i + 1], "0.5", *changed["flags"][i + 2 :]]
    other = str(tmp_path / "other.jsonl")
    with open(other, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [*records.values(), changed])
    out = _dry(fresh, "--only", "size", "--ledger", other, "--report")
    assert f"ledger: {size[0]} was trained with other flags" in out
    assert "--report: the 3 finished runs" in out
    # A line that is not a record is an error naming the file and line.
    with open(other, "a") as f:
        f.write("{not json\n")
    message = re.escape(f"{other}:{len(records) + 2}: not a ledger record")
    with pytest.raises(SystemExit, match=message):
        _dry(fresh, "--only", "size", "--ledger", other, "--report")


def test_plot_draws_the_final_and_the_pre_decay_gap_of_each_arm(tmp_path, monkeypatch):
    """Each arm of a steps plot: its final gap (filled markers) and, where its rows have one,
    its gap before the LR decay (hollow, dashed, the same colour, out of the legend), at the
    rows' steps with their seed spreads as error bars."""
    figures = {}

    def keep(fig, path):  # the figure itself, not its PNG
        figures[os.path.basename(path)] = fig
        return path

    monkeypatch.setattr(ts, "_save", keep)

    def row(part, arm, steps, gap, std, pre=None):
        r = {"part": part, "arm": arm, "steps": steps, "params": 1000 * steps,
             "gap_mean": gap, "gap_std": std}  # fmt: skip
        if pre is not None:
            r.update(pre_decay_gap_mean=pre[0], pre_decay_gap_std=pre[1])
        return r

    rows = [
        row("bytes", "tst_b2_r0.3", 3000, -0.032, 0.009, (-0.025, 0.013)),
        row("bytes", "tst_b2_r0.3", 1000, 0.012, 0.035, (0.023, 0.008)),
        row("bytes", "tst_b3_r0.3", 1000, 0.045, None),  # one seed, no pre-decay figure
        {"part": "bytes", "arm": "baseline", "steps": 1000, "params": 1},  # no gap: not drawn
    ]
    written = ts.plot(rows, str(tmp_path))
    assert written == [str(tmp_path / "trend_bytes.png")]
    ax = figures["trend_bytes.png"].axes[0]
    series = {c.get_label(): c for c in ax.containers}
    assert set(series) == {"tst_b2_r0.3", "_tst_b2_r0.3, before the LR decay", "tst_b3_r0.3"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tst_b2_r0.3", "tst_b3_r0.3"]

    def points(label):
        line, _, bars = series[label].lines
        ys = list(line.get_ydata())
        spans = [seg[1][1] - seg[0][1] for seg in bars[0].get_segments()]
        return list(line.get_xdata()), ys, [s / 2 for s in spans], line

    xs, ys, errs, final = points("tst_b2_r0.3")  # sorted by steps
    assert xs == [1000, 3000] and ys == [0.012, -0.032] and errs == pytest.approx([0.035, 0.009])
    xs, ys, errs, pre = points("_tst_b2_r0.3, before the LR decay")
    assert xs == [1000, 3000] and ys == [0.023, -0.025] and errs == pytest.approx([0.008, 0.013])
    assert pre.get_color() == final.get_color() and pre.get_markerfacecolor() == "none"
    assert pre.get_linestyle() == "--" and final.get_linestyle() == "-"
    xs, ys, errs, _ = points("tst_b3_r0.3")
    assert xs == [1000] and ys == [0.045] and errs == [0.0]


def test_iso_reading_says_when_the_baselines_cannot_tell():
    """Iso-loss steps only where the baselines resolve them: losses that fall with steps by
    more than the seeds' spread, a reading inside [half the shortest, twice the longest]."""
    falling = [(20, 5.0, 0.01), (30, 4.8, 0.02), (40, 4.7, 0.01)]
    got = ts.iso_reading(falling, 4.9, 20)
    want = math.exp(math.log(20) + 0.5 * (math.log(30) - math.log(20)))
    assert got["iso_loss_steps"] == pytest.approx(want, rel=1e-9)
    assert got["speedup"] == pytest.approx(want / 20, rel=1e-9) and not got["iso_extrapolated"]
    # The 20k group as measured: 4.2432 ± 0.0137 at 20,000 steps, 4.2427 ± 0.0043 at 30,000.
    flat = ts.iso_reading([(20000, 4.2432, 0.0137), (30000, 4.2427, 0.0043)], 4.2315, 20000)
    assert flat["iso_loss_steps"] is None and flat["iso_note"].startswith("baselines flat")
    far = ts.iso_reading(falling, 4.0, 20)  # 0.7 below the longest: far past it
    assert far["iso_loss_steps"] is None and far["iso_note"] == "> 80 steps (beyond the " \
        "baselines' reach)"  # fmt: skip
    # With the 2x baseline (4.2139 ± 0.0006 at 40,000): the multi-stage arm's 4.2315 lies
    # between the 1.5x and 2x baselines; bag 4's 4.2494, above the 1x one, is not extended
    # along the level 20k-30k pair (that gave "< 10,000 steps").
    group = [(20000, 4.2432, 0.0137), (30000, 4.2427, 0.0043), (40000, 4.2139, 0.0006)]
    inside = ts.iso_reading(group, 4.2315, 20000)
    t = (4.2315 - 4.2427) / (4.2139 - 4.2427)
    want = math.exp(math.log(30000) + t * (math.log(40000) - math.log(30000)))
    assert inside["iso_loss_steps"] == pytest.approx(want, rel=1e-9)
    assert not inside["iso_extrapolated"] and 33000 < want < 34000
    above = ts.iso_reading(group, 4.2494, 20000)
    assert above["iso_loss_steps"] is None and above["iso_note"].startswith(
        "< 20,000 steps (the shortest two baselines are level, 4.2432 at 20,000 and 4.2427 at "
        "30,000"
    )
    below = ts.iso_reading([(20, 5.0, 0.01), (30, 4.8, 0.02), (40, 4.79, 0.02)], 4.78, 20)
    assert below["iso_loss_steps"] is None and below["iso_note"].startswith("> 40 steps (the "
                                                                            "longest two")  # fmt: skip
    one_seed = ts.iso_reading([(20, 5.0, None), (30, 4.99, None)], 5.0, 20)
    assert one_seed["iso_loss_steps"] == pytest.approx(20)  # no spread to judge by
