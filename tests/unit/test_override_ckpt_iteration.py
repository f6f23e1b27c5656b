"""--override-ckpt-iteration N (Megatron-LM 0.19): a checkpoint's weights, optimizer and LR
schedule continue at iteration N with the data position of N steps, checked against the
unbroken run's own records (data position and learning rate per step)."""

from __future__ import annotations

import json
import os

import pytest

import pretrain_tst
from tst.checkpointing import CheckpointError
from tst.config import parse_args
from tst.errors import ConfigError

ARGS = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "4",
    "--train-iters", "8", "--tst-bag-size", "3", "--tst-iters", "3", "--lr", "3e-3",
    "--lr-decay-style", "linear", "--log-interval", "1", "--eval-interval", "1000",
    "--eval-iters", "1", "--save-interval", "6",
]  # fmt: skip


def _records(argv: list[str], metrics: str) -> dict[int, dict]:
    assert pretrain_tst.main([*argv, "--metrics-file", metrics]) == 0
    with open(metrics) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "loss" in r and "lr" in r}


def test_override_continues_at_the_given_step_with_its_data(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    full = _records([*ARGS, "--save", ckpt], str(tmp_path / "full.jsonl"))
    assert sorted(full) == list(range(1, 9))
    # The checkpoint of iteration 6 (recovery phase) continued at iteration 4: steps 5-8
    # read the samples the unbroken run read at 5-8, and the LR schedule goes on from the
    # checkpoint's (6 steps in), so step 5 here has the unbroken step 7's learning rate.
    got = _records([*ARGS, "--load", ckpt, "--ckpt-step", "6", "--override-ckpt-iteration", "4",
                    "--train-iters", "10", "--override-opt_param-scheduler"],
                   str(tmp_path / "override.jsonl"))  # fmt: skip
    assert sorted(got) == list(range(5, 11))
    for it in range(5, 9):
        assert got[it]["data_units"] == full[it]["data_units"], it
    plain = _records([*ARGS, "--load", ckpt, "--ckpt-step", "6", "--train-iters", "10",
                      "--override-opt_param-scheduler"],
                     str(tmp_path / "plain.jsonl"))  # fmt: skip
    assert sorted(plain) == [7, 8, 9, 10]
    assert got[5]["lr"] == pytest.approx(plain[7]["lr"], rel=1e-9)
    assert got[5]["loss"] != full[5]["loss"]  # the weights are iteration 6's


def test_override_refusals(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    assert pretrain_tst.main([*ARGS, "--save", ckpt, "--exit-interval", "6"]) == 0
    assert os.path.isdir(os.path.join(ckpt, "iter_0000006"))
    with pytest.raises(CheckpointError, match="an override stays within the checkpoint's phase"):
        pretrain_tst.main([*ARGS, "--load", ckpt, "--override-ckpt-iteration", "2"])
    with pytest.raises(CheckpointError, match="trained with 4: the data would start"):
        pretrain_tst.main([*ARGS, "--load", ckpt, "--override-ckpt-iteration", "4",
                           "--global-batch-size", "8"])  # fmt: skip
    with pytest.raises(ConfigError, match="--finetune starts at 0"):
        parse_args([*ARGS, "--load", ckpt, "--override-ckpt-iteration", "4", "--finetune"])
