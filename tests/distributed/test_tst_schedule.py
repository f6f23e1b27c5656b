"""Multi-stage bag schedules (``--tst-schedule``) and the one-sided switch controls.

Unit tests of the schedule (parsing, refusals, a two-stage schedule equal to
``--tst-bag-size`` / ``--tst-fraction``), then runs of a three-stage schedule (bag 4, bag 2,
next-token) through ``pretrain_tst.py``:

- the first step of each stage against the plain reference (``tests/helpers/reference.py``): the
  oracle reads that step's rows from the run's own data stream and scores the run's own
  weights at that step (a world of one), to rel 2e-6 (fp32, the same model on other batch
  shapes, as in ``test_tst_flags_trainer.py``);
- TP 1 / DP 2, TP 2 and PP 2 agree with the world of one over every step and evaluation, to
  rel 2e-4 (a few Adam steps amplify reductions in another order; ``test_trainer.py``'s bound);
- a run stopped inside stage 0, resumed, stopped inside stage 1 and resumed again repeats
  the unbroken run's losses to rel 1e-6; a checkpoint in stage 1 resumed with a schedule that
  puts its iteration in stage 0 is refused.

The switch controls act at the switch to the recovery phase only; re-initialising one side
leaves the other as trained (untied model), and tied models refuse the one-sided flags.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from flags import SMALL_GPT

import pretrain_tst
from tst.checkpointing import TRACKER
from tst.config import parse_args
from tst.errors import ConfigError
from tst.phases import RECOVERY, SUPERPOSITION, PhaseSchedule, parse_schedule
from tst.plan import validate

import reference as ref

SEQ = 8
BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--untie-embeddings-and-output-weights",
    "--init-method-std", "0.2", "--seq-length", str(SEQ), "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "8", "--lr", "3e-3", "--min-lr", "0",
    "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "4",
    "--eval-iters", "1", "--peak-tflops", "1", *SMALL_GPT,
]  # fmt: skip
# Stages: iterations 0-1 bag 4, 2-3 bag 2, 4-7 next-token.
THREE = ["--tst-schedule", "4:0.25,2:0.25,1"]
STAGES = [(0, 4), (2, 2), (4, 1)]  # (first iteration, bag size)
FIRST_STEP_REL, LAYOUT_REL, RESUME_REL = 2e-6, 2e-4, 1e-6


# ---------------------------------------------------------------- the schedule


def _iters(n: int) -> list[str]:
    """BASE with --train-iters n."""
    argv = list(BASE)
    argv[argv.index("--train-iters") + 1] = str(n)
    return argv


def _schedule(argv: list[str], world: int = 1) -> PhaseSchedule:
    return validate(parse_args(argv), world, 512).schedule


def test_three_stages_are_the_table():
    schedule = _schedule(BASE + THREE)
    assert [(p.name, p.stage, p.start, p.end, p.input_bag, p.target_bag, p.units_per_row,
             p.loss) for p in schedule.phases] == [
        (SUPERPOSITION, 0, 0, 2, 4, 4, 4, "mce"),
        (SUPERPOSITION, 1, 2, 4, 2, 2, 2, "mce"),
        (RECOVERY, 2, 4, 8, 1, 1, 1, "lm"),
    ]  # fmt: skip
    assert schedule.data_bag_size == 4
    assert schedule.switch_iteration == 4 and schedule.stage_starts == (2, 4)
    assert [schedule.starting_at(i) for i in (0, 1, 3, 5)] == [None] * 4
    assert schedule.starting_at(2).stage == 1 and schedule.starting_at(4).name == RECOVERY
    assert [schedule.phase_at(i).stage for i in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    eval_phase = schedule.eval_phase()
    assert (eval_phase.input_bag, eval_phase.target_bag, eval_phase.loss) == (1, 1, "lm")
    table = schedule.table().splitlines()
    assert len(table) == 4 and table[2].split()[:3] == ["1", SUPERPOSITION, "2..3"]
    assert [d["stage"] for d in schedule.to_dict()] == [0, 1, 2]
    # --tst-mode / --tst-loss / --tst-layout apply to every bag stage.
    other = _schedule(BASE + THREE + ["--tst-mode", "input-only", "--tst-layout", "paper"])
    assert [(p.input_bag, p.target_bag, p.loss, p.layout) for p in other.phases[:2]] == [
        (4, 1, "lm", "paper"), (2, 1, "lm", "paper"),
    ]  # fmt: skip
    # Bag sizes that do not divide one another: the data is cut in lcm-unit samples.
    assert _schedule(BASE + ["--tst-schedule", "3:0.25,2:0.25,1"]).data_bag_size == 6


@pytest.mark.parametrize("train_iters", [1, 7, 10, 33, 1000])
@pytest.mark.parametrize("fraction", ["0.05", "0.25", "0.3", "0.5", "0.95"])
def test_two_stages_are_the_two_phase_schedule(train_iters, fraction):
    argv = _iters(train_iters)
    for bag in (2, 6):
        two = _schedule(argv + ["--tst-schedule", f"{bag}:{fraction},1"])
        flags = _schedule(argv + ["--tst-bag-size", str(bag), "--tst-fraction", fraction])
        assert two == flags, (train_iters, fraction, bag)


@pytest.mark.parametrize(
    "value,message",
    [
        ("4:0.3", "end with 1"),
        ("1", "give one or more BAG:FRACTION stages"),
        ("4,1", "stage '4' is not BAG:FRACTION"),
        ("4:x,1", "stage '4:x' is not BAG:FRACTION"),
        ("1:0.3,1", "bag size 1 must be between 2 and 64"),
        ("65:0.1,1", "bag size 65 must be between 2 and 64"),
        ("4:0,1", r"fraction 0 must be in \(0, 1\)"),
        ("4:1.5,1", r"fraction 1.5 must be in \(0, 1\)"),
        ("4:0.5,2:0.5,1", "the fractions sum to 1; keep them below 1"),
        ("5:0.1,7:0.1,3:0.1,1", "lcm\\(bag sizes\\) = 105 units"),
    ],
)
def test_malformed_schedules_are_refused(value, message):
    with pytest.raises(ConfigError, match=f"--tst-schedule '{value}': .*{message}"):
        parse_args(BASE + ["--tst-schedule", value])


def test_schedule_with_two_phase_flags_is_refused():
    for flags in (["--tst-bag-size", "4"], ["--tst-fraction", "0.3"], ["--tst-iters", "2"]):
        with pytest.raises(ConfigError, match=f"--tst-schedule .*: drop {flags[0]}"):
            parse_args(BASE + THREE + flags)
    assert parse_schedule("8:0.1, 4:0.2 ,1") == ((8, 0.1), (4, 0.2))


def test_one_sided_reinit_refused_with_tied_embeddings():
    tied = [a for a in BASE if a != "--untie-embeddings-and-output-weights"]
    for flag in ("--tst-reinit-input-embedding-at-switch", "--tst-reinit-output-layer-at-switch"):
        with pytest.raises(ValueError, match=f"{flag} needs --untie-embeddings-and-output"):
            pretrain_tst.main(tied + THREE + [flag])
        with pytest.raises(ConfigError, match="need --tst-bag-size > 1 or a --tst-schedule"):
            parse_args(BASE + [flag])  # no switch at all
        validate(parse_args(BASE + THREE + [flag]), 1, 512)  # untied: accepted
    validate(parse_args(tied + THREE + ["--tst-reinit-embeddings-at-switch"]), 1, 512)


# ---------------------------------------------------------------- runs


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _losses(records) -> list[tuple]:
    return [(r["iteration"], r["phase"], r["loss"]) for r in records if "loss_name" in r]


def _val(records) -> list[tuple]:
    return [(r["iteration"], r["val_loss"]) for r in records if "val_loss" in r]


def _close(got, want, rel: float, label: str) -> None:
    assert [g[:-1] for g in got] == [w[:-1] for w in want], label
    for g, w in zip(got, want, strict=True):
        assert g[-1] == pytest.approx(w[-1], rel=rel), f"{label}: {g} vs {w}"


def _train(argv: list[str], metrics: str) -> list[dict]:
    import torch.distributed as dist

    assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    dist.barrier()
    return _records(metrics)


def _resume_error(argv: list[str], metrics: str) -> str:
    from trainer_runs import main_error

    return main_error(argv, metrics, (ValueError,))


def _oracle_run(argv: list[str], metrics: str) -> dict[int, tuple[float, float]]:
    """Train ``argv`` in this process (a world of one); at the first step of each stage,
    score that step's rows with the reference before the step runs. Returns
    ``{stage: (reference loss, the run's logged loss)}``."""
    from tst.model import apply_phase
    from tst.trainer import Trainer

    original, seen = Trainer.train_step, {}

    def train_step(self, phase):
        if self.iteration != phase.start:
            return original(self, phase)
        position = self.train_stream.state_dict()
        rows = torch.cat([self.train_stream.next_micro_batch(phase.units_per_row)
                          for _ in range(self.plan.microbatches_at(self.iteration))])  # fmt: skip
        self.train_stream.load_state_dict(position)  # the step reads the same rows
        inputs, targets, mask = ref.tst_batch(rows, phase.input_bag)
        weights = None  # --tst-slot-weights power: the paper's 1/i over each stage's own bag
        if self.cfg.tst.tst_slot_weights == "power" and phase.target_bag > 1:
            weights = torch.tensor([1.0 / i for i in range(1, phase.target_bag + 1)])
        apply_phase(self.model, phase)  # logits, no target loss
        positions = torch.arange(SEQ).expand(inputs.shape[0], -1)
        with torch.no_grad():
            logits = self.raw_chunks[0](inputs, positions, attention_mask=None)  # [b, L, V]
        mce = ref.multi_hot_ce(logits, targets, slot_weights=weights)
        want = float((mce * mask).sum() / mask.sum())
        result = original(self, phase)
        seen[phase.stage] = (want, result["loss"])
        return result

    Trainer.train_step = train_step
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        Trainer.train_step = original
    return seen


def test_three_stages_oracle_layouts_and_resume(world2, tmp_path):
    argv = BASE + THREE
    firsts = _oracle_run(argv, str(tmp_path / "one.jsonl"))
    assert sorted(firsts) == [0, 1, 2]
    for stage, (want, got) in firsts.items():
        assert got == pytest.approx(want, rel=FIRST_STEP_REL), f"stage {stage}"
    one = _records(str(tmp_path / "one.jsonl"))
    names = [r["loss_name"] for r in one if "loss_name" in r]
    assert names == ["mce"] * 4 + ["lm"] * 4
    header = next(r for r in one if "phases" in r)
    assert [(p["stage"], p["start"], p["input_bag"]) for p in header["phases"]] == [
        (0, 0, 4), (1, 2, 2), (2, 4, 1),
    ]  # fmt: skip
    # Raw tokens: 2 steps x 4 rows x 4 units, 2 x 4 x 2, 4 x 4 x 1 units of L + 1 tokens.
    raw = [r["raw_tokens"] for r in one if "loss_name" in r]
    assert raw[1] == 2 * 4 * 4 * (SEQ + 1) and raw[3] == raw[1] + 2 * 4 * 2 * (SEQ + 1)
    assert raw[-1] == raw[3] + 4 * 4 * (SEQ + 1)

    _tools_follow_the_stages(str(tmp_path / "one.jsonl"), tmp_path)

    layouts = {
        "TP1-DP2": [],
        "TP2": ["--tensor-model-parallel-size", "2"],
        "PP2": ["--pipeline-model-parallel-size", "2"],
    }
    for name, extra in layouts.items():
        got = world2.run(_train, argv + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _close(_losses(got), _losses(one), LAYOUT_REL, name)
        _close(_val(got), _val(one), LAYOUT_REL, name)
        assert _losses(got)[0][-1] == pytest.approx(firsts[0][0], rel=FIRST_STEP_REL), name
        if name == "TP1-DP2":
            unbroken = got

    # Stop inside stage 0 (after step 1), resume, stop inside stage 1 (after step 3), resume.
    ckpt = str(tmp_path / "ckpt")
    parts = []
    for extra in (["--exit-interval", "1"], ["--exit-interval", "3"], []):
        metrics = str(tmp_path / f"part{len(parts)}.jsonl")
        parts.append(world2.run(_train, argv + ["--save", ckpt, "--load", ckpt] + extra,
                                metrics)[0])  # fmt: skip
    resumed = [loss for part in parts for loss in _losses(part)]
    _close(resumed, _losses(unbroken), RESUME_REL, "stopped in stages 0 and 1, resumed")
    assert [len(_losses(p)) for p in parts] == [1, 2, 5]

    # The checkpoint at 3 (stage 1) under a schedule that puts 3 in stage 0: refused.
    assert os.path.isdir(os.path.join(ckpt, "iter_0000003"))
    with open(os.path.join(ckpt, TRACKER), "w") as f:
        f.write("3")
    earlier = BASE + ["--tst-schedule", "4:0.5,1", "--load", ckpt]
    message = world2.run(_resume_error, earlier, str(tmp_path / "refused.jsonl"))[0]
    assert "stage 1 (superposition phase)" in message and "in stage 0" in message, message
    assert "never goes back" in message and "--tst-schedule" in message


def test_power_slot_weights_follow_each_stage_bag(tmp_path):
    """Each bag stage weighs its own slots 1/i (bag 4: 1, 1/2, 1/3, 1/4; bag 2: 1, 1/2)."""
    argv = _iters(4) + THREE + ["--tst-slot-weights", "power", "--eval-interval", "100"]
    firsts = _oracle_run(argv, str(tmp_path / "power.jsonl"))
    assert sorted(firsts) == [0, 1, 2]
    for stage, (want, got) in firsts.items():
        assert got == pytest.approx(want, rel=FIRST_STEP_REL), f"stage {stage}"


def _tools_follow_the_stages(metrics: str, tmp_path) -> None:
    """run_metrics / compare_runs / plot_runs read the stages of a three-stage run's file."""
    from data_support import load_tool

    run_metrics = load_tool("run_metrics")
    run = run_metrics.read_metrics(metrics)
    assert run.stage_starts == [(2, SUPERPOSITION), (4, RECOVERY)]
    assert run.switch_iteration == 4
    # Without the header (the phase table), from the logged stages.
    bare = run_metrics.RunMetrics("bare", run.train, run.evals)
    assert bare.stage_starts == [(2, SUPERPOSITION), (4, RECOVERY)]
    compared = load_tool("compare_runs").compare(run, run)
    assert compared["candidate_stage_starts"] == [2, 4]
    png = str(tmp_path / "stages.png")
    assert load_tool("plot_runs").main(["--runs", f"tst={metrics}", "--output", png]) == 0
    assert os.path.getsize(png) > 0


def test_two_stage_schedule_trains_as_the_two_phase_flags(world2, tmp_path):
    short = _iters(4)
    flags = world2.run(_train, short + ["--tst-bag-size", "4", "--tst-fraction", "0.5"],
                       str(tmp_path / "flags.jsonl"))[0]  # fmt: skip
    two = world2.run(_train, short + ["--tst-schedule", "4:0.5,1"],
                     str(tmp_path / "two.jsonl"))[0]  # fmt: skip
    assert [r["phase"] for r in flags if "loss_name" in r] == [SUPERPOSITION] * 2 + [RECOVERY] * 2
    assert _losses(two) == _losses(flags) and _val(two) == _val(flags)  # identical


# ---------------------------------------------------------------- switch controls

HEADS = {"input": "embedding.word_embeddings.weight", "output": "output_layer.weight"}


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.raw_chunks[0].named_parameters()}


def _spy_train(argv: list[str]) -> dict:
    """Train ``argv`` in this process with a spy around the switch controls: the initial
    weights, those just before and after the call, and the iterations it was called at."""
    from tst.platform import initialize, shutdown
    from tst.trainer import Trainer

    cfg = parse_args(argv)
    tokenizer = pretrain_tst.build_tokenizer(cfg)
    layout = initialize(seed=cfg.training.seed)
    try:
        plan = validate(cfg, layout.world_size, cfg.data.vocab_size)
        datasets = pretrain_tst.build_datasets(cfg, plan, tokenizer, cfg.data.vocab_size)
        trainer = Trainer(cfg, layout, plan, tokenizer, datasets)
        seen = {"initial": _weights(trainer), "calls": []}
        apply = trainer.apply_switch_controls

        def spy():
            seen["calls"].append(trainer.iteration)
            seen["before"] = _weights(trainer)
            apply()
            seen["after"] = _weights(trainer)

        trainer.apply_switch_controls = spy
        assert trainer.train() == 0
        return seen
    finally:
        shutdown(layout)


@pytest.mark.parametrize("side", ["input", "output", "both"])
def test_one_sided_reinit_at_the_recovery_switch(side):
    short = _iters(6)  # stages 0-1 bag 4, 2-3 bag 2, 4-5 lm
    schedule = ["--tst-schedule", "4:0.34,2:0.33,1"]
    flag = {"input": "--tst-reinit-input-embedding-at-switch",
            "output": "--tst-reinit-output-layer-at-switch",
            "both": "--tst-reinit-embeddings-at-switch"}[side]  # fmt: skip
    seen = _spy_train(short + schedule + ["--eval-interval", "100", flag])
    assert seen["calls"] == [4]  # once, at the switch to the recovery phase only
    chosen = set(HEADS.values()) if side == "both" else {HEADS[side]}
    for name in seen["before"]:
        learned = not torch.equal(seen["before"][name], seen["initial"][name])
        assert learned, name  # four superposition steps moved every weight
        fresh = torch.equal(seen["after"][name], seen["initial"][name])
        unchanged = torch.equal(seen["after"][name], seen["before"][name])
        assert (fresh, unchanged) == ((True, False) if name in chosen else (False, True)), name


def test_switches_and_one_sided_control_through_pretrain_tst(tmp_path, capsys):
    argv = _iters(6) + ["--tst-schedule", "4:0.34,2:0.33,1", "--eval-interval", "100",
                        "--tst-reinit-output-layer-at-switch",
                        "--metrics-file", str(tmp_path / "m.jsonl")]  # fmt: skip
    assert pretrain_tst.main(argv) == 0
    out = capsys.readouterr().out
    assert "iteration 2: switching to stage 1 (bag 2)" in out
    assert "iteration 4: switching to the recovery phase" in out
    applied = [line for line in out.splitlines() if "switch controls applied" in line]
    assert applied == [
        "iteration 4: switch controls applied (re-initialised: output_layer.weight; optimizer "
        "state reset: False, LR schedule restarted: False)"
    ]
    stages = [(r["iteration"], r["stage"]) for r in _records(str(tmp_path / "m.jsonl"))
              if "loss_name" in r]  # fmt: skip
    assert stages == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]
