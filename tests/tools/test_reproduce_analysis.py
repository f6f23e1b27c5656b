"""bench/reproduce.py's arithmetic: iso-loss interpolation, training seconds, speed-ups.

Expected values are worked out by hand in the comments (exact up to float rounding: rel 1e-9).
"""

from __future__ import annotations

import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import reproduce as rp  # noqa: E402
from run_metrics import RunMetrics  # noqa: E402

BASELINES = [(100, 5.0), (150, 4.6), (200, 4.4)]


def test_iso_loss_interpolates_in_log_iterations():
    # A loss on a baseline point: that baseline's length.
    assert rp.iso_loss(BASELINES, 4.6) == {"iterations": pytest.approx(150), "extrapolated": False}
    # Half-way in loss between 100 and 150 its: the geometric mean sqrt(100 * 150).
    got = rp.iso_loss(BASELINES, 4.8)
    assert got["iterations"] == pytest.approx(math.sqrt(100 * 150), rel=1e-9)
    assert not got["extrapolated"]
    # Half-way between 150 and 200: sqrt(150 * 200).
    assert rp.iso_loss(BASELINES, 4.5)["iterations"] == pytest.approx(math.sqrt(3e4), rel=1e-9)


def test_iso_loss_extrapolates_and_marks_it():
    # Worse than the shortest baseline by half its first step: t = -0.5 on 100..150.
    got = rp.iso_loss(BASELINES, 5.2)
    assert got["iterations"] == pytest.approx(100 / math.sqrt(1.5), rel=1e-9)
    assert got["extrapolated"]
    # Better than the longest by one more step of the last segment: t = 2 on 150..200.
    got = rp.iso_loss(BASELINES, 4.2)
    assert got["iterations"] == pytest.approx(150 * (200 / 150) ** 2, rel=1e-9)
    assert got["extrapolated"]


def test_iso_loss_refuses_baselines_that_do_not_improve():
    flat = [(100, 5.0), (150, 5.1), (200, 4.9)]
    assert rp.iso_loss(flat, 5.3)["iterations"] is None  # 100..150 got worse: no reading


def _train(iteration, phase, elapsed):
    return {"iteration": iteration, "phase": phase, "elapsed_s": elapsed}


def test_training_seconds_uses_median_step_per_phase():
    # Superposition 0..30 (logs every 10), recovery 30..60. Step times: superposition 1 s
    # (first window 5 s: start-up, left out), recovery 2 s with one window paused for 500 s,
    # and one window that also timed the evaluation at 40 (left out).
    train = [
        _train(10, "superposition", 50.0),  # first window: start-up
        _train(20, "superposition", 60.0),  # 1 s/step
        _train(30, "superposition", 70.0),  # 1 s/step
        _train(40, "recovery", 100.0),  # first recovery window (the switch): left out
        _train(50, "recovery", 170.0),  # timed the evaluation at 40: left out
        _train(60, "recovery", 190.0),  # 2 s/step
        _train(70, "recovery", 710.0),  # paused: 52 s/step
        _train(80, "recovery", 730.0),  # 2 s/step
    ]
    run = RunMetrics("r", train, [{"iteration": 40, "val_loss": 5.0, "elapsed_s": 150.0}])
    # 30 superposition steps x 1 s + 50 recovery steps x median(2, 52, 2) = 2 s.
    assert rp.training_seconds(run) == pytest.approx(30 * 1.0 + 50 * 2.0, rel=1e-9)


