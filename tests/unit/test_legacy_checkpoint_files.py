"""Reading Megatron-LM legacy checkpoint files: no code runs, every tensor is checked, and
the tracker / folder layout (Megatron-LM's ``get_checkpoint_name``) is followed.
Loading into a real model at TP / PP / VPP / EP layouts: tests/distributed/
test_legacy_checkpoint.py."""

from __future__ import annotations

import argparse
import os
import pathlib
import warnings

import pytest
import torch

from tst import checkpointing
from tst import legacy_checkpoint as legacy


class _Payload:
    """Unpickled by a plain pickle reader, this creates a file: code run from the file."""

    def __init__(self, marker: str, shell: bool = False):
        self.marker, self.shell = marker, shell

    def __reduce__(self):
        if self.shell:
            return (os.system, (f"touch {self.marker}",))
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _save(path, state) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path


def test_reading_runs_no_code_from_the_file(tmp_path):
    marker = str(tmp_path / "ran")
    args = argparse.Namespace(method=_Payload(marker), act=torch.nn.functional.silu,
                              hidden_size=32)  # fmt: skip
    state = {"args": args, "checkpoint_version": 3.0, "model": {"w": torch.ones(2)}}
    file = _save(str(tmp_path / "a" / legacy.FILE), state)
    import megatron.core  # noqa: F401  (registers its safe globals, argparse.Namespace too)

    before = set(map(str, torch.serialization.get_safe_globals()))
    assert str(argparse.Namespace) in before
    got = legacy.read(file)
    assert set(map(str, torch.serialization.get_safe_globals())) == before  # megatron-core's kept
    assert not os.path.exists(marker)
    assert torch.equal(got["model"]["w"], torch.ones(2)) and got["args"].hidden_size == 32
    # A file calling into os is refused outright.
    shell = str(tmp_path / "ran-shell")
    state["args"].hook = _Payload(shell, shell=True)
    tampered = _save(str(tmp_path / "b" / legacy.FILE), state)
    with pytest.raises(legacy.LegacyCheckpointError, match=r"it would call posix.system"):
        legacy.read(tampered)
    assert not os.path.exists(shell) and not os.path.exists(marker)
    # The payloads are real: an unrestricted reader runs them.
    torch.load(tampered, weights_only=False)
    assert os.path.exists(marker) and os.path.exists(shell)


def test_unreadable_or_foreign_files_are_named(tmp_path):
    file = _save(str(tmp_path / "a" / legacy.FILE), {"model": {"w": torch.ones(4)}})
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(legacy.LegacyCheckpointError, match="not a readable torch file"):
        legacy.read(file)
    other = _save(str(tmp_path / "b" / legacy.FILE), {"state_dict": {"w": torch.ones(4)}})
    with pytest.raises(legacy.LegacyCheckpointError, match="holds no model weights"):
        legacy.read(other)
    with pytest.raises(legacy.LegacyCheckpointError, match="is missing"):
        legacy.read(str(tmp_path / "c" / legacy.FILE))


def test_folder_names_follow_megatron_lm():
    assert legacy.folder_name(1, 0, 0, pp_size=1, ep_size=1) == "mp_rank_01"
    assert legacy.folder_name(1, 2, 0, pp_size=4, ep_size=1) == "mp_rank_01_002"
    assert legacy.folder_name(0, 0, 3, pp_size=1, ep_size=4) == "mp_rank_00_003"
    assert legacy.folder_name(0, 1, 3, pp_size=2, ep_size=4) == "mp_rank_00_001_003"


def test_another_layout_is_refused_listing_the_folders(tmp_path):
    for name in ("mp_rank_00", "mp_rank_01"):
        os.makedirs(tmp_path / name)
    legacy.check_grid(str(tmp_path), tp=2, pp=1, ep=1)
    with pytest.raises(legacy.LegacyCheckpointError) as error:
        legacy.check_grid(str(tmp_path), tp=1, pp=2, ep=1)
    assert "(mp_rank_00, mp_rank_01)" in str(error.value)
    assert "would read 2 of them (mp_rank_00_000, mp_rank_00_001)" in str(error.value)


