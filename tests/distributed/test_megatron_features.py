"""Megatron-LM's scale machinery through pretrain_tst.py, across the phase switch.

Communication overlap, activation recomputation and the distributed optimizer change how a
step is computed, not what: their losses equal the plain run's (fp32, no dropout; rel 1e-5
for the ones that reorder reductions, 1e-6 for recomputation, which repeats the same ops).
Each run also reports what megatron-core was given, so a flag that stops being wired fails
here even where the numbers could not tell. fp16 with loss scaling tracks fp32 within 2e-3
relative and skips overflowing steps without touching the weights. Checkpoint flags
(--finetune, --no-load-optim, schedule checks, a --load with nothing in it) are checked
against the uninterrupted run.
"""

from __future__ import annotations

import json

import pytest
import torch
from flags import SWITCH_RUN

import pretrain_tst

BASE = SWITCH_RUN


def _train(argv: list[str], metrics: str) -> dict:
    """Run pretrain_tst.main; return the records and what megatron-core was configured with."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from tst.trainer import Trainer

    original, check, seen = Trainer.train, Trainer._check_replicas_agree, {"hash_checks": []}

    def check_replicas(self):
        seen["hash_checks"].append(self.iteration)
        return check(self)

    def train(self):
        chunk = self.model[0]
        seen.update(
            overlap_grad_reduce=chunk.ddp_config.overlap_grad_reduce,
            overlap_param_gather=chunk.ddp_config.overlap_param_gather,
            bucket_size=chunk.ddp_config.bucket_size,
            parameters=sum(p.numel() for c in self.model for p in c.parameters()),
            buckets=len(chunk.bucket_groups),
            grad_sync_func=self.config.grad_sync_func is not None,
            recompute=(self.config.recompute_granularity, self.config.recompute_method,
                       self.config.recompute_num_layers),
            distributed_saved=self.config.distribute_saved_activations,
            fp16=self.config.fp16,
            gloo_groups=parallel_state._DATA_PARALLEL_GROUP_WITH_CP_GLOO is not None,
        )  # fmt: skip
        return original(self)

    Trainer.train, Trainer._check_replicas_agree = train, check_replicas
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        Trainer.train, Trainer._check_replicas_agree = original, check
    dist.barrier()
    with open(metrics) as f:
        seen["records"] = [json.loads(line) for line in f]
    return seen


def _losses(run: dict) -> list[tuple[int, float]]:
    return [(r["iteration"], r["loss"]) for r in run["records"] if r.get("loss") is not None]


def _close(got, want, rel, label):
    assert [i for i, _ in got] == [i for i, _ in want], label
    for (i, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=rel), f"{label}, step {i}: {got} vs {want}"


OVERLAP = {
    "overlap-grad-reduce": ["--overlap-grad-reduce", "--ddp-bucket-size", "2000"],
    "distributed-optimizer": ["--use-distributed-optimizer"],
    # With the replicas' weights compared every 2 steps (the parameter gathers finished first).
    "distopt+overlap": [
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--ddp-bucket-size", "2000", "--check-weight-hash-across-dp-replicas-interval", "2",
    ],
    # Buckets of (this rank's parameters // 4), padded, reduce-scatter accumulating in fp32;
    # no gloo copies of the data-parallel groups.
    "distopt+overlap-4-buckets": [
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-num-buckets", "4",
        "--ddp-pad-buckets-for-high-nccl-busbw", "--ddp-reduce-scatter-with-fp32-accumulation",
        "--no-gradient-reduce-div-fusion", "--disable-gloo-process-groups",
    ],
}  # fmt: skip


def test_overlap_and_distributed_optimizer_change_no_loss(world2, tmp_path, tmp_path_factory):
    want = _plain(world2, tmp_path_factory)
    assert not want["overlap_grad_reduce"] and not want["grad_sync_func"]
    for name, extra in OVERLAP.items():
        got = world2.run(_train, BASE + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _close(_losses(got), _losses(want), 1e-5, name)
        if "--overlap-grad-reduce" in extra:
            # Overlap reduces bucket by bucket during the backward: several buckets.
            assert got["overlap_grad_reduce"] and got["grad_sync_func"], name
            if "--ddp-num-buckets" in extra:
                assert got["bucket_size"] == got["parameters"] // 4, name
                assert got["buckets"] >= 3, name
            else:
                assert got["bucket_size"] == 2000 and got["buckets"] > 1, name
        if "--overlap-param-gather" in extra:
            assert got["overlap_param_gather"], name
        want_checks = (
            [2, 4, 6] if "--check-weight-hash-across-dp-replicas-interval" in extra else []
        )
        assert got["hash_checks"] == want_checks, name
        assert got["gloo_groups"] == ("--disable-gloo-process-groups" not in extra), name


# Values for the accepted flags that take one: what Megatron-LM's launch scripts pass.
_ACCEPTED_VALUES = {"--distributed-backend": "nccl", "--fp8-interval": "1", "--local-rank": "0",
                    "--num-dataset-builder-threads": "4", "--tensorboard-queue-size": "5",
                    # Megatron-LM 0.19's async writer settings (its defaults)
                    "--async-ckpt-cpu-priority": "10", "--async-ckpt-io-priority": "3",
                    "--dist-ckpt-workers": "1"}  # fmt: skip


def test_every_accepted_flag_at_once_trains_the_same_model(world2, tmp_path, tmp_path_factory):
    """The flags accepted as changing nothing here (tst/megatron_flags.py's ACCEPTED, e.g.
    --ddp-average-in-collective, --calculate-per-token-loss, --no-initialization), all given
    at once to a data-parallel run of 2 ranks across the switch, train bit for bit the plain
    run's model: the same loss and gradient norm at every step and the same held-out loss."""
    from tst.megatron_flags import ACCEPTED

    extra = []
    for flag, spec in sorted(ACCEPTED.items()):
        if flag == "--config-logger-dir":
            extra += [flag, str(tmp_path / "config-logger")]
        elif spec.nargs == 0:
            extra.append(flag)
        else:
            extra += [flag, _ACCEPTED_VALUES[flag]]
    assert "--ddp-average-in-collective" in extra and "--calculate-per-token-loss" in extra
    extra.append("--no-load-optim")  # --load-main-params-from-ckpt's rule (no --load: no effect)
    want = _plain(world2, tmp_path_factory)
    got = world2.run(_train, BASE + extra, str(tmp_path / "accepted.jsonl"))[0]

    def steps(run):
        return [(r["iteration"], r.get("loss_name"), r.get("loss"), r.get("grad_norm"),
                 r.get("val_loss")) for r in run["records"]
                if r.get("loss") is not None or r.get("val_loss") is not None]  # fmt: skip

    assert len([s for s in steps(want) if s[2] is not None]) == 6, steps(want)
    assert any(s[4] is not None for s in steps(want)), steps(want)
    assert steps(got) == steps(want)