def test_clean_windows_leave_out_every_window_that_timed_an_evaluation():
    """Logging every 5 steps, evaluating every 4 (the GPU study's 20-step arms did): an
    evaluation runs after its step's logging, inside the window that follows, so the
    evaluations at 8, 12 and 16 spoil every window past the first. Logging every step, the
    windows just after each evaluation are left out and the others kept."""
    train = [_train(i, "recovery", float(i)) for i in (5, 10, 15, 20)]
    evals = [{"iteration": e, "val_loss": 1.0} for e in (4, 8, 12, 16, 20)]
    assert list(rp.clean_windows(RunMetrics("r", train, evals))) == []
    evals = [{"iteration": e, "val_loss": 1.0} for e in (4, 8, 20)]  # (10, 15] held none
    assert [(b["iteration"], r["iteration"]) for b, r in rp.clean_windows(
        RunMetrics("r", train, evals))] == [(10, 15), (15, 20)]  # fmt: skip
    train = [_train(i, "recovery", float(i)) for i in range(1, 11)]
    evals = [{"iteration": e, "val_loss": 1.0} for e in (4, 8)]
    kept = [r["iteration"] for _, r in rp.clean_windows(RunMetrics("r", train, evals))]
    assert kept == [2, 3, 4, 6, 7, 8, 10]  # not (4, 5] nor (8, 9]


def test_training_seconds_needs_a_clean_window_per_phase():
    run = RunMetrics("r", [_train(10, "recovery", 5.0)], [{"iteration": 10, "val_loss": 1.0}])
    with pytest.raises(ValueError, match="no clean logging window"):
        rp.training_seconds(run)


def test_speedups_in_iterations_and_wall_clock():
    plan = rp.Plan(work="/nonexistent", iters=100, seeds=[1], arms=[], eval_interval=10,
                   eval_iters=1, save_interval=None, data_prefix="", tokenizer="")  # fmt: skip
    plan.arms = [a for a in rp.ARMS if a.name in (*rp.BASELINES, "tst_b4")]
    results = {
        # Baselines: 0.5 s per iteration in every length.
        "baseline": {"iterations": 100, "final_val_loss_mean": 5.0, "training_s_mean": 50.0},
        "baseline_1.5x": {"iterations": 150, "final_val_loss_mean": 4.6, "training_s_mean": 75.0},
        "baseline_2x": {"iterations": 200, "final_val_loss_mean": 4.4, "training_s_mean": 100.0},
        # TST reaches 4.8 (the baseline needs sqrt(100 * 150) its) in 100 its and 60 s.
        "tst_b4": {"iterations": 100, "final_val_loss_mean": 4.8, "training_s_mean": 60.0},
    }
    positions = rp.MICRO_BATCH * rp.SEQ
    # Probe: superposition 0.6 s/step, recovery 0.5 s/step.
    tput = {
        "superposition": {"positions_per_s_median": positions / 0.6},
        "recovery": {"positions_per_s_median": positions / 0.5},
    }
    got = rp.speedups(plan, results, tput)
    assert set(got) == {"tst_b4"}
    s, eq = got["tst_b4"], math.sqrt(100 * 150)
    assert s["switch_iteration"] == 30  # fraction 0.3 of 100
    assert s["baseline_iterations_to_equal_loss"] == pytest.approx(eq, rel=1e-9)
    assert s["speedup_iterations"] == pytest.approx(eq / 100, rel=1e-9)
    assert s["speedup_wall_clock"] == pytest.approx(eq * 0.5 / 60.0, rel=1e-9)
    # The probe's step times: 30 x 0.6 + 70 x 0.5 = 53 s for TST, eq x 0.5 for the baseline.
    assert s["speedup_wall_clock_from_step_times"] == pytest.approx(eq * 0.5 / 53.0, rel=1e-9)
    assert not s["extrapolated"]


def test_progress_comes_from_the_metrics_file_whole_lines_only(tmp_path, capsys):
    """The study echoes progress from the run's metrics file (not its printed log); a line
    still being written waits for the next poll."""
    import json

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"iteration": 0, "note": "an older record"}) + "\n")
    echo = rp._MetricsEcho(str(path), "arm s1", start=0.0, iters=20)  # starts at the end
    train = {"iteration": 10, "phase": "superposition", "loss_name": "mce", "loss": 7.25}
    evaluation = {"iteration": 10, "val_loss": 6.5}
    line2 = json.dumps(evaluation) + "\n"
    with open(path, "a") as f:
        f.write(json.dumps(train) + "\n" + line2[:7])
    echo.poll()
    out = capsys.readouterr().out
    assert "iter   10/20 superposition mce 7.250" in out and "eval" not in out
    with open(path, "a") as f:
        f.write(line2[7:])
    echo.poll()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "eval at 10: next-token loss 6.5000" in out
    echo.poll()
    assert capsys.readouterr().out == ""


