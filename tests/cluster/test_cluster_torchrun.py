"""Multi-node torchrun without a scheduler, and torchrun's elastic restarts, through the launch
scripts: two launchers on this host (``examples/train_multi_node.sh``, NODE_RANK 0 and 1)
meeting at a c10d rendezvous, and ``MAX_RESTARTS=1 examples/train_single_node.sh`` with one
rank SIGKILLed mid-run. A tiny TP 2 x DP 2 TST model on real text, 4 CPU processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from run_checks import (
    assert_every_step_once,
    assert_healthy,
    checkpointed,
    last_iteration,
    train_records,
    wait_for,
)
from slurm_cluster import free_ports
from tiny_run import ROOT, RUN_FLAGS, SLOW_LEAVERS, SWITCH, launch_env

pytestmark = pytest.mark.cluster


@contextlib.contextmanager
def launched(script: str, env: dict, log: Path, *flags: str):
    """A launch script running in its own session; ended with everything it started (by
    process group, then any survivor by pid) when the test leaves the block early."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", f"examples/{script}", *RUN_FLAGS, *flags],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            survivors = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for child in survivors:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> int:
    """The launcher's exit status (a launcher still running then fails the test)."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the launcher (pid {proc.pid}) still runs after {timeout_s} s"
        ) from None


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[cluster timing] {text}")


def test_two_launchers_meet_at_a_c10d_rendezvous(corpus, tmp_path, capsys):
    iters = 8
    env = launch_env(
        corpus, tmp_path, iters, NNODES="2", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_ports(1)[0]), RUN_ID=f"test-{time.time_ns()}", **SLOW_LEAVERS,
    )  # fmt: skip
    logs = [tmp_path / "node0.out", tmp_path / "node1.out"]
    start = time.monotonic()
    with (
        launched("train_multi_node.sh", {**env, "NODE_RANK": "0"}, logs[0]) as node0,
        launched("train_multi_node.sh", {**env, "NODE_RANK": "1"}, logs[1]) as node1,
    ):
        statuses = [finish(node0), finish(node1)]
    wall = time.monotonic() - start
    text = [log.read_text() for log in logs]
    assert statuses == [0, 0], "\n".join(text)
    assert sum(t.count("layout: world=4 TP=2 PP=1 DP=2") for t in text) == 1  # rank 0 prints
    assert_every_step_once(Path(env["SAVE_DIR"]) / "metrics.jsonl", iters, SWITCH)
    assert checkpointed(Path(env["SAVE_DIR"])) == iters
    for t in text:
        assert_healthy(t)  # the torchrun not serving the store left last and slowly: no traceback
    report(capsys, f"two torchrun launchers, {iters} steps through the switch: {wall:.1f} s")


def test_a_killed_rank_is_restarted_and_resumes_from_the_last_checkpoint(corpus, tmp_path, capsys):
    iters = 15
    env = launch_env(corpus, tmp_path, iters, GPUS_PER_NODE="4", MAX_RESTARTS="1")
    save, metrics = Path(env["SAVE_DIR"]), Path(env["SAVE_DIR"]) / "metrics.jsonl"
    log = tmp_path / "launcher.out"
    resumed = re.compile(r"resumed from \S+ at iteration (\d+)")

    def restarted_first_step() -> bool:
        match = resumed.search(log.read_text())
        return bool(match) and last_iteration(metrics) > int(match[1])

    with launched("train_single_node.sh", env, log, "--save-interval", "5") as launcher:
        wait_for(lambda: (checkpointed(save) or 0) >= 5, 480, "the first checkpoints")
        victim = _worker(launcher, local_rank="1")
        # What the rank started (data workers, the checkpoint writers' queue manager and its
        # resource tracker) must end with it, not stay behind as orphans of init.
        helpers = victim.children(recursive=True)
        assert helpers, "the rank had started no helper process: nothing to check"
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        first_step = wait_for(restarted_first_step, 480, "the restarted group's first step")
        wait_for(lambda: not _running(helpers), 30, "the killed rank's helpers to end")
        status = finish(launcher)
    text = log.read_text()
    assert status == 0, text
    resumed_at = int(resumed.search(text)[1])
    assert resumed_at >= 5 and resumed_at % 5 == 0
    # The restarted group went on from that checkpoint: each step once in the metrics (the
    # killed group's steps after it are set aside), and those steps repeated exactly.
    records = assert_every_step_once(metrics, iters, SWITCH)
    superseded = Path(f"{metrics}.superseded")
    for old in train_records(superseded) if superseded.exists() else []:
        assert old["iteration"] > resumed_at
        assert old["loss"] == pytest.approx(records[old["iteration"] - 1]["loss"], rel=1e-6)
    assert checkpointed(save) == iters
    report(
        capsys,
        f"rank killed -> restarted group's first step (iteration {resumed_at + 1}): "
        f"{first_step - killed:.1f} s",
    )


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (an ended orphan not yet reaped is a zombie: ended)."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _worker(launcher: subprocess.Popen, local_rank: str) -> psutil.Process:
    """The training process of ``local_rank``: a child of torchrun (the launcher script execs
    it), which sets LOCAL_RANK (the checkpoint writers a worker forks have its environment)."""
    for proc in psutil.Process(launcher.pid).children():
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("LOCAL_RANK") == local_rank and "pretrain_tst.py" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under pid {launcher.pid}")