def test_each_tensor_is_checked_by_name_and_shape():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    good = {"0.weight": torch.full((2, 3), 0.5), "0.bias": torch.ones(2)}
    legacy.load_chunk(model, good, "f")
    assert torch.equal(model[0].weight, good["0.weight"])
    with pytest.raises(legacy.LegacyCheckpointError) as error:
        legacy.load_chunk(model, {"0.weight": torch.ones(2, 4), "1.bias": torch.ones(2)}, "f")
    message = str(error.value)
    assert "this model's 0.bias are not in it" in message
    assert "it holds 1.bias, which this model does not have" in message
    assert "shapes differ: 0.weight [2, 4] (this model: [2, 3])" in message


def test_old_versions_and_virtual_stage_mismatches_are_refused(tmp_path):
    os.makedirs(tmp_path / "mp_rank_00")
    file = str(tmp_path / "mp_rank_00" / legacy.FILE)
    chunk = torch.nn.Linear(2, 2)
    _save(file, {"checkpoint_version": 2.0, "model": chunk.state_dict()})
    with pytest.raises(legacy.LegacyCheckpointError, match="checkpoint version 2.0"):
        legacy.load(str(tmp_path), [chunk], 0, 1, 0, 1, 0, 1)
    _save(file, {"checkpoint_version": 3.0, "model": chunk.state_dict()})
    with pytest.raises(legacy.LegacyCheckpointError, match="holds model; this run's 2 model"):
        legacy.load(str(tmp_path), [chunk, chunk], 0, 1, 0, 1, 0, 1)
    saved = legacy.load(str(tmp_path), [chunk], 0, 1, 0, 1, 0, 1)
    assert saved == {"iteration": 0, "checkpoint_version": 3.0, "optimizer": False}


def test_the_layer_norm_names_of_both_specs_are_aliases():
    pairs = legacy._layer_key_aliases()
    local = "decoder.layers.3.input_layernorm.weight"
    te = "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert legacy._aliases(local, pairs) == [local, te]
    assert legacy._aliases(te, pairs) == [te, local]
    other = "decoder.layers.3.mlp.linear_fc2.weight"
    assert legacy._aliases(other, pairs) == [other]


def test_tracker_release_and_iteration_folders(tmp_path):
    root = str(tmp_path)
    tracker = os.path.join(root, checkpointing.TRACKER)
    with open(tracker, "w") as f:
        f.write("release")
    with pytest.raises(checkpointing.CheckpointError, match="names a release checkpoint"):
        checkpointing.latest_iteration(root)
    os.makedirs(os.path.join(root, "release", "mp_rank_00"))
    assert checkpointing.find_checkpoint(root) == checkpointing.RELEASE
    assert checkpointing.checkpoint_dir(root, checkpointing.RELEASE).endswith("/release")
    assert checkpointing.is_legacy(root, checkpointing.RELEASE)
    os.makedirs(os.path.join(root, "iter_0000007", "mp_rank_00"))
    with open(tracker, "w") as f:
        f.write("7")
    assert checkpointing.latest_iteration(root) == 7
    assert checkpointing.step_iteration(root, 7) == 7
    with pytest.raises(checkpointing.CheckpointError, match=r"complete ones: 7\)"):
        checkpointing.step_iteration(root, 8)


def test_ckpt_format_torch_is_accepted_and_saving_it_warns():
    from flags import one_rank_gpt

    from tst.config import parse_args

    base = one_rank_gpt(64, 8, 2, 2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert parse_args([*base, "--ckpt-format", "torch"]).run.ckpt_format == "torch"
    assert not [w for w in seen if "--ckpt-format" in str(w.message)]
    with pytest.warns(
        UserWarning, match="--ckpt-format torch: checkpoints are saved in torch_dist"
    ):
        parse_args([*base, "--ckpt-format", "torch", "--save", "s"])


def test_the_exporter_names_a_legacy_checkpoint(tmp_path):
    from tst.export import ExportError
    from tst.export.loading import resolve_checkpoint

    os.makedirs(tmp_path / "iter_0000001" / "mp_rank_00")
    (tmp_path / checkpointing.TRACKER).write_text("1")
    with pytest.raises(ExportError, match="is a Megatron-LM legacy checkpoint"):
        resolve_checkpoint(str(tmp_path))
