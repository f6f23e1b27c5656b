#!/usr/bin/env python
"""Reproduce TST's effect at small scale on real text, on CPU, and measure MFU against the limit.

    python bench/reproduce.py            # reduced: 1 seed, 150 iterations, ~8 min on 2 free cores
    python bench/reproduce.py --full     # the study: 3 seeds, 1000 iterations, ~2 h on 2 cores
    python bench/reproduce.py --plots-dir docs   # also write the PNGs there

Trains the quickstart's GPT (examples/quickstart_cpu.sh's MODEL_ARGS: 3.3M parameters with
its 4,096-entry tokenizer; the exact count is printed from ``pretrain_tst.py --dry-run``) on
the State of the Union corpus, every arm at the same iterations, so at equal FLOPs:

======================  ===================================================================
baseline                 bag size 1 (plain next-token training)
tst_b2, tst_b4, tst_b6   TST, bag size 2 / 4 / 6, superposition fraction 0.3
tst_b4_reinit            tst_b4, embedding and output layer re-initialised at the switch
tst_b4_optreset          tst_b4, Adam state reset at the switch
baseline_1.5x, _2x       the baseline at 1.5x and 2x the iterations (the iso-loss reading)
======================  ===================================================================

Each run writes ``WORK/ARM/seedK/metrics.jsonl`` and a ``done`` marker; a rerun skips finished
runs. An interrupted run restarts, or with ``--full`` resumes from its checkpoint
(``--save``/``--load``; its metrics file is cut back to the checkpoint first). Held-out loss is
next-token loss on (nearly) the whole validation split, so every arm is scored on the same
tokens. The iso-loss speed-up interpolates, in log-iterations, the final losses of the three
baseline lengths (each with its own full LR schedule) at each arm's final loss.

Throughput: this machine's fp32 matrix-multiply peak is measured (best of several sizes and
repeats) around a short probe run of the quickstart model with TST (both phases) and again
after the study; MFU per phase is the probe's ``tflops_per_device`` per logging window (median
and best; first window of each phase left out) over the best peak. The same statistics over
the study's own runs (windows holding an evaluation left out) are reported beside it.
Writes ``WORK/results.json`` and ``WORK/summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from run_metrics import MetricsFileError, read_metrics  # noqa: E402

# examples/quickstart_cpu.sh's model and optimizer; the schedule scales with the run length.
MODEL_ARGS = [
    "--num-layers", "4", "--hidden-size", "192", "--ffn-hidden-size", "512",
    "--num-attention-heads", "6", "--seq-length", "64", "--swiglu", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
]  # fmt: skip
OPTIM_ARGS = [
    "--micro-batch-size", "16", "--global-batch-size", "16", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear", "--adam-beta2", "0.95",
    "--weight-decay", "0.1", "--clip-grad", "1.0",
]  # fmt: skip
SEQ, MICRO_BATCH, SPLIT = 64, 16, "98,2,0"
PROBE_ITERS = 60  # the throughput probe's steps (30 per phase, logged every 5)
FRACTION = "0.3"


@dataclass(frozen=True)
class Arm:
    name: str
    flags: tuple[str, ...]
    length: float = 1.0  # iterations, as a multiple of the study's
    bag_size: int = 1


def _tst(bag_size: int, *control: str) -> tuple[str, ...]:
    return ("--tst-bag-size", str(bag_size), "--tst-fraction", FRACTION, *control)


ARMS = [
    Arm("baseline", ("--tst-bag-size", "1")),
    *[Arm(f"tst_b{b}", _tst(b), 1.0, b) for b in (2, 4, 6)],
    Arm("tst_b4_reinit", _tst(4, "--tst-reinit-embeddings-at-switch"), 1.0, 4),
    Arm("tst_b4_optreset", _tst(4, "--tst-reset-optimizer-at-switch"), 1.0, 4),
    Arm("baseline_1.5x", ("--tst-bag-size", "1"), 1.5),
    Arm("baseline_2x", ("--tst-bag-size", "1"), 2.0),
]
BASELINES = ("baseline", "baseline_1.5x", "baseline_2x")


@dataclass
class Plan:
    work: str
    iters: int
    seeds: list[int]
    arms: list[Arm]
    eval_interval: int
    eval_iters: int
    save_interval: int | None  # None: an interrupted run restarts from scratch
    data_prefix: str
    tokenizer: str
    peak_tflops: float = 0.0
    runs: list[tuple[Arm, int]] = field(default_factory=list)

    def run_dir(self, arm: Arm, seed: int) -> str:
        return os.path.join(self.work, arm.name, f"seed{seed}")

    def arm_iters(self, arm: Arm) -> int:
        return round(arm.length * self.iters)


# ---------------------------------------------------------------- measurement of the limit


def measure_peak_tflops(sizes=(512, 1024, 2048, 3072), repeats: int = 5) -> dict:
    """fp32 GEMM TFLOP/s with torch's threads: the best of ``repeats`` ~0.2 s batches per size.

    Best-of rather than mean, since the cores are shared: the peak is what the machine can do
    when nothing else runs. ``tst.metrics.measure_cpu_peak_tflops`` (the trainer's default, one
    1024 GEMM batch of 0.5 s) is reported beside it.
    """
    import torch

    from tst.metrics import measure_cpu_peak_tflops

    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        k = max(1, int(0.2 * 0.3e12 / (2 * n**3)))  # ~0.2 s at 0.3 TFLOP/s
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(k):
                a @ b
            best = max(best, 2 * n**3 * k / (time.perf_counter() - start) / 1e12)
        per_size[n] = round(best, 4)
    return {
        "tflops": max(per_size.values()),
        "per_size": per_size,
        "trainer_default_measure": round(measure_cpu_peak_tflops(), 4),
        "threads": torch.get_num_threads(),
    }


def record_peak(work: str, measured: list[dict]) -> float:
    """Add this invocation's measurements to WORK/peaks.json; the best over all is the peak.

    A study resumed over several invocations keeps one peak for all its runs.
    """
    path = os.path.join(work, "peaks.json")
    history = []
    if os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    history += measured
    with open(path, "w") as f:
        json.dump(history, f, indent=1)
    return max(m["tflops"] for m in history)


# ---------------------------------------------------------------- data and model size


def ensure_corpus(prefix: str, tokenizer: str, python: str) -> None:
    """Prepare the corpus as examples/quickstart_cpu.sh does, unless it is already there."""
    if os.path.exists(prefix + ".idx") and os.path.exists(tokenizer):
        return
    work = os.path.dirname(prefix)
    os.makedirs(work, exist_ok=True)
    jsonl = os.path.join(work, "sotu.jsonl")
    steps = [
        ["tools/get_corpus.py", "--output", jsonl],
        ["tools/train_tokenizer.py", "--input", jsonl, "--model-prefix",
         tokenizer[: -len(".model")], "--vocab-size", "4096"],
        ["tools/preprocess_data.py", "--input", jsonl, "--output-prefix",
         prefix[: -len("_text_document")], "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", tokenizer, "--append-eod", "--workers", "2"],
    ]  # fmt: skip
    for step in steps:
        print("preparing the corpus: " + " ".join(step[:1]), flush=True)
        subprocess.run([python, *step], cwd=ROOT, check=True)


def validation_eval_iters(prefix: str, python: str, bags: list[int]) -> int:
    """Evaluation batches that read (nearly) all of the validation split under every bag size.

    A run's validation samples are ``bag * (L + 1)`` tokens cut from the split; reading every
    whole one (and never a second epoch) scores all arms on the same tokens. The split's size
    is ``tools/inspect_dataset.py``'s report, read as data.
    """
    import contextlib
    import io

    import inspect_dataset

    with contextlib.redirect_stdout(io.StringIO()):
        report = inspect_dataset.main(["--data-prefix", prefix, "--split", SPLIT,
                                       "--seq-length", str(SEQ), "--num-samples", "0"])  # fmt: skip
    tokens = report["splits"]["valid"]["tokens"]
    units = min((tokens - 1) // (b * (SEQ + 1)) * b for b in bags)
    return max(1, units // MICRO_BATCH)


def model_size(plan: Plan, python: str) -> dict:
    """The study model's size: ``pretrain_tst.py --dry-run``'s report (``--dry-run-report``)
    and the exact count."""
    from tst.config import parse_args
    from tst.dry_run import parameter_counts

    argv = [*MODEL_ARGS, *OPTIM_ARGS, *data_args(plan), "--train-iters", str(plan.iters)]
    report_file = os.path.join(plan.work, "dry_run.json")
    subprocess.run(
        [python, "pretrain_tst.py", "--dry-run", "--dry-run-report", report_file, *argv],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    with open(report_file) as f:
        model = json.load(f)["model"]
    built, vocab = model["parameters"], model["padded_vocab_size"]
    lines = [
        f"parameters: total {built['total']:,}, word embedding {built['embedding']:,}, "
        f"output layer {built['output']:,} (vocabulary {model['vocab_size']:,} padded to {vocab:,})"
    ]
    counts = parameter_counts(parse_args(argv), vocab)
    return {"dry_run": lines, "exact": counts, "padded_vocab": vocab}


def data_args(plan: Plan) -> list[str]:
    return ["--data-path", plan.data_prefix, "--split", SPLIT,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", plan.tokenizer,
            "--data-cache-path", os.path.join(plan.work, "index-cache")]  # fmt: skip


# ---------------------------------------------------------------- one run


def run_argv(plan: Plan, arm: Arm, seed: int) -> list[str]:
    iters = plan.arm_iters(arm)
    out = plan.run_dir(arm, seed)
    argv = [
        *MODEL_ARGS, *OPTIM_ARGS, *data_args(plan), *arm.flags,
        "--train-iters", str(iters), "--seed", str(seed),
        "--lr-warmup-iters", str(max(1, round(0.05 * plan.iters))),
        "--lr-wsd-decay-iters", str(max(1, iters // 10)),
        "--log-interval", "10", "--eval-interval", str(plan.eval_interval),
        "--eval-iters", str(plan.eval_iters), "--peak-tflops", f"{plan.peak_tflops:.4f}",
        "--metrics-file", os.path.join(out, "metrics.jsonl"),
    ]  # fmt: skip
    if plan.save_interval:
        ckpt = os.path.join(out, "ckpt")
        argv += ["--save", ckpt, "--save-interval", str(plan.save_interval)]
    return argv


def _prepare_resume(plan: Plan, out: str) -> list[str]:
    """Flags to resume ``out``'s run from its checkpoint (metrics cut back to it), or restart."""
    from tst.checkpointing import CheckpointError, latest_iteration

    metrics = os.path.join(out, "metrics.jsonl")
    ckpt = os.path.join(out, "ckpt")
    try:
        resume_at = latest_iteration(ckpt) if plan.save_interval else None
    except CheckpointError:
        resume_at = None
    if resume_at is None:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        return []
    with open(metrics) as f:
        kept = [
            ln
            for ln in f  # records without an iteration (the phase table) are kept
            if ln.strip() and json.loads(ln).get("iteration", 0) <= resume_at
        ]
    with open(metrics, "w") as f:
        f.writelines(kept)
    print(f"    resuming from its checkpoint at iteration {resume_at}", flush=True)
    return ["--load", ckpt]


