"""Megatron-LM's rerun engine through pretrain_tst.py: --rerun-mode's three modes, the
re-run from a checkpoint with its exit codes, the tracker file and --iterations-to-skip.

References are the same runs without the engine (a re-run must not change training: exact
on CPU, where the forward-backward is deterministic) and megatron-core's own diagnosis
rules (an injected transient error ends in exit code 17, a persistent one in 16, then 17
on another node). One process; each run is a few steps of a tiny model.
"""

from __future__ import annotations

import json
import os
import sys
import types
import warnings

import pytest
import torch
from trainer_runs import tracker_rows

import pretrain_tst
from tst import rerun as rerun_module
from tst import trainer as trainer_module
from tst.checkpointing import latest_iteration
from tst.config import parse_args
from tst.errors import ConfigError, NonFiniteLossError
from tst.plan import validate
from tst.rerun import EXIT_RECORD, node_name

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"
    ),
)

import fault_injection  # noqa: E402

ARGS = fault_injection.ARGS[:]
ARGS[ARGS.index("--train-iters") + 1] = "5"
ARGS[ARGS.index("--tst-iters") + 1] = "2"
ARGS[ARGS.index("--save-interval") + 1] = "100"

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
       "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
       "--moe-router-bias-update-rate", "0.5"]  # fmt: skip


def _run(tmp_path, name: str, extra: list[str]) -> tuple[int, list[dict]]:
    metrics = str(tmp_path / f"{name}.jsonl")
    rc = pretrain_tst.main(ARGS + extra + ["--metrics-file", metrics])
    with open(metrics) as f:
        return rc, [json.loads(line) for line in f]


def _losses(records) -> list[tuple[int, float]]:
    return [(r["iteration"], r["loss"]) for r in records if r.get("loss") is not None]


