"""The rerun engine (--rerun-mode) on two gloo ranks: every rank's part of the machine's
state goes into the checkpoint and comes back to the same rank, the ranks agree on every
decision (exit codes), and re-runs change no training under a pipeline layout.

References: the same run without the engine (exact, CPU is deterministic) and
megatron-core's diagnosis of an injected persistent error (16, 16 on the same node, 17 on
another).
"""

from __future__ import annotations

import json
import os
import types

import pytest
from test_trainer import BASE
from trainer_runs import tracker_rows

import pretrain_tst


def _run(argv: list[str], metrics: str, other_node: bool = False) -> tuple[int, list[dict]]:
    import megatron.core.rerun_state_machine as rsm
    import torch.distributed as dist

    real_os = rsm.os
    if other_node:  # the job rescheduled elsewhere: another host name for megatron-core
        node = ("Linux", "another-node", "", "", "")
        rsm.os = types.SimpleNamespace(uname=lambda: node, getenv=os.getenv)
    try:
        rc = pretrain_tst.main(argv + ["--metrics-file", metrics])
    finally:
        rsm.os = real_os
    dist.barrier()
    with open(metrics) as f:
        return rc, [json.loads(line) for line in f]


def _losses(records):
    return [(r["iteration"], r["phase"], r["loss"]) for r in records if r.get("loss") is not None]


LAYOUTS = {
    "PP2": ["--pipeline-model-parallel-size", "2"],
    # A re-run's forward meets the distributed optimizer's parameter all-gather already
    # consumed by the first run's pre-hooks, and reduces its gradients again in overlap.
    "DP2-distopt-overlap": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                            "--overlap-param-gather"],
}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_report_stats_changes_no_training(world2, tmp_path, layout):
    argv = BASE + LAYOUTS[layout]
    want = world2.run(_run, argv, str(tmp_path / "a.jsonl"))[0]
    got = world2.run(_run, argv + ["--rerun-mode", "report_stats"], str(tmp_path / "b.jsonl"))
    assert [rc for rc, _ in got] == [0, 0]
    assert _losses(got[0][1]) == _losses(want[1])


def test_persistent_error_cycle_on_two_data_parallel_ranks(world2, tmp_path, capsys):
    """Both ranks reject (rate 1 injects on every rank): 16 with a checkpoint holding both
    ranks' state, 16 again on the same node, 17 on another after each rank recomputed its
    own rejected result; under another layout the state is ignored."""
    ckpt, tracker = str(tmp_path / "ckpt"), str(tmp_path / "tracker.txt")
    flags = BASE + ["--rerun-mode", "validate_results", "--save", ckpt, "--load", ckpt,
                    "--error-injection-rate", "1", "--error-injection-type", "persistent_error",
                    "--result-rejected-tracker-filename", tracker]  # fmt: skip
    assert [rc for rc, _ in world2.run(_run, flags, str(tmp_path / "a.jsonl"))] == [16, 16]
    assert [rc for rc, _ in world2.run(_run, flags, str(tmp_path / "b.jsonl"))] == [16, 16]
    got = world2.run(_run, flags, str(tmp_path / "c.jsonl"), other_node=True)
    assert [rc for rc, _ in got] == [17, 17]
    lines = tracker_rows(tracker)
    for rank in (0, 1):
        mine = [(d["iteration"], d["status"], d["result"]) for d in lines if d["rank"] == rank]
        assert [s for _, s, _ in mine] == ["initial_run", "first_rerun_reproducible",
                                           "second_rerun_not_reproducible"]  # fmt: skip
        assert {i for i, _, _ in mine} == {2}
        assert len({r for _, _, r in mine}) == 1  # the same value each time, on this rank
    # On another grid the state is ignored, as Megatron-LM does ("Job sharding has changed").
    capsys.readouterr()
    metrics = str(tmp_path / "d.jsonl")
    rc = pretrain_tst.main(BASE + ["--load", ckpt, "--rerun-mode", "validate_results",
                                   "--metrics-file", metrics])  # fmt: skip
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    assert rc == 0 and _losses(records)[0][0] == 2
    assert "Job sharding has changed: Rerun state will be ignored" in capsys.readouterr().out