class _MetricsEcho:
    """A compact progress line per record a run appends to its metrics file (read as JSON
    lines, whole lines only: a line still being written is left for the next poll), with the
    time the run has left at the pace measured since its first progress line here (a resumed
    run's pace counts only the steps trained since it resumed)."""

    def __init__(self, path: str, progress: str, start: float, iters: int, clock=time.time):
        self.path, self.progress, self.start, self.iters = path, progress, start, iters
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.clock = clock
        self.first: tuple[int, float] | None = None  # (iteration, time) of the first line

    def _left(self, iteration: int, now: float) -> str:
        if self.first is None:
            self.first = (iteration, now)
            return ""
        steps, seconds = iteration - self.first[0], now - self.first[1]
        if steps <= 0 or seconds <= 0:
            return ""
        left = (self.iters - iteration) * seconds / steps
        return f", about {left / 60:.0f} min left" if left >= 60 else f", about {left:.0f} s left"

    def poll(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
        lines = text.split("\n")[:-1]  # the last item is "" or a line being written
        self.offset += sum(len(line) + 1 for line in lines)
        for line in filter(None, lines):
            r = json.loads(line)
            if "val_loss" in r:
                print(f"  {self.progress} eval at {r['iteration']}: next-token loss "
                      f"{r['val_loss']:.4f}", flush=True)  # fmt: skip
            elif "loss" in r:
                now = self.clock()
                left = self._left(r["iteration"], now)
                print(f"  {self.progress} iter {r['iteration']:>4}/{self.iters} "
                      f"{r['phase']:<13} {r['loss_name']} {r['loss']:.3f}  "
                      f"({now - self.start:.0f} s{left})", flush=True)  # fmt: skip


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM back while a child is started and recorded: one arriving between
    ``Popen`` and the caller's bookkeeping would leave a child nobody stops. A signal that came
    is raised again on the way out, where the caller's clean-up knows the child."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers are the main's
        yield
        return
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(came):
            signal.raise_signal(s)


def stop_children(children: list[subprocess.Popen], timeout_s: float = 900.0) -> None:
    """Stop training children with SIGTERM (each saves a checkpoint at its next step and
    exits), all at once, and wait for their saves: a child killed mid-save publishes nothing
    and loses every step since its last checkpoint. On a loaded machine a step and a save can
    take minutes, so the wait is long; one still running after ``timeout_s``, or when the wait
    itself is interrupted (a second Ctrl-C or SIGTERM), is killed."""
    running = [child for child in children if child.poll() is None]
    if not running:
        return
    for child in running:
        child.terminate()
    print(f"stopping {len(running)} run(s): each saves a checkpoint at its next step (waiting "
          f"up to {timeout_s:.0f} s; interrupt again to kill them, losing the steps since their "
          "last checkpoint)", flush=True)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        for child in running:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    except BaseException:  # interrupted again while waiting: stop now
        for child in running:
            if child.poll() is None:
                child.kill()
                child.wait()
        raise


def train_one(plan: Plan, arm: Arm, seed: int, python: str, progress: str) -> None:
    """Train one arm/seed in a child process, echoing a compact progress line per log."""
    out = plan.run_dir(arm, seed)
    extra = _prepare_resume(plan, out)
    argv = [python, "pretrain_tst.py", *run_argv(plan, arm, seed), *extra]
    with open(os.path.join(out, "command.json"), "w") as f:
        json.dump({"argv": argv, "git": _git_hash()}, f, indent=1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    metrics = os.path.join(out, "metrics.jsonl")
    iters = plan.arm_iters(arm)
    with open(os.path.join(out, "train.log"), "a") as log:
        child = None
        try:
            with signals_deferred():
                child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)  # fmt: skip
            echo = _MetricsEcho(metrics, progress, start, iters)
            while child.poll() is None:
                echo.poll()
                time.sleep(1.0)
        finally:  # Ctrl-C, or SIGTERM (``_terminated``): the child saves at its next step
            stop_children([child] if child is not None else [])
        echo.poll()
        if child.returncode != 0:
            raise SystemExit(f"{arm.name} seed {seed} failed: see {out}/train.log")
    try:
        last = read_metrics(metrics, arm.name).evals[-1]["iteration"]
    except MetricsFileError:  # no evaluation yet
        last = 0
    if last != iters:  # a child stopped by a signal of its own exits 0 after its save
        raise SystemExit(f"{out}: last evaluation at iteration {last}, not at its end ({iters}): "
                         "stopped early; rerun to resume it")  # fmt: skip
    shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)  # finished: keep the records
    open(os.path.join(out, "done"), "w").close()


