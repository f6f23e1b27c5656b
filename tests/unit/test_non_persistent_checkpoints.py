"""Megatron-LM's global non-persistent checkpoints (--non-persistent-save-interval,
--non-persistent-ckpt-type global, --non-persistent-global-ckpt-dir): saved between the
persistent ones, only the newest kept, and resumed from when newer than the persistent one;
crashed runs resume exactly (the same loss and data position at every step as a run that
never stopped), in each phase; asynchronous saves replace the previous one as they complete."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

import pretrain_tst
from tst import checkpointing
from tst import trainer as trainer_module
from tst.checkpointing import CheckpointError, verify
from tst.config import parse_args

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import fault_injection  # noqa: E402

SWITCH = fault_injection.SWITCH  # the superposition phase's last step
ITERS = 12
ARGS = fault_injection.ARGS[:]
ARGS[ARGS.index("--train-iters") + 1] = str(ITERS)
assert ARGS[ARGS.index("--save-interval") + 1] == "3"
FREQUENT = ["--non-persistent-save-interval", "2", "--non-persistent-ckpt-type", "global"]


class _Crash(Exception):
    """A run dying mid-training (no save at the stop, unlike a signal)."""


def _crash_before(monkeypatch, iteration: int) -> None:
    """The next run dies as it starts step ``iteration`` (1-based)."""
    real = trainer_module.Trainer.train_step

    def train_step(self, phase):
        if self.iteration + 1 == iteration:
            raise _Crash(f"killed at step {iteration}")
        return real(self, phase)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)


def _iters(folder) -> list[int]:
    return sorted(int(p.name[5:]) for p in folder.glob("iter_*") if p.name[5:].isdigit())


def test_crashed_runs_resume_exactly_from_the_newest_non_persistent_checkpoint(
    tmp_path, monkeypatch, capsys
):
    reference = tmp_path / "reference.jsonl"
    assert pretrain_tst.main([*ARGS, "--metrics-file", str(reference)]) == 0
    expected = fault_injection._records(str(reference))

    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    run = [*ARGS, "--save", str(ckpt), "--load", str(ckpt), "--metrics-file", str(metrics),
           *FREQUENT]  # fmt: skip
    # Persistent saves at 3 (6, 9, 12), non-persistent ones at 2 and 4 (not 6: a step with a
    # persistent save makes no non-persistent one; Megatron-LM's rule), 8 and 10.
    with monkeypatch.context() as patch:
        _crash_before(patch, 5)  # inside the superposition phase (it ends after step SWITCH)
        with pytest.raises(_Crash):
            pretrain_tst.main(run)
    assert SWITCH > 4
    np_dir = ckpt / "non_persistent"
    checkpointing.wait_for_retired()
    assert _iters(ckpt) == [3] and _iters(np_dir) == [4]  # 2 went once 4 was complete
    assert (np_dir / checkpointing.TRACKER).read_text() == "4"
    verify(str(np_dir / "iter_0000004"))
    out = capsys.readouterr().out
    assert "saved non-persistent checkpoint" in out
    assert "(iteration 2; non-persistent: only the newest is kept)" in out

    # Resumed from 4 (newer than the persistent 3); then killed again in the recovery phase.
    with monkeypatch.context() as patch:
        _crash_before(patch, 9)
        with pytest.raises(_Crash):
            pretrain_tst.main(run)
    out = capsys.readouterr().out
    assert f"resuming from the non-persistent checkpoint of iteration 4 in {np_dir}" in out
    assert "(the latest persistent one is of iteration 3)" in out
    assert f"resumed from {np_dir} at iteration 4" in out
    checkpointing.wait_for_retired()
    assert _iters(ckpt) == [3, 6] and _iters(np_dir) == [8]

    # Without --non-persistent-ckpt-type a --load reads the persistent checkpoints only
    # (Megatron-LM's rule): iteration 6 here; its own saves go elsewhere.
    other = tmp_path / "other"
    assert pretrain_tst.main([*ARGS, "--load", str(ckpt), "--save", str(other),
                              "--exit-interval", "7"]) == 0  # fmt: skip
    assert f"resumed from {ckpt} at iteration 6" in capsys.readouterr().out

    # From 8 to the end, the saves written in the background: 10's replaces 8 when it
    # completes (in the asynchronous save's finalisation).
    assert pretrain_tst.main([*run, "--async-save"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {np_dir} at iteration 8" in out
    assert "(iteration 8; non-persistent: only the newest is kept)" in out
    got = fault_injection._records(str(metrics))
    assert got[-1] == (0.0, 0)  # every redone step repeated its first run exactly
    assert {k: v for k, v in got.items() if k >= 0} == {k: v for k, v in expected.items() if k >= 0}
    assert _iters(ckpt) == [3, 6, 9, 12] and _iters(np_dir) == [10]


def test_a_persistent_checkpoint_newer_than_the_non_persistent_one_wins(tmp_path, capsys):
    """A run saving non-persistent checkpoints every 4 steps (into a folder of their own)
    and persistent ones every 3, stopped after step 9: the last non-persistent one (8) is
    older than the last persistent one (9)."""
    ckpt = tmp_path / "ckpt"
    elsewhere = tmp_path / "frequent"
    frequent = ["--non-persistent-save-interval", "4", "--non-persistent-ckpt-type", "global",
                "--non-persistent-global-ckpt-dir", str(elsewhere)]  # fmt: skip
    argv = [*ARGS, "--save", str(ckpt), "--load", str(ckpt), *frequent]
    assert pretrain_tst.main([*argv, "--exit-interval", "9"]) == 0
    checkpointing.wait_for_retired()
    assert _iters(elsewhere) == [8] and not (ckpt / "non_persistent").exists()
    assert _iters(ckpt) == [3, 6, 9]
    assert "saved non-persistent checkpoint" in capsys.readouterr().out
    assert pretrain_tst.main([*argv, "--exit-interval", "10"]) == 0
    out = capsys.readouterr().out
    assert (
        f"the non-persistent checkpoint in {elsewhere} (iteration 8) is older than the "
        "persistent one (iteration 9): resuming from the persistent one"
    ) in out
    assert f"resumed from {ckpt} at iteration 9" in out


def _fake_checkpoint(root, iteration: int, tracked: bool = True) -> None:
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if tracked:
        (root / checkpointing.TRACKER).write_text(str(iteration))


def test_resume_dir_chooses_the_newer_and_refuses_a_damaged_folder(tmp_path):
    load, frequent = tmp_path / "ckpt", tmp_path / "ckpt" / "non_persistent"
    assert checkpointing.resume_dir(str(load), str(frequent)) == (str(load), None)  # none
    _fake_checkpoint(load, 6)
    assert checkpointing.resume_dir(str(load), None) == (str(load), None)
    assert checkpointing.resume_dir(str(load), str(frequent)) == (str(load), None)
    _fake_checkpoint(frequent, 6)  # a tie: the non-persistent one (Megatron-LM's rule)
    assert checkpointing.resume_dir(str(load), str(frequent))[0] == str(frequent)
    _fake_checkpoint(load, 7)
    chosen, why = checkpointing.resume_dir(str(load), str(frequent))
    assert chosen == str(load) and "is older than the persistent one (iteration 7)" in why
    bare = tmp_path / "bare"  # only a non-persistent checkpoint so far
    _fake_checkpoint(bare / "non_persistent", 2)
    chosen, why = checkpointing.resume_dir(str(bare), str(bare / "non_persistent"))
    assert chosen == str(bare / "non_persistent") and why.endswith("in " + chosen)
    damaged = tmp_path / "damaged"
    _fake_checkpoint(damaged / "non_persistent", 4, tracked=False)
    with pytest.raises(CheckpointError, match=r"--non-persistent-global-ckpt-dir .* but no "
                       "latest_checkpointed_iteration.txt"):  # fmt: skip
        checkpointing.resume_dir(str(damaged), str(damaged / "non_persistent"))


BASE = ARGS[:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--non-persistent-ckpt-type", "local"], "needs NVIDIA's resiliency extension"),
        (["--non-persistent-ckpt-type", "in_memory"], "refused by Megatron-LM 0.16.1 too"),
        (["--non-persistent-save-interval", "0", "--non-persistent-ckpt-type", "global"],
         "--non-persistent-save-interval must be >= 1"),
        (["--save", "c", "--non-persistent-save-interval", "5"],
         "needs --non-persistent-ckpt-type .*: add --non-persistent-ckpt-type global"),
        (["--save", "c", "--non-persistent-ckpt-type", "global",
          "--non-persistent-global-ckpt-dir", "c/"], "is the --save directory"),
        (["--load", "c", "--non-persistent-ckpt-type", "global",
          "--non-persistent-global-ckpt-dir", "c"], "is the --load directory"),
    ],
)  # fmt: skip
def test_non_persistent_rules(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_args(BASE + extra)


def test_non_persistent_flags_that_change_nothing_warn():
    with pytest.warns(UserWarning, match="--non-persistent-save-interval has no effect without "
                      "--save"):  # fmt: skip
        parse_args(BASE + FREQUENT)
    with pytest.warns(UserWarning, match="--non-persistent-global-ckpt-dir has no effect without"):
        parse_args(BASE + ["--non-persistent-global-ckpt-dir", "x"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = parse_args(BASE + ["--save", "c", *FREQUENT])
    assert cfg.run.non_persistent_dir("c") == os.path.join("c", "non_persistent")
    # Local checkpoints' own options stay refused, naming the global kind.
    with pytest.raises(ValueError, match="--non-persistent-local-ckpt-dir: node-local "
                       r"checkpoints .*--non-persistent-ckpt-type global"):  # fmt: skip
        parse_args(BASE + ["--non-persistent-local-ckpt-dir", "x"])


def test_checkpoint_args_come_from_the_checkpoint_the_run_resumes_from(tmp_path, monkeypatch):
    """--use-checkpoint-args reads the model flags from the checkpoint the run will resume
    from: here a crashed first launch left a non-persistent checkpoint only."""
    ckpt = tmp_path / "ckpt"
    wide = [*ARGS, "--hidden-size", "48", "--save", str(ckpt), *FREQUENT]
    with monkeypatch.context() as patch:
        _crash_before(patch, 3)
        with pytest.raises(_Crash):
            pretrain_tst.main(wide)
    assert not _iters(ckpt) and _iters(ckpt / "non_persistent") == [2]
    at = ARGS.index("--hidden-size")
    relaunch = [*ARGS[:at], *ARGS[at + 2 :], "--load", str(ckpt), "--use-checkpoint-args"]
    cfg = parse_args([*relaunch, "--non-persistent-ckpt-type", "global"])
    assert cfg.model.hidden_size == 48
    # Without the kind, --load itself holds no checkpoint: nothing gives the size.
    with pytest.raises(ValueError, match="--hidden-size is required"):
        parse_args(relaunch)
