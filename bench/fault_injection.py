"""Fault injection: kill training runs at bad moments, resume them, audit what they consumed.

Each scenario trains a tiny model on mock data (one process, CPU) with a phase switch inside
the run and frequent checkpoints, interrupts it, resumes with ``--load`` until it finishes,
and compares the per-step record of (loss, data position) with an uninterrupted run. A step
redone after a resume must repeat the original exactly; "data lost" counts steps whose data
position or loss differ from the uninterrupted run, or that are missing.

    python bench/fault_injection.py [--runs 2] [--seed 0] [--jobs 2]

Scenarios: SIGKILL at a random moment (mostly inside forward/backward), SIGKILL while a
checkpoint is being written, the same two with ``--async-save`` (the kill lands while the
background writers of the second checkpoint run: the first must stay the latest), SIGKILL
just after the phase switch, SIGTERM (preemption: the run saves and exits 0 by itself), and a
run whose tracker names a corrupted checkpoint.

The uninterrupted run and the scenarios' runs are independent: ``--jobs`` of them run at once,
each training process on one thread (every run, the reference included, so their losses are
bit-comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS, SWITCH = 16, 6
ARGS = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "4",
    "--train-iters", str(ITERS), "--tst-bag-size", "3", "--tst-iters", str(SWITCH),
    "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--save-interval", "3", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--lr-decay-style", "cosine", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--adam-beta2", "0.95", "--weight-decay", "0.1",
]  # fmt: skip


ASYNC = ["--async-save"]  # the scenarios that save in the background resume with it too
_ASYNC_SCENARIOS = ("scenario_kill_during_async_save", "scenario_random_kill_async")

_RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _records(path: str) -> dict[int, tuple[float, int]]:
    """Last (loss, data position) logged for each step; a redone step must match the first."""
    steps: dict[int, tuple[float, int]] = {}
    conflicts = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by SIGKILL
                if "data_units" not in record:
                    continue
                value = (record["loss"], record["data_units"])
                old = steps.get(record["iteration"])
                if old is not None and old != value:
                    conflicts += 1
                steps[record["iteration"]] = value
    steps[-1] = (float(conflicts), 0)  # redone steps that differed from their first run
    return steps


def _last_step(path: str) -> int:
    return max((k for k in _records(path) if k >= 0), default=0)


def _launch(run_dir: str, extra: list[str], env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_tst.py"), *ARGS,
           "--save", os.path.join(run_dir, "ckpt"),
           "--metrics-file", os.path.join(run_dir, "metrics.jsonl"), *extra]  # fmt: skip
    # stderr to a file, not a pipe: a killed run's helper processes (checkpoint writers)
    # could hold a pipe open. A session of its own, so SIGKILL can take them all.
    stderr = open(os.path.join(run_dir, "stderr.log"), "a")  # noqa: SIM115 (owned by the child)
    # Each run is a world of its own: no rendezvous variables from whoever started us.
    base_env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARIABLES}
    base_env["OMP_NUM_THREADS"] = "1"  # --jobs runs share the cores; the same for every run
    return subprocess.Popen(cmd, cwd=run_dir, env={**base_env, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)  # fmt: skip


def _finish(proc, run_dir: str) -> str:
    """Wait for a run; return the tail of its stderr."""
    proc.wait(timeout=300)
    with open(os.path.join(run_dir, "stderr.log")) as f:
        return f.read()[-4000:]


def _resume_until_done(run_dir: str, attempts: int = 4, extra=()) -> tuple[bool, str]:
    """Resume with --load until a run exits 0; returns (finished, last error)."""
    error = ""
    for _ in range(attempts):
        ckpt = os.path.join(run_dir, "ckpt")
        load = (
            ["--load", ckpt]
            if os.path.exists(os.path.join(ckpt, "latest_checkpointed_iteration.txt"))
            else []
        )  # noqa: E501
        proc = _launch(run_dir, [*load, *extra])
        err = _finish(proc, run_dir)
        if proc.returncode == 0:
            return True, ""
        error = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
    return False, error


def _wait_for_step(proc, path: str, step: int, timeout: float = 120) -> None:
    start = time.time()
    while _last_step(path) < step and proc.poll() is None and time.time() - start < timeout:
        time.sleep(0.05)


def _kill_at(run_dir: str, step: int, sig=signal.SIGKILL, env=None, extra=()) -> subprocess.Popen:
    proc = _launch(run_dir, list(extra), env)
    _wait_for_step(proc, os.path.join(run_dir, "metrics.jsonl"), step)
    if proc.poll() is None:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and any process it started
        else:
            proc.send_signal(sig)
    _finish(proc, run_dir)
    return proc


def scenario_random_kill(run_dir: str, rng: random.Random) -> str:
    _kill_at(run_dir, rng.randint(2, ITERS - 2))
    return ""


def scenario_kill_during_save(run_dir: str, rng: random.Random) -> str:
    proc = _launch(run_dir, [], {"TST_FAULT_INJECTION": "kill-during-save"})
    _finish(proc, run_dir)  # dies inside its first save (step 3)
    return "" if proc.returncode == -signal.SIGKILL else f"expected SIGKILL, got {proc.returncode}"


def scenario_kill_during_async_save(run_dir: str, rng: random.Random) -> str:
    """--async-save: killed while its second checkpoint's writers run (the first complete)."""
    proc = _launch(run_dir, ASYNC, {"TST_FAULT_INJECTION": "kill-during-async-save"})
    _finish(proc, run_dir)
    if proc.returncode != -signal.SIGKILL:
        return f"expected SIGKILL, got {proc.returncode}"
    with open(os.path.join(run_dir, "ckpt", "latest_checkpointed_iteration.txt")) as f:
        latest = int(f.read())
    return "" if latest == 3 else f"latest checkpoint after the kill is {latest}, expected 3"