# ---------------------------------------------------------------- analysis


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def clean_windows(run):
    """A run's logging windows as (record before, record) pairs, leaving out each phase's
    first window (start-up, the switch) and windows that also timed an evaluation.

    An evaluation at iteration ``e`` runs after that step's logging, so it falls in the window
    from ``e`` on: a window (``before``, ``rec``] held one when ``before <= e < rec``, also
    where the evaluation interval is not a multiple of the logging interval."""
    eval_at = [e["iteration"] for e in run.evals]
    for before, rec in zip(run.train, run.train[1:], strict=False):
        i, j = before["iteration"], rec["iteration"]
        if before["phase"] == rec["phase"] and not any(i <= e < j for e in eval_at):
            yield before, rec


def training_seconds(run) -> float:
    """A run's training time as each phase's steps times its median seconds per step.

    The median is over logging windows, leaving out each phase's first window (start-up,
    the switch) and windows that also timed an evaluation; every step is counted. A run that
    was paused, or shared the cores for a while, has a few slow windows that the median
    ignores, where its elapsed time would carry them in full.
    """
    steps: dict[str, int] = {}
    last_iteration = 0
    for rec in run.train:
        steps[rec["phase"]] = steps.get(rec["phase"], 0) + rec["iteration"] - last_iteration
        last_iteration = rec["iteration"]
    per_step: dict[str, list[float]] = {}
    for before, rec in clean_windows(run):
        span = rec["elapsed_s"] - before["elapsed_s"]
        per_step.setdefault(rec["phase"], []).append(
            span / (rec["iteration"] - before["iteration"])
        )
    missing = sorted(set(steps) - set(per_step))
    if missing:
        raise ValueError(f"{run.name}: no clean logging window in phase(s) {missing}")
    return sum(n * statistics.median(per_step[phase]) for phase, n in steps.items())