def test_progress_says_the_time_left_at_the_measured_pace(tmp_path, capsys):
    """From the second progress line on: the steps left at the pace since the first line
    this study saw (a resumed run's earlier steps do not count)."""
    import json

    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    now = [1000.0]
    echo = rp._MetricsEcho(str(path), "arm s1", start=990.0, iters=1000, clock=lambda: now[0])
    for iteration, t in ((400, 1000.0), (500, 1050.0), (990, 1295.0)):
        now[0] = t
        with open(path, "a") as f:
            f.write(json.dumps({"iteration": iteration, "phase": "recovery", "loss_name": "lm",
                                "loss": 2.0}) + "\n")  # fmt: skip
        echo.poll()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(10 s)")  # resumed at 400: no pace yet
    assert lines[1].endswith("(60 s, about 4 min left)")  # 100 steps in 50 s; 500 left: 250 s
    assert lines[2].endswith("(305 s, about 5 s left)")  # 590 steps in 295 s; 10 left


def test_model_size_reads_the_dry_run_report(tmp_path):
    """The study's model size comes from ``--dry-run-report`` (no tokenizer file needed)."""
    plan = rp.Plan(work=str(tmp_path), iters=10, seeds=[1], arms=[], eval_interval=5,
                   eval_iters=1, save_interval=None, data_prefix=str(tmp_path / "none"),
                   tokenizer=str(tmp_path / "none.model"))  # fmt: skip
    size = rp.model_size(plan, sys.executable)
    # The exact count (tst.dry_run.parameter_counts on the same flags) equals the report's.
    assert f"total {size['exact']['total']:,}" in size["dry_run"][0]
    assert size["padded_vocab"] % 128 == 0 and size["exact"]["total"] > 3_000_000


def test_resume_cuts_metrics_back_to_the_checkpoint_and_keeps_the_phase_table(tmp_path):
    import json
    from types import SimpleNamespace

    from tst.checkpointing import TRACKER, checkpoint_dir

    out = tmp_path / "run"
    ckpt = out / "ckpt"
    saved = checkpoint_dir(str(ckpt), 20)
    os.makedirs(saved)
    with open(os.path.join(saved, "metadata.json"), "w") as f:
        f.write("{}")
    (ckpt / TRACKER).write_text("20")
    records = [{"phases": [{"name": "superposition", "start": 0, "end": 10}]}] + [
        {"iteration": i, "lm loss": 5.0} for i in (10, 20, 30)
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = rp._prepare_resume(SimpleNamespace(save_interval=10), str(out))
    assert argv == ["--load", str(ckpt)]
    kept = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:3]  # the phase table and iterations 10, 20; 30 is past the checkpoint
    # No complete checkpoint: the run restarts in an empty folder.
    (ckpt / TRACKER).unlink()
    assert rp._prepare_resume(SimpleNamespace(save_interval=10), str(out)) == []
    assert os.listdir(out) == []


# A stand-in for ``python pretrain_tst.py ...``: writes a metrics record, then either trains
# until SIGTERM (saving nothing, exiting 0 as the trainer does) or stops early by itself.
_FAKE_TRAINER = """#!{python}
import json, os, signal, sys, time
out = os.path.dirname(sys.argv[sys.argv.index("--metrics-file") + 1])
def stopped(signum, frame):
    open(os.path.join(out, "child_got_sigterm"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
with open(os.path.join(out, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({{"iteration": 5, "val_loss": 6.0, "elapsed_s": 1.0}}) + "\\n")
open(os.path.join(out, "child_started"), "w").close()
if os.environ.get("FAKE_STOPS_EARLY"):
    sys.exit(0)
time.sleep(120)
"""

_DRIVER = """
import sys
sys.path[:0] = {paths!r}
import signal
import reproduce as rp
signal.signal(signal.SIGTERM, rp._terminated)
plan = rp.Plan(work={work!r}, iters=10, seeds=[1], arms=[rp.ARMS[0]], eval_interval=5,
               eval_iters=0, save_interval=None, data_prefix="d", tokenizer="t.model")
rp.train_one(plan, rp.ARMS[0], 1, {fake!r}, "[test]")
"""