def _train_with_a_diverged_replica(argv: list[str]) -> tuple[str, str]:
    """pretrain_tst.main with one weight of data-parallel rank 1 nudged after step 2: the
    error it raises (pretrain_tst.py prints it and exits 3) and what the rank printed."""
    import contextlib
    import io

    from tst.errors import RunError
    from tst.trainer import Trainer

    check = Trainer._check_replicas_agree

    def diverge_then_check(self):
        if self.layout.dp_rank == 1 and self.iteration == 2:
            weight = self.raw_chunks[0].decoder.layers[1].mlp.linear_fc2.weight
            weight.data[0, 0] += 1e-3
        return check(self)

    out, error = io.StringIO(), ""
    Trainer._check_replicas_agree = diverge_then_check
    try:
        with contextlib.redirect_stdout(out):
            pretrain_tst.main(argv)
    except RunError as raised:
        error = str(raised)
    finally:
        Trainer._check_replicas_agree = check
    return error, out.getvalue()


def test_weight_hash_check_stops_a_diverged_replica(world2):
    """--check-weight-hash-across-dp-replicas-interval: one weight nudged on one replica stops
    both ranks at the next check, the parameter and the rank named."""
    flags = BASE + ["--check-weight-hash-across-dp-replicas-interval", "2"]
    (error0, out0), (error1, out1) = world2.run(_train_with_a_diverged_replica, flags)
    for error in (error0, error1):
        assert "replicas' weights differ after iteration 2 (2 parameter copies" in error, error
    for rank, out in enumerate((out0, out1)):
        assert (f"rank {rank}: weights differ across data-parallel replicas after iteration 2: "
                "decoder.layers.1.mlp.linear_fc2.weight (ranks [1] differ from rank 0)") in out, out  # fmt: skip
    assert "iter      2/6" in out0 and ">>> Weight hashes match" not in out0


RECOMPUTE = {
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "2"],
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "1"],
    # Each TP rank keeps half of each group's saved input, gathered for the recomputation.
    "full-distributed": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                         "--recompute-num-layers", "1", "--distribute-saved-activations"],
    "selective": ["--recompute-granularity", "selective"],
    "selective-mlp": ["--recompute-granularity", "selective", "--recompute-modules", "mlp",
                      "layernorm"],
}  # fmt: skip


