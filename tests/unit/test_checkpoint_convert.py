"""--ckpt-convert-format / --ckpt-convert-save (Megatron-LM's): the --load checkpoint saved
again, at its iteration, into CKPT_CONVERT_SAVE/torch_dist, with no step run. Resuming the
copy trains what resuming the original trains, exactly; with --no-save-optim the copy holds
the weights only (it resumes with --no-load-optim, as any such checkpoint). Bad combinations
are one line each."""

from __future__ import annotations

import json
import os

import pytest
from flags import SMALL_GPT

import pretrain_tst
from tst.checkpointing import latest_iteration

BASE = [
    "--mock-data", "--vocab-size", "384", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "6", "--tst-bag-size", "2", "--tst-iters", "2",
    "--lr", "1e-2", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
    *SMALL_GPT,
]  # fmt: skip


def _losses(argv: list[str], metrics) -> list[tuple[int, float]]:
    assert pretrain_tst.main(argv + ["--metrics-file", str(metrics)]) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in records if r.get("loss") is not None]


def test_a_converted_checkpoint_resumes_as_the_original(tmp_path, capsys):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "converted")
    _losses(BASE + ["--save", ckpt, "--exit-interval", "4"], tmp_path / "a.jsonl")
    assert latest_iteration(ckpt) == 4
    trained = _losses(BASE + ["--load", ckpt, "--ckpt-convert-format", "torch_dist",
                              "--ckpt-convert-save", out], tmp_path / "b.jsonl")  # fmt: skip
    assert trained == []  # no step
    copy = os.path.join(out, "torch_dist")
    assert latest_iteration(copy) == 4
    assert f"converted checkpoint: {ckpt} (iteration 4) -> {copy} (torch_dist)" in (
        capsys.readouterr().out)  # fmt: skip
    original = _losses(BASE + ["--load", ckpt], tmp_path / "c.jsonl")
    converted = _losses(BASE + ["--load", copy], tmp_path / "d.jsonl")
    assert [i for i, _ in original] == [5, 6] and converted == original
    # Weights only: the copy resumes with --no-load-optim (a fresh optimizer: other losses).
    light = str(tmp_path / "light")
    _losses(BASE + ["--load", ckpt, "--ckpt-convert-format", "torch_dist", "--ckpt-convert-save",
                    light, "--no-save-optim"], tmp_path / "e.jsonl")  # fmt: skip
    with pytest.raises(Exception, match="--no-load-optim"):
        _losses(BASE + ["--load", os.path.join(light, "torch_dist")], tmp_path / "f.jsonl")
    fresh = _losses(BASE + ["--load", os.path.join(light, "torch_dist"), "--no-load-optim"],
                    tmp_path / "g.jsonl")  # fmt: skip
    assert [i for i, _ in fresh] == [5, 6] and fresh != original


def test_bad_conversions_are_one_line(tmp_path):
    def refused(*extra: str) -> str:
        with pytest.raises(ValueError) as info:
            pretrain_tst.main(BASE + list(extra))
        assert "\n" not in str(info.value)
        return str(info.value)

    empty = str(tmp_path / "empty")
    assert "give both" in refused("--ckpt-convert-format", "torch_dist", "--load", empty)
    assert "invalid choice: 'torch'" in refused("--ckpt-convert-format", "torch")
    assert "add it" in refused("--ckpt-convert-save", empty)
    assert "would save a fresh optimizer state" in refused(
        "--ckpt-convert-format", "torch_dist", "--load", empty, "--ckpt-convert-save", empty,
        "--no-load-optim")  # fmt: skip
    # Nothing to convert: refused (Megatron-LM's --exit-on-missing-checkpoint).
    assert "no checkpoint there, and --exit-on-missing-checkpoint" in refused(
        "--ckpt-convert-format", "torch_dist", "--load", empty, "--ckpt-convert-save",
        str(tmp_path / "out"))  # fmt: skip