def arm_results(plan: Plan) -> dict[str, dict]:
    """Final held-out loss, wall-clock and raw tokens per arm (per seed, mean and spread)."""
    results = {}
    for arm in plan.arms:
        finals, walls, trains, raws = [], [], [], []
        for seed in plan.seeds:
            run = read_metrics(os.path.join(plan.run_dir(arm, seed), "metrics.jsonl"), arm.name)
            finals.append(run.evals[-1]["val_loss"])
            walls.append(run.evals[-1]["elapsed_s"])
            trains.append(training_seconds(run))
            raws.append(run.train[-1]["raw_tokens"])
        mean, std = _mean_std(finals)
        results[arm.name] = {
            "bag_size": arm.bag_size,
            "iterations": plan.arm_iters(arm),
            "seeds": plan.seeds,
            "final_val_loss": finals,
            "final_val_loss_mean": mean,
            "final_val_loss_std": std,
            "elapsed_s": walls,
            "elapsed_s_mean": statistics.fmean(walls),
            "training_s": trains,
            "training_s_mean": statistics.fmean(trains),
            "raw_tokens": raws[0],
            "positions": plan.arm_iters(arm) * MICRO_BATCH * SEQ,
        }
    return results


def _log_interp(x, x0, x1, y0, y1):
    """y at x on the line through (x0, y0), (x1, y1), x on a log axis."""
    return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))