def _tracker(path) -> list[tuple[int, str, str]]:
    """(iteration, status, result) per line of a tracker file."""
    return [(r["iteration"], r["status"], r["result"]) for r in tracker_rows(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The runs without the engine, dense and MoE (expert bias updated every step)."""
    tmp = tmp_path_factory.mktemp("reference")
    dense = _run(tmp, "dense", [])
    moe = _run(tmp, "moe", MOE)
    assert dense[0] == moe[0] == 0
    return {"dense": _losses(dense[1]), "moe": _losses(moe[1])}


# The log lines Megatron-LM's own functional tests of the engine look for
# (tests/functional_tests/test_cases/gpt/gpt3_mcore_reruns_*/model_config.yaml, AFTER_SCRIPT,
# at core_v0.16.1): megatron-core's machine writes them, so they show it is wired as there.
ENABLED = "Result validation enabled"
TRANSIENT = ["Injecting error type Transient error", "Possible transient error!!"]
PERSISTENT = [
    "Injecting error type Persistent error",
    "First rerun: unexpected result is reproducible within the tolerance",
    "Saving a checkpoint and exiting now. Please resume the job from the checkpoint to rerun "
    "the last iteration and establish a diagnostic",
]


def _exit_record(ckpt: str) -> dict:
    with open(os.path.join(ckpt, EXIT_RECORD)) as f:
        return json.load(f)


def _logged(caplog) -> str:
    """What megatron-core logged since the last call."""
    text = caplog.text
    caplog.clear()
    return text


def test_transient_error_stops_with_17_and_a_checkpoint_of_the_steps_start(tmp_path, reference,
                                                                           caplog):  # fmt: skip
    """An injected transient error: the step is re-run in place, the result differs, the
    run stops with exit code 17 after saving the state the step began from; resumed
    without the injection, the run repeats the unbroken run's losses exactly."""
    ckpt, tracker = str(tmp_path / "ckpt"), str(tmp_path / "tracker.txt")
    rc, first = _run(tmp_path, "a", ["--rerun-mode", "validate_results", "--save", ckpt,
                                     "--error-injection-rate", "1",
                                     "--result-rejected-tracker-filename", tracker])  # fmt: skip
    assert rc == 17
    logged = _logged(caplog)
    assert all(line in logged for line in [ENABLED, *TRANSIENT])
    assert latest_iteration(ckpt) == 1  # step 1 is never validated (megatron-core's rule)
    statuses = [(i, s) for i, s, _ in _tracker(tracker)]
    assert statuses == [(2, "initial_run"), (2, "first_rerun_not_reproducible")]
    # The launcher's record: train on from the step's start without this node.
    record = _exit_record(ckpt)
    assert record["exit_code"] == 17 and record["rerun_state"] == "RERUNNING_IN_PLACE"
    assert record["next"] == "resume_elsewhere" and record["iteration"] == 2
    assert record["checkpoint"] == os.path.join(ckpt, "iter_0000001")
    assert record["nodes"] == [node_name()] and record["rejected_ranks"] == [0]
    assert record["diagnosis"].startswith("transient")
    rc, second = _run(tmp_path, "b", ["--load", ckpt, "--rerun-mode", "validate_results",
                                      "--save", ckpt])  # fmt: skip
    assert rc == 0
    assert not os.path.exists(os.path.join(ckpt, EXIT_RECORD))  # the next run's start drops it
    assert _losses(first) + _losses(second) == reference["dense"]


def test_persistent_error_is_rerun_from_the_checkpoint_on_another_node(tmp_path, reference,
                                                                       monkeypatch, caplog):  # fmt: skip
    """An injected persistent error: reproducible in place, so a checkpoint and exit code
    16; resumed on the same node the engine asks again (16, no new checkpoint); on another
    node it re-runs the step from the checkpoint, recomputing the very result rejected at
    first, and diagnoses the error (17). With the engine off the checkpoint trains on."""
    import megatron.core.rerun_state_machine as rsm

    ckpt, tracker = str(tmp_path / "ckpt"), str(tmp_path / "tracker.txt")
    flags = ["--rerun-mode", "validate_results", "--save", ckpt, "--load", ckpt,
             "--error-injection-rate", "1", "--error-injection-type", "persistent_error",
             "--result-rejected-tracker-filename", tracker]  # fmt: skip
    caplog.clear()
    assert _run(tmp_path, "a", flags)[0] == 16
    logged = _logged(caplog)
    assert all(line in logged for line in [ENABLED, *PERSISTENT])
    assert latest_iteration(ckpt) == 1
    first = _exit_record(ckpt)
    assert (first["exit_code"], first["next"], first["rerun_state"]) == (
        16, "resume_elsewhere", "WILL_RERUN_FROM_CHECKPOINT")  # fmt: skip
    assert first["checkpoint"] == os.path.join(ckpt, "iter_0000001")
    assert first["nodes"] == [node_name()]
    assert _run(tmp_path, "b", flags)[0] == 16  # the same node and device
    assert latest_iteration(ckpt) == 1
    again = _exit_record(ckpt)  # no new checkpoint: the same one, elsewhere
    assert (again["exit_code"], again["next"], again["rerun_state"]) == (
        16, "resume_elsewhere", "RERUNNING_AGAIN_FROM_CHECKPOINT")  # fmt: skip
    assert again["checkpoint"] == first["checkpoint"]
    other = ("Linux", "another-node", "", "", "")
    monkeypatch.setattr(rsm, "os", types.SimpleNamespace(uname=lambda: other, getenv=os.getenv))
    assert _run(tmp_path, "c", flags)[0] == 17
    assert "Possible persistent error!!" in _logged(caplog)
    last = _exit_record(ckpt)  # a diagnosis: nothing to resume automatically
    assert (last["exit_code"], last["next"], last["checkpoint"]) == (17, "stop", None)
    assert last["rerun_state"] == "RERUNNING_FROM_CHECKPOINT"
    rows = _tracker(tracker)
    assert [(i, s) for i, s, _ in rows] == [
        (2, "initial_run"), (2, "first_rerun_reproducible"), (2, "second_rerun_not_reproducible"),
    ]  # fmt: skip
    assert rows[0][2] == rows[1][2] == rows[2][2]  # the resumed re-run recomputed it exactly
    monkeypatch.undo()
    rc, last = _run(tmp_path, "d", ["--load", ckpt])  # no engine: trains on from step 2
    assert rc == 0
    assert _losses(last) == reference["dense"][1:]


def test_a_rerun_checkpoint_holds_the_steps_start_and_each_ranks_state(tmp_path):
    """The checkpoint the engine asks for: the data position before the step, the
    machine's state of each rank, and the grid that state belongs to."""
    ckpt = str(tmp_path / "ckpt")
    flags = [
        "--rerun-mode",
        "validate_results",
        "--save",
        ckpt,
        "--load",
        ckpt,
        "--error-injection-rate",
        "1",
        "--error-injection-type",
        "persistent_error",
    ]
    assert _run(tmp_path, "a", flags)[0] == 16
    common = torch.load(os.path.join(ckpt, "iter_0000001", "common.pt"), weights_only=False)
    common = common["common"]
    assert len(common["rerun"]["ranks"]) == 1
    assert common["rerun"]["layout"] == [1, 1, 1, 1]  # world, TP, PP, DP
    assert common["data"]["consumed_units"] == 4 * 3  # the step's start: 1 step of 4 bags of 3


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_report_stats_reruns_every_step_without_changing_training(tmp_path, reference, model,
                                                                  capsys):  # fmt: skip
    """report_stats re-runs every step once: every validated value (losses, gradient-bucket
    norms) is the same in both runs, and training is the unbroken run's exactly; with the
    aux-loss-free router, whose bias megatron-core updates inside the forward-backward, the
    bias is restored before the re-run."""
    extra = MOE if model == "moe" else []
    rc, records = _run(tmp_path, "s", ["--rerun-mode", "report_stats", "--log-interval", "1",
                                       "--check-for-spiky-loss", "--check-for-large-grads",
                                       *extra])  # fmt: skip
    assert rc == 0
    assert _losses(records) == reference[model]
    out = capsys.readouterr().out
    assert out.count("re-running the step") == 5
    reports = [line for line in out.splitlines() if line.startswith("  found NaN in local")]
    assert len(reports) >= 5 and all("all identical" in line for line in reports), reports
    spiky = [line for line in out.splitlines() if line.startswith("  Spiky loss")]
    assert spiky and all("all identical" in line for line in spiky)
    # --check-for-large-grads: megatron-core's DDP validates each bucket's norm as well.
    large = [line for line in out.splitlines() if line.startswith("  found unexpected large")]
    assert large and all("all identical" in line for line in large)


def test_an_injected_correct_result_is_diagnosed_as_correct(tmp_path, monkeypatch, caplog):
    """--error-injection-type correct_result: reproducible in place (16), and reproducible
    on another node too, so megatron-core calls the result correct (17: the fatal NaN check
    still stops the run, an application error)."""
    import megatron.core.rerun_state_machine as rsm

    ckpt, tracker = str(tmp_path / "ckpt"), str(tmp_path / "tracker.txt")
    flags = ["--rerun-mode", "validate_results", "--save", ckpt, "--load", ckpt,
             "--error-injection-rate", "1", "--error-injection-type", "correct_result",
             "--result-rejected-tracker-filename", tracker]  # fmt: skip
    assert _run(tmp_path, "a", flags)[0] == 16
    other = ("Linux", "another-node", "", "", "")
    monkeypatch.setattr(rsm, "os", types.SimpleNamespace(uname=lambda: other, getenv=os.getenv))
    caplog.clear()
    assert _run(tmp_path, "b", flags)[0] == 17
    assert "Correct result (but possible Application error)" in _logged(caplog)
    assert [s for _, s, _ in _tracker(tracker)] == [
        "initial_run", "first_rerun_reproducible", "second_rerun_reproducible",
    ]  # fmt: skip


def test_spiky_loss_is_rerun_once_and_training_goes_on(tmp_path, reference, capsys):
    """A rejected spiky loss (injected; not fatal): the step is re-run and the run goes on,
    training as the unbroken run does."""
    rc, records = _run(tmp_path, "s", ["--check-for-spiky-loss",
                                       "--no-check-for-nan-in-loss-and-grad",
                                       "--error-injection-rate", "1"])  # fmt: skip
    assert rc == 0
    assert _losses(records) == reference["dense"]
    out = capsys.readouterr().out
    # The mode Megatron-LM defaults to, when only another rerun flag is given.
    assert out.count("re-running the step (--rerun-mode validate_results)") == 4  # steps 2-5


def _poison_step(monkeypatch, step: int) -> None:
    """Step ``step`` (1-based) of every run gets a NaN loss."""
    real_loss = trainer_module._LOSSES["lm"]
    real_mce = trainer_module._LOSSES["mce"]
    now = {"step": 0}
    real_step = trainer_module.Trainer.train_step

    def train_step(self, phase):
        now["step"] = self.iteration + 1
        return real_step(self, phase)

    def poisoned(fn):
        def loss(*args, **kwargs):
            value = fn(*args, **kwargs)
            return value * float("nan") if now["step"] == step else value

        return loss

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    monkeypatch.setitem(trainer_module._LOSSES, "lm", poisoned(real_loss))
    monkeypatch.setitem(trainer_module._LOSSES, "mce", poisoned(real_mce))


def test_disabled_stops_at_the_first_nan_and_the_tracker_skips_it_later(tmp_path, monkeypatch,
                                                                        capsys, caplog):  # fmt: skip
    """--rerun-mode disabled: the first NaN loss stops the run (Megatron-LM's behaviour), the
    tracker file records it; rejected twice on the same rank, the step is skipped at the
    next launch (its data read and dropped) and the run completes."""
    _poison_step(monkeypatch, 3)
    tracker = str(tmp_path / "tracker.txt")
    flags = ["--rerun-mode", "disabled", "--result-rejected-tracker-filename", tracker]
    for attempt in range(2):
        with pytest.raises(NonFiniteLossError, match=r"non-finite step at iteration 3 "
                           r"\(--rerun-mode disabled stops at the first"):  # fmt: skip
            _run(tmp_path, f"a{attempt}", flags)
    assert [(i, s) for i, s, _ in _tracker(tracker)] == [(3, "rerun_disabled")] * 2
    assert ENABLED not in _logged(caplog)  # disabled: nothing is validated for a re-run
    capsys.readouterr()
    rc, records = _run(tmp_path, "b", flags)
    assert rc == 0
    assert "steps [3] were rejected twice on the same rank" in capsys.readouterr().out
    assert [r["iteration"] for r in records if r.get("iteration_skipped")] == [3]
    assert [i for i, _ in _losses(records)] == [1, 2, 4, 5]


def test_iterations_to_skip_drops_the_steps_data_and_update(tmp_path, reference):
    """--iterations-to-skip 2 (Megatron-LM's count: the step begun after 2 completed, logged
    as 3): its micro-batches are read and dropped, no update is made and the LR schedule
    does not advance; the samples count as consumed and skipped."""
    rc, records = _run(tmp_path, "s", ["--iterations-to-skip", "2"])
    assert rc == 0
    assert _losses(records)[:2] == reference["dense"][:2]
    assert [r["iteration"] for r in records if r.get("iteration_skipped")] == [3]
    train = {r["iteration"]: r for r in records if r.get("loss") is not None}
    _, full = _run(tmp_path, "f", [])
    full_train = {r["iteration"]: r for r in full if r.get("loss") is not None}
    assert train[4]["lr"] == full_train[3]["lr"]  # the schedule lags by the skipped step
    assert train[5]["raw_tokens"] == full_train[5]["raw_tokens"]  # the data moved on


def test_rerun_flags_are_checked():
    base = ARGS + ["--mock-data"]
    with pytest.raises(ConfigError, match="--rerun-mode"):
        parse_args(base + ["--rerun-mode", "report_determinism_stats"])
    with pytest.raises(ConfigError, match="--error-injection-rate must be >= 0"):
        parse_args(base + ["--error-injection-rate", "-1"])
    with pytest.raises(ConfigError, match="--iterations-to-skip takes iteration counts >= 0"):
        parse_args(base + ["--iterations-to-skip", "3", "-1"])
    cfg = parse_args(base)
    assert cfg.rerun.mode is None  # off by default: non-finite steps are skipped
    assert parse_args(base + ["--check-for-large-grads"]).rerun.mode == "validate_results"
    cfg = parse_args(base + ["--rerun-mode", "validate_results", "--fp16"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(cfg, 1, 512)
    assert any("--no-check-for-nan-in-loss-and-grad since dynamic loss scaling" in str(w.message)
               for w in caught)  # fmt: skip
    assert not cfg.rerun.check_for_nan_in_loss_and_grad


def test_an_unwritable_tracker_file_is_refused(tmp_path):
    path = str(tmp_path / "missing" / "tracker.txt")
    with pytest.raises(ConfigError, match="--result-rejected-tracker-filename .* cannot be "
                       "appended to"):  # fmt: skip
        _run(tmp_path, "x", ["--result-rejected-tracker-filename", path])


def test_a_skipped_step_leaves_the_routers_expert_bias_as_it_was(tmp_path, monkeypatch):
    """Without the engine a non-finite step is skipped; megatron-core has already updated
    the aux-loss-free routers' bias inside its forward-backward, and the skip puts it back
    (the bias is a buffer: the optimizer never sees it)."""
    _poison_step(monkeypatch, 3)
    seen = {}
    inner = trainer_module.Trainer.train_step  # the poisoning wrapper

    def train_step(self, phase):
        before = [b.clone() for b, _ in rerun_module.router_state(self._routers)]
        result = inner(self, phase)
        after = [b.clone() for b, _ in rerun_module.router_state(self._routers)]
        seen[self.iteration + 1] = (result["skipped"], before, after)
        return result

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    rc, records = _run(tmp_path, "s", MOE)
    assert rc == 0
    skipped, before, after = seen[3]
    assert skipped and len(before) == 2  # one router per layer
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    moved = seen[2]  # a step that trained moved the bias (so the check can fail)
    assert not moved[0] and not all(torch.equal(b, a) for b, a in zip(*moved[1:], strict=True))


def test_the_record_command_line_the_launch_scripts_use(tmp_path, capsys):
    """python -m tst.rerun_record: exit-status keeps a launcher's 0 and any code without a
    record, gives the record's code otherwise; fields is one tab-separated line; clear; a
    record that is not one (truncated by hand, say) counts as none."""
    from tst import rerun_record

    save = str(tmp_path)
    rerun_record.main(["exit-status", save, "1"])
    assert capsys.readouterr().out == "1\n"
    rerun_record.write(save, {"exit_code": 16, "iteration": 3, "diagnosis": "why", "next":
                              "resume_elsewhere", "nodes": ["n1", "n2"], "slurm_job_id": "7",
                              "slurm_restart_count": "0"})  # fmt: skip
    rerun_record.main(["exit-status", save, "0"])
    assert capsys.readouterr().out == "0\n"  # a clean end is not overridden
    rerun_record.main(["exit-status", save, "1"])
    out = capsys.readouterr()
    assert out.out == "16\n" and "exit code 16" in out.err
    rerun_record.main(["fields", save])
    assert capsys.readouterr().out == "7\t0\t16\tresume_elsewhere\tn1,n2\titeration 3: why\n"
    (tmp_path / EXIT_RECORD).write_text('{"exit_code": 1')
    assert rerun_record.read(save) is None
    rerun_record.main(["clear", save])
    assert not (tmp_path / EXIT_RECORD).exists()
    assert rerun_record.main(["nonsense"]) == 2