def scenario_random_kill_async(run_dir: str, rng: random.Random) -> str:
    _kill_at(run_dir, rng.randint(4, ITERS - 2), env=None, extra=ASYNC)
    return ""


def scenario_kill_after_switch(run_dir: str, rng: random.Random) -> str:
    _kill_at(run_dir, SWITCH + 1)  # last checkpoint (step 6) is at the switch
    return ""


def scenario_sigterm(run_dir: str, rng: random.Random) -> str:
    proc = _kill_at(run_dir, rng.randint(2, ITERS - 4), sig=signal.SIGTERM)
    return "" if proc.returncode == 0 else f"SIGTERM exit {proc.returncode}, expected 0"


def scenario_corrupt_checkpoint(run_dir: str, rng: random.Random) -> str:
    """A checkpoint damaged after it was written must be refused, by name, not loaded."""
    _kill_at(run_dir, 7)
    ckpt = os.path.join(run_dir, "ckpt")
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        it = int(f.read())
    target = os.path.join(ckpt, f"iter_{it:07d}", "common.pt")
    with open(target, "r+b") as f:
        f.seek(10)
        f.write(b"\x00garbage\x00")
    proc = _launch(run_dir, ["--load", ckpt])
    err = _finish(proc, run_dir)
    if proc.returncode == 0 or "failed its integrity check" not in err or target not in err:
        return f"corrupted checkpoint not refused by name (exit {proc.returncode})"
    # The operator's fix: fall back to the previous checkpoint, then resume.
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(it - 3))
    return ""


SCENARIOS = {
    "SIGKILL at a random step": scenario_random_kill,
    "SIGKILL during a save": scenario_kill_during_save,
    "SIGKILL during an async save": scenario_kill_during_async_save,
    "SIGKILL, async saves": scenario_random_kill_async,
    "SIGKILL after the switch": scenario_kill_after_switch,
    "SIGTERM (preemption)": scenario_sigterm,
    "corrupted checkpoint": scenario_corrupt_checkpoint,
}


def _scenario_row(tmp: str, name: str, runs: int, seed: int) -> tuple[str, list]:
    """One scenario's runs: (name, [(finished, problem, error, records) per run])."""
    scenario = SCENARIOS[name]
    rng = random.Random(f"{seed}:{name}")  # the same kill points whatever ran beside it
    out = []
    for r in range(runs):
        run_dir = os.path.join(tmp, f"{scenario.__name__}_{r}")
        os.makedirs(run_dir)
        problem = scenario(run_dir, rng)
        extra = ASYNC if scenario.__name__ in _ASYNC_SCENARIOS else []
        finished, error = _resume_until_done(run_dir, extra=extra)
        out.append((finished, problem, error, _records(os.path.join(run_dir, "metrics.jsonl"))))
    return name, out


def _reference(tmp: str) -> dict[int, tuple[float, int]]:
    reference_dir = os.path.join(tmp, "reference")
    os.makedirs(reference_dir)
    proc = _launch(reference_dir, [])
    err = _finish(proc, reference_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {err[-2000:]}")
    return _records(os.path.join(reference_dir, "metrics.jsonl"))


def run(runs: int, seed: int, only: list[str] | None = None, jobs: int = 2) -> list[dict]:
    names = [name for name in SCENARIOS if not only or name in only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        reference = pool.submit(_reference, tmp)
        scenarios = [pool.submit(_scenario_row, tmp, name, runs, seed) for name in names]
        want = reference.result()
        for future in scenarios:
            name, results = future.result()
            recovered = lost = 0
            notes = []
            for finished, problem, error, got in results:
                lost_here = sum(got.get(step) != value for step, value in want.items() if step >= 0)
                lost_here += int(got[-1][0])  # redone steps that disagreed with their first run
                lost += lost_here
                if finished and not problem and lost_here == 0:
                    recovered += 1
                notes += [n for n in (problem, error) if n]
            rows.append({"scenario": name, "runs": runs, "recovered": recovered,
                         "data_lost": lost, "notes": "; ".join(notes)})  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    args = parser.parse_args(argv)
    rows = run(args.runs, args.seed, jobs=args.jobs)
    print(f"{'scenario':<28} {'runs':>4} {'recovered':>9} {'data lost':>9}  notes")
    for row in rows:
        print(f"{row['scenario']:<28} {row['runs']:>4} {row['recovered']:>9} "
              f"{row['data_lost']:>9}  {row['notes']}")  # fmt: skip
    return 0 if all(r["recovered"] == r["runs"] and r["data_lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