def iso_loss(baselines: list[tuple[int, float]], loss: float) -> dict:
    """Baseline iterations that reach ``loss``, from the baselines' (iterations, final loss).

    Piecewise linear in log-iterations between the baseline lengths; outside them the nearest
    segment is extended and the result is marked extrapolated. None when the baselines do not
    improve with length on that segment (noise).
    """
    pts = sorted(baselines)
    segments = list(zip(pts, pts[1:], strict=False))
    inside = next(((a, b) for a, b in segments if b[1] <= loss <= a[1]), None)
    a, b = inside or (segments[0] if loss > pts[0][1] else segments[-1])
    if b[1] >= a[1]:
        return {"iterations": None, "extrapolated": inside is None}
    t = (loss - a[1]) / (b[1] - a[1])  # 0 at a, 1 at b, along log-iterations
    iters = math.exp(math.log(a[0]) + t * (math.log(b[0]) - math.log(a[0])))
    return {"iterations": iters, "extrapolated": inside is None}


def _step_seconds(tput: dict, phase: str) -> float | None:
    t = tput.get(phase)
    return MICRO_BATCH * SEQ / t["positions_per_s_median"] if t else None


def speedups(plan: Plan, results: dict, tput: dict) -> dict[str, dict]:
    """Iso-loss speed-up of every non-baseline arm, in iterations and wall-clock.

    Wall-clock twice, evaluations left out of both. From the study's runs: the baselines'
    seconds per iteration (:func:`training_seconds` over iterations, median of the three
    lengths) times the iterations the baseline needs, against the arm's own training seconds.
    From the probe: the same with each phase's median step time from the throughput probe,
    which ran on the same model minutes apart (one measurement for every arm).
    """
    from tst.phases import PhaseSchedule

    points = [(results[n]["iterations"], results[n]["final_val_loss_mean"])
              for n in BASELINES if n in results]  # fmt: skip
    if len(points) < 2:
        return {}
    per_iter = statistics.median(
        results[n]["training_s_mean"] / results[n]["iterations"] for n in BASELINES if n in results
    )
    rec_s, sup_s = _step_seconds(tput, "recovery"), _step_seconds(tput, "superposition")
    out = {}
    for arm in plan.arms:
        if arm.name in BASELINES:
            continue
        r = results[arm.name]
        iso = iso_loss(points, r["final_val_loss_mean"])
        eq = iso["iterations"]
        schedule = PhaseSchedule.build(r["iterations"], arm.bag_size, None, float(FRACTION))
        switch = schedule.switch_iteration
        own = switch * sup_s + (r["iterations"] - switch) * rec_s if rec_s and sup_s else None
        out[arm.name] = {
            "switch_iteration": switch,
            "baseline_iterations_to_equal_loss": eq,
            "speedup_iterations": eq / r["iterations"] if eq else None,
            "speedup_wall_clock": eq * per_iter / r["training_s_mean"] if eq else None,
            "speedup_wall_clock_from_step_times": eq * rec_s / own if eq and own else None,
            "extrapolated": iso["extrapolated"],
        }
    return out


