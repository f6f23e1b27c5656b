"""Multi-node torchrun without a scheduler, and torchrun's elastic restarts, through the launch
script: two launchers on this host (``MAX_RESTARTS=1 examples/train_multi_node.sh``, NODE_RANK
0 and 1) meeting at a c10d rendezvous, one rank SIGKILLed mid-run. A tiny TP 2 x DP 2 TST
model on real text, 4 CPU processes. (``train_single_node.sh`` runs the same torchrun with
``--standalone``; ``tests/tools/test_examples.py`` checks its command lines.)
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


# torch's own race, not the scripts': with the worker store apart from the rendezvous store
# (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, see the README) torchrun picks the workers' store
# port by binding port 0 and closing it, and rank 0's worker binds it seconds later; a busy
# host (this suite's other workers open thousands of gloo sockets) can take it in between.
PORT_RACE = "EADDRINUSE"


def test_two_launchers_meet_restart_a_killed_rank_and_resume(corpus, tmp_path, capsys):
    """``train_multi_node.sh`` on two "nodes" (NODE_RANK 0 and 1) meeting at a c10d
    rendezvous, ``MAX_RESTARTS=1``: a rank of node 1 SIGKILLed after the first checkpoint
    makes both torchruns stop their workers and start the whole group again, which resumes
    from that checkpoint and finishes the run. Once more from the start if torch's own port
    race (above) struck."""
    for attempt in (1, 2):
        run_dir = tmp_path / f"attempt{attempt}"
        outcome = _launch_kill_and_resume(corpus, run_dir)
        if outcome is not None:
            break
        report(capsys, f"attempt {attempt}: torch's worker-store port race (EADDRINUSE); again")
    else:
        raise AssertionError("torch's worker-store port race struck twice in a row")
    report(capsys, outcome)


def _launch_kill_and_resume(corpus, run_dir: Path) -> str | None:
    iters = 15
    env = launch_env(
        corpus, run_dir, iters, NNODES="2", MASTER_ADDR="127.0.0.1", MAX_RESTARTS="1",
        MASTER_PORT=str(free_ports(1)[0]), RUN_ID=f"test-{time.time_ns()}", **SLOW_LEAVERS,
    )  # fmt: skip
    save, metrics = Path(env["SAVE_DIR"]), Path(env["SAVE_DIR"]) / "metrics.jsonl"
    logs = [run_dir / "node0.out", run_dir / "node1.out"]
    resumed = re.compile(r"resumed from \S+ at iteration (\d+)")

    def log_text() -> str:
        return "\n".join(log.read_text() for log in logs)

    def restarted_first_step() -> bool:
        match = resumed.search(log_text())
        return bool(match) and last_iteration(metrics) > int(match[1])

    start = time.monotonic()
    with (
        launched("train_multi_node.sh", {**env, "NODE_RANK": "0"}, logs[0],
                 "--save-interval", "5") as node0,
        launched("train_multi_node.sh", {**env, "NODE_RANK": "1"}, logs[1],
                 "--save-interval", "5") as node1,
    ):  # fmt: skip
        wait_for(
            lambda: (checkpointed(save) or 0) >= 5 or PORT_RACE in log_text(),
            480,
            "the first checkpoints",
        )
        if PORT_RACE in log_text():
            return None
        first_steps = time.monotonic() - start
        victim = _worker(node1, local_rank="1")
        # What the rank started (data workers, the checkpoint writers' queue manager and its
        # resource tracker) must end with it, not stay behind as orphans of init.
        helpers = victim.children(recursive=True)
        assert helpers, "the rank had started no helper process: nothing to check"
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()

        def restarted_or_ended():  # a launcher that ends stops the wait (its log says why)
            return restarted_first_step() or node0.poll() is not None or node1.poll() is not None

        first_step = wait_for(restarted_or_ended, 480, "the restarted group's first step")
        wait_for(lambda: not _running(helpers), 30, "the killed rank's helpers to end")
        statuses = [finish(node0), finish(node1)]
    text = [log.read_text() for log in logs]
    if statuses != [0, 0] and PORT_RACE in "\n".join(text):
        return None  # the race struck the restarted group (no restart left)
    assert statuses == [0, 0], "\n".join(text)
    # Rank 0 prints the layout, once per start of the group (two), on whichever node it is.
    assert sum(t.count("layout: world=4 TP=2 PP=1 DP=2") for t in text) == 2, text
    resumed_at = int(resumed.search("\n".join(text))[1])
    assert resumed_at >= 5 and resumed_at % 5 == 0
    # The restarted group went on from that checkpoint: each step once in the metrics (the
    # killed group's steps after it are set aside), and those steps repeated exactly.
    records = assert_every_step_once(metrics, iters, SWITCH)
    superseded = Path(f"{metrics}.superseded")
    for old in train_records(superseded) if superseded.exists() else []:
        assert old["iteration"] > resumed_at
        assert old["loss"] == pytest.approx(records[old["iteration"] - 1]["loss"], rel=1e-6)
    assert checkpointed(save) == iters
    # The killed rank's torchrun saw its worker fail. The other one saw the group end in one of
    # two ways, whichever came first: its own ranks' collectives failed ("failed (exitcode"), or
    # it stopped them for the restart its peer asked for at the rendezvous (torch logs that at
    # INFO; its "closing signal SIGTERM" lines show). After that: no traceback, though the
    # torchruns not serving the store left their exit barrier last and slowly.
    assert "failed (exitcode" in text[1], text[1]
    for t in text:
        end = max(t.rfind(mark) for mark in ("failed (exitcode", "closing signal SIGTERM"))
        assert end >= 0, t  # both torchruns saw the group end
        assert_healthy(t[end:].split("\n", 1)[-1])
    return (
        f"two torchrun launchers: first {5} steps {first_steps:.1f} s; rank killed -> restarted "
        f"group's first step (iteration {resumed_at + 1}): {first_step - killed:.1f} s"
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
    """The training process of ``local_rank`` under a launch script: a child of its torchrun,
    which sets LOCAL_RANK (the helpers a worker forks have its environment, not that parent)."""
    for proc in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env, parent = proc.environ(), proc.parent()
            if (
                env.get("LOCAL_RANK") == local_rank
                and "pretrain_tst.py" in " ".join(proc.cmdline())
                and parent is not None
                and "torch.distributed.run" in " ".join(parent.cmdline())
            ):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under pid {launcher.pid}")


def test_the_single_node_script_exits_with_the_rerun_engines_code(corpus, tmp_path):
    """torchrun exits 1 when its workers exit 17 (the rerun engine's transient-error code);
    ``train_single_node.sh`` exits with the trainer's code, read from its record."""
    env = launch_env(corpus, tmp_path, 6)
    log = tmp_path / "single.out"
    with launched("train_single_node.sh", env, log, "--save-interval", "1000",
                  "--rerun-mode", "validate_results", "--error-injection-rate", "1") as proc:  # fmt: skip
        status = finish(proc)
    text = log.read_text()
    assert status == 17, text
    assert "exitcode  : 17" in text  # torchrun's summary; it exited 1 itself
    record = Path(env["SAVE_DIR"]) / "rerun_exit.json"
    assert f"the rerun engine ended the run with exit code 17 (see {record})" in text
    # A later launch that fails otherwise is not given the old record's code.
    with launched("train_single_node.sh", env, log, "--no-such-flag") as proc:
        assert finish(proc) not in (0, 16, 17)
