"""``examples/train_slurm.sbatch`` on a real two-node Slurm cluster (slurmctld + two slurmd on
this host, see ``slurm_cluster.py``): a tiny TP 2 x DP 2 TST model on real text, one torchrun
per node with two CPU processes each, meeting at a c10d rendezvous.

What each test does to the job is what a cluster does to it: the time-limit warning is
Slurm's own (``--signal=B:USR1@600`` in the script, reached by shortening the job's time
limit), the requeue is the script's, a lost node is every task process of that node killed
(or stopped) by pid. The times the README's "Multi-node and elastic launches" section quotes
are printed by these tests.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from run_checks import (
    assert_every_step_once,
    assert_healthy,
    checkpointed,
    last_iteration,
    wait_for,
)
from slurm_cluster import free_ports
from tiny_run import ENDLESS, ROOT, RUN_FLAGS, SLOW_LEAVERS, SWITCH, launch_env

pytestmark = pytest.mark.cluster

SCRIPT = "examples/train_slurm.sbatch"
# Two nodes, no GPUs; --time well away from the warning (600 s before the limit).
SBATCH = ["--nodes", "2", "--gpus-per-node=0", "--time=30"]


@pytest.fixture(autouse=True)
def no_job_left(slurm):
    """Whatever a test leaves queued or running is cancelled before the next one starts."""
    yield
    slurm.cancel_all()


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[cluster timing] {text}")


def submit(slurm, tmp_path: Path, env: dict, *flags: str) -> tuple[int, Path]:
    out = tmp_path / "job.out"
    job = slurm.sbatch(*SBATCH, "--output", str(out), SCRIPT, *RUN_FLAGS, *flags, cwd=ROOT, **env)
    return job, out


def node_tasks(slurm, job: int, node: str) -> list[psutil.Process]:
    """Every process the job runs on ``node``: torchrun and its workers (not slurmstepd)."""
    return slurm.job_processes(SLURM_JOB_ID=str(job), SLURMD_NODENAME=node)


def test_time_limit_warning_saves_and_the_requeued_job_resumes(slurm, corpus, tmp_path, capsys):
    env = launch_env(corpus, tmp_path, ENDLESS, MASTER_PORT=str(free_ports(1)[0]))
    save, metrics = Path(env["SAVE_DIR"]), Path(env["SAVE_DIR"]) / "metrics.jsonl"
    job, out = submit(slurm, tmp_path, env, "--save-interval", str(ENDLESS))
    wait_for(lambda: last_iteration(metrics) > SWITCH + 1, 480, "training past the switch")
    # 10 minutes: the warning (600 s before the limit) is due; slurmctld sends it at its next
    # time-limit check (every 30 s).
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    warned = wait_for(lambda: "USR1 (time-limit warning)" in out.read_text(), 150, "the warning")
    saved = wait_for(lambda: checkpointed(save) is not None, 180, "the checkpoint")
    stopped_at = checkpointed(save)
    wait_for(lambda: slurm.job(job).get("Restarts") == "1", 180, "the requeue")
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")  # no second warning
    requeued = time.monotonic()
    wait_for(lambda: last_iteration(metrics) > stopped_at + 2, 480, "the requeued job's steps")
    resumed = time.monotonic()
    # USR1 to the steps only (not the batch script): save and end, without a requeue.
    slurm.run("scancel", "--signal=USR1", str(job))
    record = slurm.wait_job(job, 300)
    log = out.read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log
    assert f"stopping at iteration {stopped_at}: signal" in log
    assert log.count("saved after the warning; requeued") == 1
    assert f"job {job} (start 1)" in log
    assert f"at iteration {stopped_at} (recovery phase)" in log  # "resumed from ..."
    last = checkpointed(save)
    assert last > stopped_at + 2 and f"stopping at iteration {last}: signal" in log
    assert_every_step_once(metrics, last, SWITCH)
    assert_healthy(log)
    report(
        capsys,
        f"time-limit warning -> checkpoint: {saved - warned:.1f} s (iteration {stopped_at}); "
        f"requeued -> {stopped_at + 3} steps done: {resumed - requeued:.1f} s",
    )


def test_scancel_saves_at_the_stop(slurm, corpus, tmp_path, capsys):
    """A plain ``scancel JOBID``: Slurm sends SIGTERM to every process of the job (torchrun,
    the trainers, the helpers their checkpoint writer started, the batch script) and SIGKILL
    after KillWait (30 s here, Slurm's default). The trainers save at their next step first."""
    env = launch_env(corpus, tmp_path, ENDLESS, MASTER_PORT=str(free_ports(1)[0]))
    save, metrics = Path(env["SAVE_DIR"]), Path(env["SAVE_DIR"]) / "metrics.jsonl"
    # A save before the signal: the helpers it started are signalled too.
    job, out = submit(slurm, tmp_path, env, "--save-interval", "2")
    wait_for(lambda: (checkpointed(save) or 0) >= 2, 480, "the first checkpoint")
    cancelled = time.monotonic()
    slurm.run("scancel", str(job))
    record = slurm.wait_job(job, 120)
    wait_for(lambda: not slurm.job_processes(SLURM_JOB_ID=str(job)), 120, "the job's processes")
    ended = time.monotonic()
    log = out.read_text()
    assert record["JobState"] == "CANCELLED", log
    stops = set(re.findall(r"stopping at iteration (\d+): signal", log))
    assert len(stops) == 1, log[-3000:]
    stopped_at = int(stops.pop())
    assert stopped_at > 2 and checkpointed(save) == stopped_at, log[-3000:]
    assert_every_step_once(metrics, stopped_at, SWITCH)
    assert "SIGTERM (scancel): saving, then ending" in log
    # The rendezvous store outlived the signal: no torchrun lost it while stopping.
    assert "error: saving a checkpoint" not in log and "Connection was likely closed" not in log
    report(capsys, f"scancel -> checkpoint at iteration {stopped_at}, job gone: "
                   f"{ended - cancelled:.1f} s")  # fmt: skip


def test_a_two_node_job_trains_loses_a_node_and_resubmission_resumes(
    slurm, corpus, tmp_path, capsys
):
    """A two-node job trains through the switch; every task of node n2 SIGKILLed ends it;
    the same command again resumes from the last checkpoint and finishes, its torchruns
    leaving cleanly although those not serving the store leave their exit barrier slowly."""
    iters = 20
    env = launch_env(corpus, tmp_path, iters, MASTER_PORT=str(free_ports(1)[0]), **SLOW_LEAVERS)
    save, metrics = Path(env["SAVE_DIR"]), Path(env["SAVE_DIR"]) / "metrics.jsonl"
    flags = ("--save-interval", "5")
    start = time.monotonic()
    job, out = submit(slurm, tmp_path, env, *flags)
    wait_for(lambda: (checkpointed(save) or 0) >= 5, 480, "a checkpoint past the switch")
    first_steps = time.monotonic() - start
    log = out.read_text()
    assert f"job {job} (start 0): 2 nodes x 2 GPUs" in log
    assert "layout: world=4 TP=2 PP=1 DP=2" in log
    assert log.count("switching to the recovery phase") == 1
    victims = node_tasks(slurm, job, "n2")
    assert any("torch.distributed.run" in " ".join(p.cmdline()) for p in victims), victims
    lost = time.monotonic()
    for proc in victims:
        proc.send_signal(signal.SIGKILL)
    record = slurm.wait_job(job, 120)
    ended = time.monotonic()
    assert record["JobState"] == "FAILED", out.read_text()
    assert ended - lost < 90, f"the job took {ended - lost:.0f} s to end after losing n2"
    resume_from = checkpointed(save)
    assert resume_from < iters

    out.rename(tmp_path / "lost.out")
    again, out = submit(slurm, tmp_path, env, *flags)  # the same command again
    record = slurm.wait_job(again, 600)
    log = out.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert f"at iteration {resume_from} (recovery phase)" in log  # "resumed from ..."
    assert_every_step_once(metrics, iters, SWITCH)  # the lost job's later steps set aside
    assert checkpointed(save) == iters
    # No per-save warning; torchrun found without it on PATH; no store traceback at the end.
    assert_healthy(log)
    report(
        capsys,
        f"two-node job: submit -> 5 steps through the switch, checkpointed: {first_steps:.1f} s; "
        f"node n2 lost (SIGKILL) -> job ended: {ended - lost:.1f} s",
    )


def test_a_hung_node_ends_the_job_after_the_distributed_timeout(slurm, corpus, tmp_path, capsys):
    env = launch_env(corpus, tmp_path, ENDLESS, MASTER_PORT=str(free_ports(1)[0]))
    metrics = Path(env["SAVE_DIR"]) / "metrics.jsonl"
    job, out = submit(slurm, tmp_path, env, "--save-interval", str(ENDLESS))
    wait_for(lambda: last_iteration(metrics) > SWITCH, 480, "training past the switch")
    # The rendezvous store is a process of the batch script on n1, not part of a torchrun.
    port = int(env["MASTER_PORT"])
    servers = [p for p in slurm.job_processes(SLURM_JOB_ID=str(job)) if _listens([p], port)]
    assert len(servers) == 1 and "TCPStore" in " ".join(servers[0].cmdline()), servers
    # Freeze n2 (a node that hangs): n1's ranks get no error, only silence, until
    # --distributed-timeout-minutes (1) is up.
    frozen = "n2"
    victims = node_tasks(slurm, job, frozen)
    hung = time.monotonic()
    for proc in victims:
        proc.send_signal(signal.SIGSTOP)
    record = slurm.wait_job(job, 400)
    ended = time.monotonic()
    assert record["JobState"] == "FAILED", out.read_text()
    # Well before the 10 minutes a hung rank would wait without the flag.
    assert 55 < ended - hung < 300, f"the job ended {ended - hung:.0f} s after {frozen} hung"
    report(capsys, f"node {frozen} hung (SIGSTOP) -> job ended: {ended - hung:.1f} s")


def _listens(procs: list[psutil.Process], port: int) -> bool:
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return True
    return False