def window_stats(metrics_files: list[str], peak: float) -> dict[str, dict]:
    """Per phase: TFLOP/s, MFU, positions/s and raw tokens/s over clean logging windows.

    Left out: each run's first window of each phase (start-up, the switch) and windows that
    also timed an evaluation. Median and best: on shared cores the best window is the closest
    to what the trainer does with the cores to itself, as the best-of peak is for the GEMM.
    """
    by_phase: dict[str, dict[str, list[float]]] = {}
    for path in metrics_files:
        for _, rec in clean_windows(read_metrics(path)):
            phase = by_phase.setdefault(rec["phase"], {"tflops": [], "pos": [], "raw": []})
            phase["tflops"].append(rec["tflops_per_device"])
            phase["pos"].append(rec["positions_per_s"])
            phase["raw"].append(rec["raw_tokens_per_s"])
    return {
        name: {
            "windows": len(v["tflops"]),
            "tflops_median": statistics.median(v["tflops"]),
            "tflops_best": max(v["tflops"]),
            "mfu_median": statistics.median(v["tflops"]) / peak,
            "mfu_best": max(v["tflops"]) / peak,
            "positions_per_s_median": statistics.median(v["pos"]),
            "raw_tokens_per_s_median": statistics.median(v["raw"]),
        }
        for name, v in sorted(by_phase.items(), reverse=True)  # superposition first
    }


