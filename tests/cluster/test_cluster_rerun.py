"""The rerun engine's exits under ``examples/train_slurm.sbatch`` on a real two-node Slurm
cluster whose nodes have host names of their own (n2's slurmd in its own UTS namespace), as
megatron-core tells GPUs apart by host name: a one-node job (TP 2, two CPU processes) whose
result is rejected is requeued by the script without the node it ran on, and resumes from
the engine's checkpoint on the other node.

The errors are megatron-core's own injected ones (``--error-injection-rate 1``): a
persistent error (exit 16 on the first node, the step re-run from the checkpoint on the
second, diagnosed there: exit 17, the job ends with it), and a transient one in the first
start only (exit 17 after the re-run in place; the job trains on to its end elsewhere).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from trainer_runs import tracker_rows

from run_checks import assert_every_step_once
from slurm_cluster import SlurmCluster, free_ports, unavailable
from tiny_run import ROOT, RUN_FLAGS, SWITCH, launch_env

pytestmark = pytest.mark.cluster

SCRIPT = "examples/train_slurm.sbatch"
ITERS = 6
RERUN = ["--rerun-mode", "validate_results", "--error-injection-rate", "1"]


@pytest.fixture(scope="module")
def slurm():
    """Two nodes, n1 on this host's name, n2 on its own ("localhost": it resolves to the
    loopback address like the host's own name, so torchrun's rendezvous finds it)."""
    reason = unavailable()
    if reason:
        pytest.fail(reason, pytrace=False)
    cluster = SlurmCluster(hostnames={"n2": "localhost"})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()


@pytest.fixture(autouse=True)
def no_job_left(slurm):
    yield
    slurm.cancel_all()


def _submit(slurm, corpus, tmp_path: Path, config_extra: str, *flags: str, nodes: int = 1,
            extra_env: dict | None = None):  # fmt: skip
    """A job of ITERS steps on ``nodes`` nodes; ``config_extra`` is appended to its config."""
    env = launch_env(corpus, tmp_path, ITERS, MASTER_PORT=str(free_ports(1)[0]),
                     **(extra_env or {}))  # fmt: skip
    with open(env["CONFIG"], "a") as f:
        f.write(config_extra)
    out = tmp_path / "job.out"
    job = slurm.sbatch("--nodes", str(nodes), "--gpus-per-node=0", "--time=30", "--output", str(out),
                       SCRIPT, *RUN_FLAGS, "--save-interval", "1000", *flags,
                       cwd=ROOT, **env)  # fmt: skip
    return job, out, Path(env["SAVE_DIR"])


def _finished(slurm, job: int, out: Path) -> tuple[dict, str, float]:
    """The job's record once it has ended, its output, and the seconds waited."""
    start = time.monotonic()
    record = slurm.wait_job(job, 600)
    return record, out.read_text(), time.monotonic() - start


def test_a_persistent_error_is_rerun_on_the_other_node_and_diagnosed(
    slurm, corpus, tmp_path, capsys
):
    tracker = tmp_path / "rejected.txt"
    job, out, save = _submit(
        slurm, corpus, tmp_path, "",
        *RERUN, "--error-injection-type", "persistent_error",
        "--result-rejected-tracker-filename", str(tracker),
    )  # fmt: skip
    record, log, took = _finished(slurm, job, out)
    # The first start exits 16 on one node; the script requeues the job without it; on the
    # other node megatron-core re-runs the step and diagnoses a persistent error: 17, the end.
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "17:0", log
    assert record["Restarts"] == "1", log
    first, second = record["ExcNodeList"], record["NodeList"]
    assert {first, second} == {"n1", "n2"}, record
    assert ("the rerun engine ended the run with exit code 16 (iteration 2: reproducible on "
            "the same GPU") in log  # fmt: skip
    assert f"result rejected on node(s) {first}" in log
    assert f"requeued without {first} (1 node(s) left in partition debug)" in log
    assert "Possible persistent error!!" in log
    assert "exit code 17 (iteration 2: re-run on another GPU" in log
    assert log.count("requeued without") == 1  # a diagnosis: not requeued again
    # Both ranks (TP 2) rejected the injected result; the re-run on the other node
    # recomputed it exactly, from the checkpoint of the step's start.
    rows = tracker_rows(str(tracker))
    assert sorted((r["rank"], r["status"]) for r in rows) == [
        (rank, status) for rank in (0, 1) for status in
        ("first_rerun_reproducible", "initial_run", "second_rerun_not_reproducible")
    ], rows  # fmt: skip
    assert len({r["result"] for r in rows if r["rank"] == 0}) == 1
    # The record of the second start names the node and its own host name.
    ended = json.loads((save / "rerun_exit.json").read_text())
    assert (ended["exit_code"], ended["next"], ended["nodes"]) == (17, "stop", [second])
    assert ended["slurm_job_id"] == str(job) and ended["slurm_restart_count"] == "1"
    assert {r["host"] for r in ended["ranks"]} == {
        slurm.hostnames.get(second, socket.gethostname())
    }
    with capsys.disabled():
        print(f"\n[cluster timing] persistent error: 16 on {first}, requeued, 17 on {second}: "
              f"{took:.1f} s")  # fmt: skip