def test_recomputation_changes_no_loss(world2, tmp_path):
    """Both phases (the switch is after step 3), with TP 2 so recomputed TP regions rerun."""
    tp2 = BASE + ["--tensor-model-parallel-size", "2"]
    want = world2.run(_train, tp2, str(tmp_path / "plain.jsonl"))[0]
    assert want["recompute"] == (None, None, None)
    for name, extra in RECOMPUTE.items():
        got = world2.run(_train, tp2 + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _close(_losses(got), _losses(want), 1e-6, name)
        assert got["recompute"][0] == extra[1], name
        assert got["distributed_saved"] == ("--distribute-saved-activations" in extra), name


def test_fp16_with_loss_scaling_tracks_fp32(world2, tmp_path, tmp_path_factory):
    want = _plain(world2, tmp_path_factory)
    fp16 = BASE + ["--fp16", "--initial-loss-scale", "1024"]
    got = world2.run(_train, fp16, str(tmp_path / "fp16.jsonl"))[0]
    assert got["fp16"]
    _close(_losses(got), _losses(want), 2e-3, "fp16")
    scales = [r["loss_scale"] for r in got["records"] if "loss_scale" in r]
    assert scales and all(s == 1024 for s in scales)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(world2, tmp_path, tmp_path_factory):
    """A scale of 2**40 overflows fp16 gradients: those steps change no weight (the next
    good step's loss equals the fp32 run's first loss), and the scale halves each time."""
    want = _plain(world2, tmp_path_factory)
    huge = BASE + ["--fp16", "--initial-loss-scale", str(2.0**40), "--hysteresis", "1"]
    got = world2.run(_train, huge, str(tmp_path / "fp16.jsonl"))[0]
    overflows = [r for r in got["records"] if r.get("overflow")]
    assert overflows, "no overflow at a loss scale of 2**40"
    scales = [r["loss_scale"] for r in overflows]
    assert scales == [2.0**40 / 2 ** (i + 1) for i in range(len(scales))]
    first = _losses(got)[0][1]  # every logged step before it overflowed: same weights
    assert first == pytest.approx(_losses(want)[0][1], rel=2e-3)


def test_fp16_checkpoint_before_the_first_applied_step_resumes(world2, tmp_path):
    """A checkpoint saved while fp16 still skips every step (no Adam state yet) could not be
    written with the distributed optimizer (megatron-core asserts on the missing step) and
    was written without moments or step otherwise, which torch's Adam refused to load. Saved
    at iteration 2 with both steps skipped, the run resumes as the unbroken one (rel 1e-6),
    with and without the distributed optimizer."""
    # 2**15 overflows at iterations 1 and 2 (halved after each); iteration 3 is the first
    # applied step, from the restored (empty) Adam state.
    huge = BASE + ["--fp16", "--initial-loss-scale", str(2.0**15), "--hysteresis", "1"]
    for name, extra in (("plain", []), ("distributed", ["--use-distributed-optimizer"])):
        want = world2.run(_train, huge + extra, str(tmp_path / f"{name}-whole.jsonl"))[0]
        ckpt = str(tmp_path / name)
        first = world2.run(_train, huge + extra + ["--save", ckpt, "--exit-interval", "2"],
                           str(tmp_path / f"{name}-a.jsonl"))[0]  # fmt: skip
        skipped = [r["iteration"] for r in first["records"] if r.get("overflow")]
        assert skipped == [1, 2], (name, skipped)  # no step applied before the save
        second = world2.run(_train, huge + extra + ["--load", ckpt],
                            str(tmp_path / f"{name}-b.jsonl"))[0]  # fmt: skip
        _close(_losses(first) + _losses(second), _losses(want), 1e-6, name)
        overflows = {r["iteration"] for r in want["records"] if r.get("overflow")}
        assert 3 not in overflows and {1, 2} <= overflows, (name, overflows)


def test_finetune_and_no_load_optim(world2, tmp_path, tmp_path_factory):
    ckpt = str(tmp_path / "ckpt")
    full = world2.run(_train, BASE + ["--save", ckpt, "--save-interval", "4"],
                      str(tmp_path / "full.jsonl"))[0]  # fmt: skip
    fresh = _losses(full)
    # --finetune: iteration 1 again, with the saved weights (a lower loss than step 1 of a
    # fresh model) and a fresh warm-up (the same LR as the fresh run's step 1).
    tuned = world2.run(_train, BASE + ["--load", ckpt, "--finetune"],
                       str(tmp_path / "ft.jsonl"))[0]  # fmt: skip
    assert [i for i, _ in _losses(tuned)] == [1, 2, 3, 4, 5, 6]
    assert _losses(tuned)[0][1] < fresh[0][1] - 0.05
    lr = [r["lr"] for r in tuned["records"] if "lr" in r]
    assert lr == [r["lr"] for r in full["records"] if "lr" in r]
    # --pretrained-checkpoint with an empty --load: the same start as --finetune; the next
    # launch of the same command resumes from --load (iterations 5, 6 as the unbroken run),
    # not from the pretrained weights again. A directory with no checkpoint is refused.
    run = str(tmp_path / "run")
    pre = BASE + ["--pretrained-checkpoint", ckpt, "--load", run, "--save", run]
    first = world2.run(_train, pre + ["--exit-interval", "4"], str(tmp_path / "p1.jsonl"))[0]
    _close(_losses(first), _losses(tuned)[:4], 1e-6, "--pretrained-checkpoint")
    again = world2.run(_train, pre, str(tmp_path / "p2.jsonl"))[0]
    _close(_losses(again), _losses(tuned)[4:], 1e-6, "resume over --pretrained-checkpoint")
    empty = str(tmp_path / "empty")
    message = world2.run(_resume_error, BASE + ["--pretrained-checkpoint", empty],
                         str(tmp_path / "p3.jsonl"))[0]  # fmt: skip
    assert f"--pretrained-checkpoint {empty}: no checkpoint there" in message
    # --no-load-optim: the run continues at iteration 7 with fresh Adam moments; an exact
    # resume would repeat the uninterrupted run, this one must not (Adam restarts).
    ckpt4 = _stopped_at_4(world2, tmp_path_factory)
    exact = world2.run(_train, BASE + ["--load", ckpt4], str(tmp_path / "b.jsonl"))[0]
    _close(_losses(exact), fresh[4:], 1e-6, "exact resume")
    no_optim = world2.run(_train, BASE + ["--load", ckpt4, "--no-load-optim"],
                          str(tmp_path / "c.jsonl"))[0]  # fmt: skip
    assert [i for i, _ in _losses(no_optim)] == [5, 6]
    assert _losses(no_optim)[0][1] == pytest.approx(fresh[4][1], rel=1e-6)  # same weights
    assert abs(_losses(no_optim)[1][1] - fresh[5][1]) > 1e-5  # a different update


# Runs several tests start from: the plain run, and the checkpoint of a run stopped at
# iteration 4, each made once per test session (the worlds come and go; the results do not).
_ONCE: dict[str, object] = {}


def _plain(world, tmp_path_factory) -> dict:
    if "plain" not in _ONCE:
        folder = tmp_path_factory.mktemp("plain")
        _ONCE["plain"] = world.run(_train, BASE, str(folder / "plain.jsonl"))[0]
    return _ONCE["plain"]


def _stopped_at_4(world, tmp_path_factory) -> str:
    """A checkpoint of BASE at iteration 4 (--exit-interval 4); the tests only --load it."""
    if "ckpt4" not in _ONCE:
        folder = tmp_path_factory.mktemp("ckpt4")
        ckpt = str(folder / "ckpt")
        world.run(_train, BASE + ["--save", ckpt, "--exit-interval", "4"], str(folder / "m.jsonl"))
        _ONCE["ckpt4"] = ckpt
    return _ONCE["ckpt4"]


def _resume_error(argv: list[str], metrics: str) -> str:
    from tst.errors import TSTError

    with pytest.raises((ValueError, TSTError)) as error:
        pretrain_tst.main(argv + ["--metrics-file", metrics])
    return str(error.value)


def test_resume_with_changed_schedule_or_phase(world2, tmp_path, tmp_path_factory):
    """Extending a run on resume is refused until the user says which schedule wins; a
    checkpoint in the recovery phase never goes back to superposition."""
    ckpt = str(tmp_path / "ckpt")
    world2.run(_train, BASE + ["--save", ckpt, "--exit-interval", "5"], str(tmp_path / "a.jsonl"))
    longer = [a if a != "6" else "12" for a in BASE] + ["--load", ckpt]
    message = world2.run(_resume_error, longer, str(tmp_path / "b.jsonl"))[0]
    assert "--override-opt_param-scheduler" in message and "--use-checkpoint-opt_param" in message
    flags = world2.run(_train, longer + ["--override-opt_param-scheduler"],
                       str(tmp_path / "c.jsonl"))[0]  # fmt: skip
    kept = world2.run(_train, longer + ["--use-checkpoint-opt_param-scheduler"],
                      str(tmp_path / "d.jsonl"))[0]  # fmt: skip
    lr_flags = [r["lr"] for r in flags["records"] if "lr" in r]
    lr_kept = [r["lr"] for r in kept["records"] if "lr" in r]
    assert len(lr_flags) == len(lr_kept) == 7  # iterations 6..12
    assert lr_flags[0] > 0 and lr_kept[-1] == 0.0 and lr_flags[-1] == 0.0
    assert lr_kept[1] == 0.0  # the checkpoint's schedule ended at iteration 6
    later_switch = [a if a != "3" else "5" for a in BASE]
    i = later_switch.index("--tst-iters")
    later_switch[i + 1] = "5"
    ckpt4 = _stopped_at_4(world2, tmp_path_factory)
    message = world2.run(_resume_error, later_switch + ["--load", ckpt4],
                         str(tmp_path / "f.jsonl"))[0]  # fmt: skip
    assert "never goes back to an earlier phase" in message and "--tst-iters" in message


def test_load_of_an_empty_directory_starts_from_scratch(world2, tmp_path, tmp_path_factory):
    want = _plain(world2, tmp_path_factory)
    ckpt = str(tmp_path / "new")
    got = world2.run(_train, BASE + ["--save", ckpt, "--load", ckpt], str(tmp_path / "b.jsonl"))[0]
    _close(_losses(got), _losses(want), 1e-6, "fresh start")
    # --exit-on-missing-checkpoint: a mistyped path stops the run instead.
    typo = str(tmp_path / "nwe")
    message = world2.run(_resume_error, BASE + ["--load", typo, "--exit-on-missing-checkpoint"],
                         str(tmp_path / "c.jsonl"))[0]  # fmt: skip
    assert f"--load {typo}: no checkpoint there, and --exit-on-missing-checkpoint" in message


def test_ckpt_step_and_skip_train(world2, tmp_path):
    """--ckpt-step 2 resumes from iteration 2 though the tracker names 6: the run continues as
    the unbroken one did (rel 1e-6); a step with no complete checkpoint is refused, listing
    the ones there. --skip-train with --ckpt-step 6: no step, the validation loss the
    training run logged at 6 (the same batches and weights, rel 1e-6) and the test loss."""
    ckpt = str(tmp_path / "ckpt")
    full = world2.run(_train, BASE + ["--save", ckpt, "--save-interval", "2"],
                      str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    got = world2.run(_train, BASE + ["--load", ckpt, "--ckpt-step", "2"],
                     str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    _close(_losses(got), _losses(full)[2:], 1e-6, "--ckpt-step 2")
    message = world2.run(_resume_error, BASE + ["--load", ckpt, "--ckpt-step", "3"],
                         str(tmp_path / "c.jsonl"))[0]  # fmt: skip
    assert "--ckpt-step 3: " in message and "(complete ones: 2, 4, 6)" in message
    got = world2.run(_train, BASE + ["--load", ckpt, "--ckpt-step", "6", "--skip-train"],
                     str(tmp_path / "d.jsonl"))[0]  # fmt: skip
    assert not _losses(got)  # no training step
    evals = [r for r in got["records"] if "val_loss" in r]
    want = [r["val_loss"] for r in full["records"] if r.get("iteration") == 6 and "val_loss" in r]
    assert [r["iteration"] for r in evals] == [6] and len(want) == 1
    assert evals[0]["val_loss"] == pytest.approx(want[0], rel=1e-6)
    assert [r["iteration"] for r in got["records"] if "test_loss" in r] == [6]


def _sample_based(samples: int) -> list[str]:
    """BASE trained for ``samples`` samples (warm-up over 8, linear decay, the switch half
    way through the steps)."""
    argv = [a for a in BASE]
    for flag, replacement in (("--train-iters", ["--train-samples", str(samples)]),
                              ("--lr-warmup-iters", ["--lr-warmup-samples", "8"]),
                              ("--tst-iters", ["--tst-fraction", "0.5"])):  # fmt: skip
        i = argv.index(flag)
        argv[i : i + 2] = replacement
    return argv + ["--lr-decay-style", "linear"]


def test_sample_based_training_with_batch_rampup(world2, tmp_path):
    """--train-samples with --rampup-batch-size 4 4 24 (global batch 8, DP 2, micro 2):
    Megatron-LM's step count and batch sizes, the LR scheduler counting samples, the switch
    on a step boundary (--tst-fraction of the steps) and the data position following the
    samples read."""
    argv = _sample_based(64) + ["--rampup-batch-size", "4", "4", "24"]
    run = world2.run(_train, argv, str(tmp_path / "m.jsonl"))[0]
    train = [r for r in run["records"] if "loss" in r and "batch_size" in r]
    # Megatron-LM's rule: 4 until 24 samples are read (one increment of 4 over 24 samples),
    # then 8; steps while consumed <= 24 are ramp-up (6 x 4, then 8: 32), then
    # (64 - 32) // 8 = 4 more: 11 steps.
    assert [r["batch_size"] for r in train] == [4] * 6 + [8] * 5
    assert [r["phase"] for r in train] == ["superposition"] * 6 + ["recovery"] * 5  # 0.5 x 11
    # The LR a step leaves (the next step's): warm-up over 8 samples, then linear decay to 0
    # at 64 samples; the scheduler moved by each step's batch.
    consumed = [4, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64]
    want = [3e-3 * c / 8 if c <= 8 else 3e-3 * (1 - (c - 8) / 56) for c in consumed]
    for got, lr in zip([r["lr"] for r in train], want, strict=True):
        assert got == pytest.approx(lr, rel=1e-6, abs=1e-12)
    rows = [r["data_units"] for r in train]
    # A superposition row reads 3 units (the bag), a recovery row one.
    steps = [b * (3 if r["phase"] == "superposition" else 1) for r, b in
             zip(train, [r["batch_size"] for r in train], strict=True)]  # fmt: skip
    assert [b - a for a, b in zip([0] + rows, rows, strict=False)] == steps


def test_step_batch_size_schedule(world2, tmp_path):
    """--step-batch-size-schedule (Megatron-LM 0.19) "0:4 128:8 0.2K:4" at --seq-length 8:
    thresholds in tokens, so batch 4 for the first 16 samples, 8 from 16, 4 again from 25
    (the last batch is the global batch), over --train-samples 48: Megatron-LM's count,
    4 x 4, 2 x 8 (32 read, past 25), then 4 x 4: 10 steps; the LR scheduler moves by each
    step's batch; a run stopped inside the schedule and resumed repeats the unbroken one."""
    argv = _sample_based(48)
    i = argv.index("--global-batch-size")
    argv[i : i + 2] = ["--step-batch-size-schedule", "0:4 128:8 0.2K:4"]
    run = world2.run(_train, argv, str(tmp_path / "m.jsonl"))[0]
    train = [r for r in run["records"] if "loss" in r and "batch_size" in r]
    assert [r["batch_size"] for r in train] == [4] * 4 + [8] * 2 + [4] * 4
    assert [r["phase"] for r in train] == ["superposition"] * 5 + ["recovery"] * 5
    consumed = [4, 8, 12, 16, 24, 32, 36, 40, 44, 48]
    want = [3e-3 * c / 8 if c <= 8 else 3e-3 * (1 - (c - 8) / 40) for c in consumed]
    for got, lr in zip([r["lr"] for r in train], want, strict=True):
        assert got == pytest.approx(lr, rel=1e-6, abs=1e-12)
    ckpt = str(tmp_path / "ckpt")
    first = world2.run(_train, argv + ["--save", ckpt, "--exit-interval", "5"],
                       str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    second = world2.run(_train, argv + ["--load", ckpt], str(tmp_path / "b.jsonl"))[0]
    _close(_losses(first) + _losses(second), _losses(run), 1e-6, "schedule resume")


def test_dropout_resume_is_exact(world2, tmp_path):
    """Megatron-LM's default dropout (0.1): the resumed run draws what the unbroken one drew."""
    drop = [a for a in BASE]
    for flag in ("--hidden-dropout", "--attention-dropout"):
        drop[drop.index(flag) + 1] = "0.1"
    want = world2.run(_train, drop, str(tmp_path / "full.jsonl"))[0]
    plain = world2.run(_train, BASE, str(tmp_path / "plain.jsonl"))[0]
    assert abs(_losses(want)[0][1] - _losses(plain)[0][1]) > 1e-4  # dropout is on
    ckpt = str(tmp_path / "ckpt")
    first = world2.run(_train, drop + ["--save", ckpt, "--exit-interval", "2"],
                       str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    second = world2.run(_train, drop + ["--load", ckpt], str(tmp_path / "b.jsonl"))[0]
    _close(_losses(first) + _losses(second), _losses(want), 1e-6, "dropout resume")


def test_profile_writes_a_trace_and_decoupled_lr_reaches_the_embeddings(world2, tmp_path):
    tb = tmp_path / "tb"
    argv = BASE + ["--profile", "--profile-step-start", "2", "--profile-step-end", "3",
                   "--tensorboard-dir", str(tb), "--decoupled-lr", "1e-2"]  # fmt: skip
    run = world2.run(_train, argv, str(tmp_path / "m.jsonl"))[0]
    assert [p.name for p in tb.iterdir() if p.suffix == ".json"] == ["profile_rank0_steps2-3.json"]
    assert _losses(run) != _losses(world2.run(_train, BASE, str(tmp_path / "n.jsonl"))[0])


def test_decoupled_lr_runs_resume_exactly(world2, tmp_path):
    """--decoupled-lr gives the embedding and output weights a parameter group of their own
    that megatron-core 0.16.1 could not tell from the default one on resume (every resume
    died): stopped at 2 and resumed, the run repeats the unbroken one (rel 1e-6), with and
    without the distributed optimizer, and in bf16 at PP 2 x VPP 2 (fp32 main weights in their
    own groups, one optimizer per chunk)."""
    for name, extra in (("plain", []), ("distributed", ["--use-distributed-optimizer"]),
                        ("plain-bf16-pp2-vpp2", ["--bf16", "--pipeline-model-parallel-size",
                                                 "2", "--num-layers-per-virtual-pipeline-stage",
                                                 "1"])):  # fmt: skip
        argv = BASE + ["--decoupled-lr", "1e-2", "--decoupled-min-lr", "1e-3", *extra]
        want = world2.run(_train, argv, str(tmp_path / f"{name}-whole.jsonl"))[0]
        ckpt = str(tmp_path / name)
        first = world2.run(_train, argv + ["--save", ckpt, "--exit-interval", "2"],
                           str(tmp_path / f"{name}-a.jsonl"))[0]  # fmt: skip
        second = world2.run(_train, argv + ["--load", ckpt], str(tmp_path / f"{name}-b.jsonl"))[0]
        _close(_losses(first) + _losses(second), _losses(want), 1e-6, name)


def _group_lrs(argv: list[str], metrics: str) -> list[float]:
    """pretrain_tst.main; the optimizer groups' learning rates once it has trained."""
    from trainer_runs import after_training, main_records

    seen = []
    with after_training(lambda t: seen.extend(g["lr"] for g in t.optimizer.param_groups)):
        main_records(argv, metrics)
    return sorted(set(seen))


def test_a_new_learning_rate_on_resume_follows_the_flag_that_says_so(world2, tmp_path):
    """Loading optimizer state replaces its groups' peak / final LR with the checkpoint's: a
    new --lr or --decoupled-lr was ignored even with --override-opt_param-scheduler (its log
    named the new peak). With a constant schedule each group runs at its peak: the flags'
    with --override-opt_param-scheduler, the checkpoint's with
    --use-checkpoint-opt_param-scheduler; without either the difference is refused."""
    constant = ["--lr-decay-style", "constant", "--lr-warmup-iters", "0"]
    ckpt = str(tmp_path / "ckpt")
    saved = BASE + constant + ["--decoupled-lr", "6e-3", "--save", ckpt, "--exit-interval", "3"]
    assert world2.run(_group_lrs, saved, str(tmp_path / "a.jsonl"))[0] == [3e-3, 6e-3]
    new = BASE + constant + ["--lr", "1e-2", "--decoupled-lr", "2e-2", "--load", ckpt]
    message = world2.run(_resume_error, new, str(tmp_path / "b.jsonl"))[0]
    assert "learning rates per parameter group" in message, message
    assert "--override-opt_param-scheduler" in message, message
    flags = world2.run(_group_lrs, new + ["--override-opt_param-scheduler"],
                       str(tmp_path / "c.jsonl"))[0]  # fmt: skip
    assert flags == [1e-2, 2e-2]
    kept = world2.run(_group_lrs, new + ["--use-checkpoint-opt_param-scheduler"],
                      str(tmp_path / "d.jsonl"))[0]  # fmt: skip
    assert kept == [3e-3, 6e-3]


def _train_test_mode(argv: list[str], metrics: str, nudge: bool) -> dict:
    """pretrain_tst.main counting megatron-core's real-time tests; with ``nudge``, data-parallel
    rank 1's first q-norm bias is moved before step 3: the error that stops the run."""
    from megatron.core.transformer.attention import SelfAttention

    from tst.trainer import Trainer

    tests, step = SelfAttention.run_realtime_tests, Trainer.train_step
    seen = {"checks": 0, "error": None}

    def counting(self):
        seen["checks"] += 1
        return tests(self)

    def step_nudged(self, phase):
        if nudge and self.layout.dp_rank == 1 and self.iteration == 2:
            self.raw_chunks[0].decoder.layers[0].self_attention.q_layernorm.bias.data[0] += 1e-3
        return step(self, phase)

    SelfAttention.run_realtime_tests, Trainer.train_step = counting, step_nudged
    try:
        seen["records"] = _train(argv, metrics)["records"]
    except AssertionError as error:
        seen["error"] = str(error)
    finally:
        SelfAttention.run_realtime_tests, Trainer.train_step = tests, step
    return seen


def test_test_mode_checks_the_qk_norms_on_every_rank(world2, tmp_path):
    """--test-mode: megatron-core's real-time test runs in every attention forward (4 layers,
    4 micro-batches a step, evaluations too) and changes no loss; a q-norm bias moved on one
    data-parallel replica stops both ranks at the next forward, naming it."""
    qk = BASE + ["--qk-layernorm", "--normalization", "LayerNorm"]
    want = world2.run(_train, qk, str(tmp_path / "plain.jsonl"))[0]["records"]
    got = world2.run(_train_test_mode, qk + ["--test-mode"], str(tmp_path / "t.jsonl"), False)
    losses = [[r["loss"] for r in records if "loss" in r] for records in (want,)]
    for seen in got:
        assert seen["error"] is None and seen["checks"] >= 6 * 4 * 2
        assert [r["loss"] for r in seen["records"] if "loss" in r] == losses[0]
    stopped = world2.run(_train_test_mode, qk + ["--test-mode"], str(tmp_path / "n.jsonl"), True)
    for seen in stopped:
        assert seen["error"].startswith("Discrepancy between q_b in DP ranks"), seen["error"]


def _train_dumping(argv: list[str], metrics: str) -> dict:
    """_train, then (rank 0) the gradient dumps it wrote: {label: {iteration: contents}}."""
    import os

    import torch

    seen = _train(argv, metrics)
    save = argv[argv.index("--save") + 1]
    dumps = {}
    for label in ("wgrads", "dgrads"):
        folder = os.path.join(save, label)
        dumps[label] = {
            int(name[len("iter_"):]): sorted(os.listdir(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder))
        } if os.path.isdir(folder) else {}  # fmt: skip
        for it, files in dumps[label].items():
            path = os.path.join(folder, f"iter_{it:07d}", files[0])
            dumps[label][it] = (files, torch.load(path, weights_only=True))
    seen["dumps"] = dumps
    return seen


def test_gradient_dumps_hold_the_steps_gradients(world2, tmp_path, tmp_path_factory):
    """--save-wgrads-interval 2 / --save-dgrads-interval 3 (Megatron-LM's layout: one file per
    model shard, SAVE/wgrads/iter_0000002/mp_rank_00.pth, {"model_chunk0": {name: tensor}}).
    The weight gradients are whole on every rank even under the distributed optimizer (its
    reduce-scatter becomes an all-reduce on those steps): they equal plain data parallelism's
    (exactly at the first dump, to 1e-3 later, as the two optimizers' weights part in the last
    bits); the data gradients are each linear layer's input and output gradients of the last
    micro-batch. No loss changes."""
    want = _plain(world2, tmp_path_factory)
    dump = ["--save-wgrads-interval", "2", "--save-dgrads-interval", "3"]
    got = {}
    for name, extra in {"ddp": [], "distopt": ["--use-distributed-optimizer"]}.items():
        argv = BASE + dump + extra + ["--save", str(tmp_path / name)]
        got[name] = world2.run(_train_dumping, argv, str(tmp_path / f"{name}.jsonl"))[0]
        assert got[name]["records"], name
        _close(_losses(got[name]), _losses(want), 0 if name == "ddp" else 1e-5, name)
    ddp, distopt = got["ddp"]["dumps"], got["distopt"]["dumps"]
    assert sorted(ddp["wgrads"]) == [2, 4, 6] and sorted(ddp["dgrads"]) == [3, 6]
    for it in (2, 4, 6):
        files, grads = ddp["wgrads"][it]
        assert files == ["mp_rank_00.pth"] and list(grads) == ["model_chunk0"]
        theirs = distopt["wgrads"][it][1]["model_chunk0"]
        assert sorted(theirs) == sorted(grads["model_chunk0"])
        assert "decoder.layers.3.mlp.linear_fc2.weight" in theirs
        for key, grad in grads["model_chunk0"].items():
            # Step 2 from the same weights: equal; later the two optimizers' weights differ
            # in the last bits (their losses agree to 1e-5 above).
            torch.testing.assert_close(theirs[key], grad, rtol=0 if it == 2 else 1e-3,
                                       atol=0 if it == 2 else 1e-6, msg=f"{it} {key}")  # fmt: skip
            assert grad.abs().sum() > 0, (it, key)
    dgrads = ddp["dgrads"][3][1]["model_chunk0"]
    # [sequence, micro-batch, features] of the layer's output and input.
    assert tuple(dgrads["decoder.layers.0.mlp.linear_fc2/output0"].shape) == (8, 2, 32)
    assert tuple(dgrads["decoder.layers.0.mlp.linear_fc2/input0"].shape)[:2] == (8, 2)
    assert tuple(dgrads["output_layer/output0"].shape) == (8, 2, 512)
    assert all(torch.isfinite(g).all() for g in dgrads.values())


def _gather_in_step(argv: list[str], metrics: str) -> dict:
    """pretrain_tst.main, counting the all-gathers the optimizer step starts (megatron-core's
    ChainedOptimizer dispatches the first chunk's with force_dispatch) and reading how the
    optimizer and the chunks' buckets were built."""
    from megatron.core.distributed import DistributedDataParallel
    from trainer_runs import after_training, main_records

    original, seen = DistributedDataParallel.start_param_sync, {"dispatched": 0}

    def start_param_sync(self, *args, force_dispatch=False, **kwargs):
        seen["dispatched"] += bool(force_dispatch)
        return original(self, *args, force_dispatch=force_dispatch, **kwargs)

    def look(trainer):
        optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
        seen["chunks_per_optimizer"] = [len(o.model_chunks) for o in optimizers]
        seen["buckets"] = [len(chunk.bucket_groups) for chunk in trainer.model]

    DistributedDataParallel.start_param_sync = start_param_sync
    try:
        with after_training(look):
            seen["records"] = main_records(argv, metrics)
    finally:
        DistributedDataParallel.start_param_sync = original
    return seen


def test_param_gather_in_the_optimizer_step_trains_and_resumes(world4, tmp_path):
    """--overlap-param-gather-with-optimizer-step (Megatron-LM's rules: distributed optimizer,
    --overlap-param-gather, an interleaved pipeline) changes when the first chunk's weights are
    gathered, not what is trained: PP 2 x VPP 2 x DP 2 trains the losses of the run without
    it (rel 1e-5), the first chunk stepping in an optimizer of its own that starts its
    all-gather once a step; a checkpoint saved with it (torch_dist, which Megatron-LM refuses
    here: the saves gather every chunk first) resumes exactly (rel 1e-6); a run without the
    flag, whose one optimizer cannot read the state of two, is refused naming the flag."""
    layout = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
              "1", "--use-distributed-optimizer", "--overlap-param-gather"]  # fmt: skip
    flag = ["--overlap-param-gather-with-optimizer-step"]
    want = world4.run(_gather_in_step, BASE + layout, str(tmp_path / "plain.jsonl"))
    got = world4.run(_gather_in_step, BASE + layout + flag, str(tmp_path / "flag.jsonl"))
    assert [w["dispatched"] for w in want] == [0] * 4
    assert [g["dispatched"] for g in got] == [6] * 4  # once per step, every rank
    assert got[0]["chunks_per_optimizer"][:2] == [1, 1] and want[0]["chunks_per_optimizer"][0] == 2
    assert all(b == 1 for g in got for b in g["buckets"])  # no bucketing with the flag
    losses = lambda run: [(r["iteration"], r["loss"]) for r in run["records"] if "loss" in r]  # noqa: E731
    _close(losses(got[0]), losses(want[0]), 1e-5, "in the step")
    ckpt = str(tmp_path / "ckpt")
    first = world4.run(_gather_in_step, BASE + layout + flag + ["--save", ckpt, "--exit-interval",
                                                               "2"], str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    second = world4.run(_gather_in_step, BASE + layout + flag + ["--load", ckpt],
                        str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    _close(losses(first) + losses(second), losses(got[0]), 1e-6, "resumed")
    # Its optimizer state is stored under other keys (two optimizers): a run without the flag
    # is refused by name, or takes the weights alone with --no-load-optim.
    message = world4.run(_resume_error, BASE + layout + ["--load", ckpt],
                         str(tmp_path / "c.jsonl"))[0]  # fmt: skip
    assert "saved with --overlap-param-gather-with-optimizer-step" in message, message
    assert "--no-load-optim" in message
    weights = world4.run(_gather_in_step, BASE + layout + ["--load", ckpt, "--no-load-optim"],
                         str(tmp_path / "d.jsonl"))[0]  # fmt: skip
    assert [i for i, _ in losses(weights)] == [3, 4, 5, 6]