def probe_throughput(plan: Plan, python: str) -> str:
    """A short TST run of the quickstart model (bag 4, half the steps in each phase), timed
    between two peak measurements; returns its metrics file."""
    out = os.path.join(plan.work, "throughput")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    metrics = os.path.join(out, "metrics.jsonl")
    argv = [*MODEL_ARGS, *OPTIM_ARGS, *data_args(plan), "--tst-bag-size", "4",
            "--train-iters", str(PROBE_ITERS), "--tst-iters", str(PROBE_ITERS // 2),
            "--lr-warmup-iters", "5", "--log-interval", "5", "--eval-interval", str(PROBE_ITERS),
            "--eval-iters", "1", "--peak-tflops", f"{plan.peak_tflops:.4f}",
            "--metrics-file", metrics]  # fmt: skip
    with open(os.path.join(out, "train.log"), "w") as log:
        subprocess.run([python, "pretrain_tst.py", *argv], cwd=ROOT, check=True,
                       stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    return metrics


# ---------------------------------------------------------------- report


def summary_markdown(report: dict) -> str:
    results, speed = report["arms"], report["speedups"]
    multi = len(report["plan"]["seeds"]) > 1
    lines = [
        "| arm | bag | iterations | final held-out loss"
        + (" (mean ± std, min-max)" if multi else "")
        + " | raw tokens | positions | elapsed s | training s"
        + " | iso-loss speed-up: iterations | wall-clock | wall-clock (probe's step times) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        loss = f"{r['final_val_loss_mean']:.4f}"
        if multi:
            loss += (f" ± {r['final_val_loss_std']:.4f}, {min(r['final_val_loss']):.4f}-"
                     f"{max(r['final_val_loss']):.4f}")  # fmt: skip
        s = speed.get(name, {})
        mark = " (extrap.)" if s.get("extrapolated") else ""
        it = f"{s['speedup_iterations']:.2f}x{mark}" if s.get("speedup_iterations") else "-"
        wall = f"{s['speedup_wall_clock']:.2f}x{mark}" if s.get("speedup_wall_clock") else "-"
        est = s.get("speedup_wall_clock_from_step_times")
        est = f"{est:.2f}x{mark}" if est else "-"
        lines.append(
            f"| {name} | {r['bag_size']} | {r['iterations']} | {loss} | {r['raw_tokens']:,} | "
            f"{r['positions']:,} | {r['elapsed_s_mean']:.1f} | {r['training_s_mean']:.1f} | "
            f"{it} | {wall} | {est} |"
        )
    peak = report["peak"]
    lines += ["", "elapsed s: start to the last evaluation (evaluations, start-up and any pause "
              "included); training s: each phase's steps times its median step time. The "
              "wall-clock speed-ups compare training seconds.", ""]  # fmt: skip
    lines += [f"fp32 GEMM peak (best of sizes and repeats, measured before the probe, after "
              f"it and after the study): {peak['tflops']:.3f} TFLOP/s", "",
              "| phase | windows | s/step | TFLOP/s median (best) | MFU median (best) | "
              "positions/s | raw tokens/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for source, label in (("throughput", "probe"), ("throughput_study_runs", "study runs")):
        for phase, t in report[source].items():
            lines.append(
                f"| {phase} ({label}) | {t['windows']} | "
                f"{MICRO_BATCH * SEQ / t['positions_per_s_median']:.3f} | "
                f"{t['tflops_median']:.4f} ({t['tflops_best']:.4f}) | "
                f"{100 * t['mfu_median']:.1f}% ({100 * t['mfu_best']:.1f}%) | "
                f"{t['positions_per_s_median']:.0f} | {t['raw_tokens_per_s_median']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot(plan: Plan, python: str, plots_dir: str) -> list[str]:
    """The arms' held-out loss curves (mean over seeds, min-max band) with tools/plot_runs.py."""
    names = {a.name for a in plan.arms}
    groups = {
        "reproduce_bags.png": ["baseline", "baseline_1.5x", "baseline_2x",
                               "tst_b2", "tst_b4", "tst_b6"],
        "reproduce_controls.png": ["baseline", "tst_b4", "tst_b4_reinit", "tst_b4_optreset"],
    }  # fmt: skip
    written = []
    for png, arms in groups.items():
        runs = [f"{a}={plan.work}/{a}/seed{seed}/metrics.jsonl"
                for a in arms if a in names for seed in plan.seeds]  # fmt: skip
        if len({r.partition("=")[0] for r in runs}) < 2:
            continue
        path = os.path.join(plots_dir, png)
        subprocess.run([python, "tools/plot_runs.py", "--runs", *runs, "--output", path],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        written.append(path)
    return written


# ---------------------------------------------------------------- main


def _git_hash() -> str | None:
    try:
        return subprocess.check_output(["git", "-C", ROOT, "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def build_plan(args) -> Plan:
    full = args.full
    iters = args.iters or (1000 if full else 150)
    seeds = args.seeds or ([1, 2, 3] if full else [1])
    arms = [a for a in ARMS if not args.arms or a.name in args.arms]
    unknown = set(args.arms or []) - {a.name for a in ARMS}
    if unknown:
        raise SystemExit(f"unknown --arms {sorted(unknown)}; choose from {[a.name for a in ARMS]}")
    work = args.work or os.path.join(ROOT, "runs", "reproduce-full" if full else "reproduce")
    plan = Plan(
        work=os.path.abspath(work),
        iters=iters,
        seeds=seeds,
        arms=arms,
        eval_interval=max(1, iters // (10 if full else 3)),
        eval_iters=0,
        save_interval=max(1, iters // 4) if full else None,
        data_prefix=os.path.abspath(args.data_prefix),
        tokenizer=os.path.abspath(args.tokenizer_model),
    )
    plan.runs = [(arm, seed) for seed in seeds for arm in arms]
    return plan


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)  # through train_one's clean-up: its child is stopped too


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the whole study (3 seeds, 1000 its)")
    p.add_argument("--iters", type=int, help="iterations of the equal-FLOPs arms")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 1, or 1 2 3 with --full)")
    p.add_argument("--arms", nargs="+", help="a subset of: " + " ".join(a.name for a in ARMS))
    p.add_argument("--work", help="run folder (default runs/reproduce[-full])")
    p.add_argument("--data-prefix", default=os.path.join(ROOT, "runs/qs/sotu_text_document"))
    p.add_argument("--tokenizer-model", default=os.path.join(ROOT, "runs/qs/tokenizer.model"))
    p.add_argument("--plots-dir", help="where the PNGs go (default: the run folder)")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    # Share the cores politely: this process and every training it starts run at nice >= 10.
    os.setpriority(os.PRIO_PROCESS, 0, max(10, os.getpriority(os.PRIO_PROCESS, 0)))
    started = time.time()
    plan = build_plan(args)
    os.makedirs(plan.work, exist_ok=True)
    ensure_corpus(plan.data_prefix, plan.tokenizer, args.python)
    plan.eval_iters = validation_eval_iters(plan.data_prefix, args.python,
                                            sorted({a.bag_size for a in plan.arms}))  # fmt: skip
    size = model_size(plan, args.python)
    print(f"model: {size['exact']['total']:,} parameters exactly "
          f"({size['exact']['embedding_and_output']:,} in embedding + output layer); "
          + "; ".join(size["dry_run"]), flush=True)  # fmt: skip
    peak_before = measure_peak_tflops()
    plan.peak_tflops = peak_before["tflops"]
    print(f"fp32 GEMM peak now: {peak_before['tflops']:.3f} TFLOP/s {peak_before['per_size']}")
    print("throughput probe: the quickstart model, TST bag 4, both phases ...", flush=True)
    probe = probe_throughput(plan, args.python)
    peak_probe = measure_peak_tflops()
    print(f"fp32 GEMM peak now: {peak_probe['tflops']:.3f} TFLOP/s {peak_probe['per_size']}")
    total_steps = sum(plan.arm_iters(a) for a, _ in plan.runs)
    done_steps = 0
    for i, (arm, seed) in enumerate(plan.runs, 1):
        tag = f"[{i}/{len(plan.runs)} {arm.name} seed {seed}]"
        if os.path.exists(os.path.join(plan.run_dir(arm, seed), "done")):
            print(f"{tag} finished earlier: skipped", flush=True)
        else:
            print(f"{tag} training {plan.arm_iters(arm)} iterations "
                  f"({100 * done_steps / total_steps:.0f}% of the study's steps done, "
                  f"{time.time() - started:.0f} s so far)", flush=True)  # fmt: skip
            train_one(plan, arm, seed, args.python, tag)
        done_steps += plan.arm_iters(arm)
    peak_after = measure_peak_tflops()
    peak = record_peak(plan.work, [peak_before, peak_probe, peak_after])
    results = arm_results(plan)
    tput = window_stats([probe], peak)
    study_files = [os.path.join(plan.run_dir(a, s), "metrics.jsonl") for a, s in plan.runs]
    report = {
        "plan": dict(
            iters=plan.iters,
            seeds=plan.seeds,
            arms=[a.name for a in plan.arms],
            eval_interval=plan.eval_interval,
            eval_iters=plan.eval_iters,
            split=SPLIT,
            full=args.full,
        ),
        "model": size,
        "peak": {"tflops": peak, "this_invocation": [peak_before, peak_probe, peak_after]},
        "arms": results,
        "throughput": tput,
        "throughput_study_runs": window_stats(study_files, peak),
        "speedups": speedups(plan, results, tput),
        "git": _git_hash(),
    }
    report["plots"] = plot(plan, args.python, args.plots_dir or plan.work)
    report["wall_s"] = round(time.time() - started, 1)
    with open(os.path.join(plan.work, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = summary_markdown(report)
    with open(os.path.join(plan.work, "summary.md"), "w") as f:
        f.write(text)
    print(text + f"\nwrote {plan.work}/results.json, summary.md and {report['plots']} "
          f"in {report['wall_s']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