def test_a_transient_error_is_requeued_without_the_node_and_trains_to_the_end(
    slurm, corpus, tmp_path, capsys
):
    # The fault happens in the first start only, wherever it runs: the config (sourced by
    # every start) injects it while Slurm has not restarted the job.
    inject = ('if [[ "${SLURM_RESTART_COUNT:-0}" == 0 ]]; then TRAIN_ARGS+=('
              + " ".join(RERUN) + "); fi\n")  # fmt: skip
    job, out, save = _submit(slurm, corpus, tmp_path, inject, "--rerun-mode", "validate_results")
    record, log, took = _finished(slurm, job, out)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert record["Restarts"] == "1", log
    first = record["ExcNodeList"]
    assert first in ("n1", "n2") and record["NodeList"] != first, record
    assert "Possible transient error!!" in log
    assert "exit code 17 (iteration 2: transient" in log
    assert f"requeued without {first}" in log
    # Step 2 was not taken in the first start: the second resumes from the step's start.
    assert_every_step_once(save / "metrics.jsonl", ITERS, SWITCH)
    assert not (save / "rerun_exit.json").exists()  # the second start's trainer removed it
    with capsys.disabled():
        print(f"\n[cluster timing] transient error: 17 on {first}, requeued, trained on: "
              f"{took:.1f} s")  # fmt: skip


def test_a_job_whose_every_node_rejected_a_result_is_not_requeued(slurm, corpus, tmp_path):
    """A two-node job (TP 2 x DP 2, a TP group a node): both nodes reject the injected
    result, so without them the partition has no node left: the job ends with 16, the
    script saying how to go on."""
    job, out, save = _submit(slurm, corpus, tmp_path, "", *RERUN, "--error-injection-type",
                             "persistent_error", nodes=2)  # fmt: skip
    record, log, _ = _finished(slurm, job, out)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "16:0", log
    assert record["Restarts"] == "0", log
    assert "result rejected on node(s) n1,n2" in log
    assert ("not requeued: without n1,n2 partition debug has 0 of the 2 nodes the job needs; "
            "resubmit with --exclude=n1,n2 where there are more") in log  # fmt: skip
    ended = json.loads((save / "rerun_exit.json").read_text())
    assert ended["nodes"] == ["n1", "n2"] and ended["rejected_ranks"] == [0, 1, 2, 3]
    assert ended["next"] == "resume_elsewhere"


def test_rerun_requeue_0_ends_the_job_with_the_trainers_code(slurm, corpus, tmp_path):
    """RERUN_REQUEUE=0: the engine's 16 ends the job (no requeue), with that exit code."""
    env_flag = {"RERUN_REQUEUE": "0"}
    job, out, save = _submit(slurm, corpus, tmp_path, "", *RERUN, "--error-injection-type",
                             "persistent_error", extra_env=env_flag)  # fmt: skip
    record, log, _ = _finished(slurm, job, out)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "16:0", log
    assert record["Restarts"] == "0" and "requeued" not in log, log
    assert "the rerun engine ended the run with exit code 16" in log
