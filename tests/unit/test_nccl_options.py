"""--nccl-communicator-config-path and --high-priority-stream-groups (Megatron-LM's): the YAML
and the group names are checked before any process group starts (megatron-core would drop an
unknown name or key without a word), one line each; over gloo the run says they cannot apply
and trains. ``bench/gpu_check.sh`` passes both to NCCL groups on a GPU."""

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
    assert "is not YAML" in _refused(tmp_path, "dp: {max_ctas: 8\n")
    assert "holds a list" in _refused(tmp_path, "- dp\n")
    missing = str(tmp_path / "none.yaml")
    assert _refused(tmp_path, None, "--nccl-communicator-config-path", missing) == (
        f"--nccl-communicator-config-path {missing}: No such file or directory")  # fmt: skip
    assert "--high-priority-stream-groups: no process group is named 'dpcp'" in _refused(
        tmp_path, None, "--high-priority-stream-groups", "dp_cp", "dpcp")  # fmt: skip


def test_over_gloo_they_are_said_not_to_apply_and_the_run_trains(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("dp: {max_ctas: 16}\n")
    metrics = tmp_path / "m.jsonl"
    with pytest.warns(UserWarning, match="this run's groups are gloo: ignored"):
        rc = pretrain_tst.main(BASE + ["--nccl-communicator-config-path", str(good),
                                       "--high-priority-stream-groups", "dp_cp", "ep_dp",
                                       "--metrics-file", str(metrics)])  # fmt: skip
    assert rc == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]