def _driver(tmp_path, **env):
    import subprocess

    fake = tmp_path / "fake_python"
    fake.write_text(_FAKE_TRAINER.format(python=sys.executable))
    fake.chmod(0o755)
    work = tmp_path / "work"
    code = _DRIVER.format(paths=[os.path.join(ROOT, "bench"), os.path.join(ROOT, "tools"), ROOT],
                          work=str(work), fake=str(fake))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return proc, work / "baseline" / "seed1"


def test_sigterm_stops_the_training_child_and_marks_nothing_done(tmp_path):
    import signal
    import time

    proc, out = _driver(tmp_path)
    try:
        end = time.time() + 60
        while not (out / "child_started").exists() and time.time() < end and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "child_started").exists(), proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert (out / "child_got_sigterm").exists(), "the training child was not stopped"
    assert not (out / "done").exists()


def test_a_child_that_stops_early_is_not_marked_done(tmp_path):
    proc, out = _driver(tmp_path, FAKE_STOPS_EARLY="1")
    text = proc.communicate(timeout=90)[0]
    assert proc.returncode == 1, text
    assert "last evaluation at iteration 5, not at its end (10)" in text
    assert not (out / "done").exists()


# A training child whose save at SIGTERM takes a while (a loaded machine): it writes SAVED
# a second after the signal, then exits 0; with IGNORE it ignores SIGTERM altogether.
_SLOW_SAVER = """
import os, signal, sys, time
out = sys.argv[1]
def save(*_):
    time.sleep(1.0)
    open(os.path.join(out, "saved"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE") else save)
open(os.path.join(out, "ready"), "w").close()
while True:
    time.sleep(0.05)
"""


def _slow_saver(tmp_path, **env):
    import subprocess
    import time

    child = subprocess.Popen([sys.executable, "-c", _SLOW_SAVER, str(tmp_path)],
                             env={**os.environ, **env})  # fmt: skip
    end = time.time() + 60
    while not (tmp_path / "ready").exists() and time.time() < end:
        time.sleep(0.05)
    assert (tmp_path / "ready").exists(), "the child did not start"
    return child


def test_stopping_waits_for_the_childrens_saves(tmp_path, capsys):
    child = _slow_saver(tmp_path)
    rp.stop_children([child])  # the default wait: long enough for a save on a loaded machine
    assert child.returncode == 0 and (tmp_path / "saved").exists()
    assert "stopping 1 run(s): each saves a checkpoint at its next step" in capsys.readouterr().out


def test_a_child_past_the_wait_is_killed(tmp_path):
    child = _slow_saver(tmp_path)
    rp.stop_children([child], timeout_s=0.2)
    assert child.returncode == -9 and not (tmp_path / "saved").exists()


def test_a_second_interrupt_kills_the_children_at_once(tmp_path):
    import signal
    import threading
    import time

    child = _slow_saver(tmp_path, IGNORE="1")
    # A second SIGTERM to the study, whose handler raises SystemExit (trend_study.py's).
    previous = signal.signal(signal.SIGTERM, rp._terminated)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(SystemExit):
            rp.stop_children([child], timeout_s=60)
        assert child.poll() == -9, "the wait was interrupted, but the child was left running"
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.kill()
    assert time.monotonic() - start < 30


def test_signals_deferred_holds_a_signal_until_the_block_ends():
    """SIGTERM inside the block (between a child's start and its bookkeeping) reaches the
    handler only on the way out: the statements after it still run, then it raises."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    reached = []
    try:
        with pytest.raises(SystemExit) as stopped, rp.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler would run at one of these bytecodes
                reached.append(1)
        assert stopped.value.code == 128 + signal.SIGTERM and len(reached) == 1000
        assert signal.getsignal(signal.SIGTERM) is stop  # the handler is back
        with rp.signals_deferred():  # nothing came: nothing raised
            pass
    finally:
        signal.signal(signal.SIGTERM, before)
