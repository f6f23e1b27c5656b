"""NCCL group flags (Megatron-LM's): --nccl-communicator-config-path and
--high-priority-stream-groups (the YAML and the group names are checked before any process
group starts; megatron-core would drop an unknown name or key without a word), --use-sharp /
--sharp-enabled-group and --pipeline-model-parallel-comm-backend (megatron-core's rules up
front), one line each; all reach megatron-core's initialize_model_parallel for NCCL groups, and
over gloo the run says they cannot apply and trains. ``bench/gpu_check.sh`` passes the first
two to NCCL groups on a GPU."""

from __future__ import annotations

import json

import pytest
from flags import SMALL_GPT

import pretrain_tst
from tst.nccl_options import GROUPS, read_nccl_communicator_config

BASE = [
    "--mock-data", "--vocab-size", "384", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--train-iters", "2", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0",
    "--num-workers", "0", *SMALL_GPT,
]  # fmt: skip


def _refused(tmp_path, text: str | None, *extra: str) -> str:
    argv = list(extra)
    if text is not None:
        path = tmp_path / "nccl.yaml"
        path.write_text(text)
        argv = ["--nccl-communicator-config-path", str(path), *argv]
    with pytest.raises(ValueError) as info:
        pretrain_tst.main(BASE + argv)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_the_config_file_and_group_names_are_checked(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("dp: {cga_cluster_size: 4, max_ctas: 32, min_ctas: 32}\n"
                    "tp:\n  net_name: IB\nep_dp: {is_high_priority_stream: true}\n")  # fmt: skip
    assert read_nccl_communicator_config(str(good)) == {
        "dp": {"cga_cluster_size": 4, "max_ctas": 32, "min_ctas": 32},
        "tp": {"net_name": "IB"},
        "ep_dp": {"is_high_priority_stream": True},
    }
    # The names are megatron-core's: each one it looks up when it builds its groups.
    import inspect

    from megatron.core import parallel_state

    source = inspect.getsource(parallel_state.initialize_model_parallel)
    assert sum(f'"{name}", nccl_comm_cfgs' in source for name in GROUPS) == len(GROUPS)
    assert "no process group is named 'data'" in _refused(tmp_path, "data: {max_ctas: 8}\n")
    assert "dp.max_cta is not an NCCL setting" in _refused(tmp_path, "dp: {max_cta: 8}\n")
    assert "dp.max_ctas must be a positive integer, got '8'" in _refused(
        tmp_path, "dp: {max_ctas: '8'}\n")  # fmt: skip
    assert "tp.net_name must be IB or socket" in _refused(tmp_path, "tp: {net_name: eth}\n")
    assert "is not valid YAML" in _refused(tmp_path, "dp: {max_ctas: 8\n")
    assert "must hold a mapping of process-group names to NCCL settings, not a list" in _refused(
        tmp_path, "- dp\n")  # fmt: skip
    missing = str(tmp_path / "none.yaml")
    assert _refused(tmp_path, None, "--nccl-communicator-config-path", missing) == (
        f"--nccl-communicator-config-path {missing}: No such file or directory")  # fmt: skip
    assert "--high-priority-stream-groups: no process group is named 'dpcp'" in _refused(
        tmp_path, None, "--high-priority-stream-groups", "dp_cp", "dpcp")  # fmt: skip
    assert "add --use-sharp (megatron-core's rule)" in _refused(
        tmp_path, None, "--sharp-enabled-group", "dp")  # fmt: skip
    assert "needs --num-distributed-optimizer-instances > 1" in _refused(
        tmp_path, None, "--use-sharp", "--sharp-enabled-group", "dp_replica")  # fmt: skip
    assert "invalid choice: 'mpi'" in _refused(
        tmp_path, None, "--pipeline-model-parallel-comm-backend", "mpi")  # fmt: skip


def test_the_nccl_group_options_reach_initialize_model_parallel():
    from tst.config import parse_args
    from tst.nccl_options import group_options

    assert group_options(parse_args(BASE).parallel) == {}
    cfg = parse_args(BASE + ["--use-sharp", "--sharp-enabled-group", "dp",
                             "--pipeline-model-parallel-comm-backend", "nccl",
                             "--high-priority-stream-groups", "dp_cp"])  # fmt: skip
    options = group_options(cfg.parallel)
    assert options == {"use_sharp": True, "sharp_enabled_group": "dp",
                       "pipeline_model_parallel_comm_backend": "nccl",
                       "high_priority_stream_groups": ["dp_cp"]}  # fmt: skip
    import inspect

    from megatron.core import parallel_state

    accepted = inspect.signature(parallel_state.initialize_model_parallel).parameters
    assert set(options) | {"nccl_communicator_config_path"} <= set(accepted)


def test_over_gloo_they_are_said_not_to_apply_and_the_run_trains(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("dp: {max_ctas: 16}\n")
    metrics = tmp_path / "m.jsonl"
    with pytest.warns(UserWarning, match="--nccl-communicator-config-path, --high-priority-"
                      "stream-groups, --use-sharp, --pipeline-model-parallel-comm-backend set "
                      "NCCL communicators; this run's groups are gloo: ignored"):  # fmt: skip
        rc = pretrain_tst.main(BASE + ["--nccl-communicator-config-path", str(good),
                                       "--high-priority-stream-groups", "dp_cp", "ep_dp",
                                       "--use-sharp", "--pipeline-model-parallel-comm-backend",
                                       "nccl", "--metrics-file", str(metrics)])  # fmt: skip
    assert rc == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]
