"""Flags that only act with data parallelism or expert parallelism, at DP 2 / EP 2:
fully parallel checkpoint saving / loading (on by default, off with the flags), and the
shared-expert overlap of MoE layers. They change how the work is done, not its result."""

from __future__ import annotations

import json
import math

import pytest
from flags import SMALL_GPT

import pretrain_tst

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "2",
    "--train-iters", "6", "--tst-bag-size", "3", "--tst-iters", "3", "--lr", "3e-3",
    "--log-interval", "1", "--eval-iters", "0", "--untie-embeddings-and-output-weights",
    *SMALL_GPT,
]  # fmt: skip


def _run(argv: list[str], metrics: str) -> dict:
    """pretrain_tst.main on this rank; the losses and which checkpoint strategies ran."""
    import torch.distributed as dist

    from tst import checkpointing

    seen = {"save": [], "load": []}
    save, load = checkpointing._save_strategy, checkpointing._load_strategy

    def spy_save(fully_parallel):
        strategy = save(fully_parallel)
        seen["save"].append(type(strategy).__name__)
        return strategy

    def spy_load(path, fully_parallel, *exchange):
        strategy = load(path, fully_parallel, *exchange)
        seen["load"].append(type(strategy).__name__)
        seen["exchange"] = getattr(strategy, "exchange_algo", None)
        return strategy

    from tst.trainer import Trainer

    train = Trainer.train

    def spy_train(self):  # what megatron-core was given
        seen["shared_expert_overlap"] = self.config.moe_shared_expert_overlap
        return train(self)

    checkpointing._save_strategy, checkpointing._load_strategy = spy_save, spy_load
    Trainer.train = spy_train
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        checkpointing._save_strategy, checkpointing._load_strategy = save, load
        Trainer.train = train
    dist.barrier()
    with open(metrics) as f:
        seen["loss"] = {r["iteration"]: r["loss"] for r in map(json.loads, f) if r.get("loss")}
    return seen


def test_fully_parallel_checkpoint_flags_at_dp2(world2, tmp_path):
    want = world2.run(_run, BASE, str(tmp_path / "whole.jsonl"))[0]["loss"]
    """The default saves fully parallel and loads plainly; the flags save plainly and load
    fully parallel, by each of megatron-core's exchange algorithms
    (--ckpt-fully-parallel-load-exchange-algo, Megatron-LM 0.19's) that gloo runs: each
    resume repeats the unbroken run (rel 1e-6). gather_rounds (uneven all-gathers, NCCL's)
    is refused on CPU in one line."""
    parallel = ["--ckpt-fully-parallel-load", "--ckpt-fully-parallel-load-exchange-algo"]
    for name, save_flag, load_flag, saved, loaded in (
        ("default", [], [], "FullyParallelSaveStrategyWrapper", "NoneType"),
        ("flags", ["--no-ckpt-fully-parallel-save"], ["--ckpt-fully-parallel-load"],
         "NoneType", "FullyParallelLoadStrategyWrapper"),
        ("gather_object", [], [*parallel, "gather_object"], "FullyParallelSaveStrategyWrapper",
         "FullyParallelLoadStrategyWrapper"),
    ):  # fmt: skip
        ckpt = str(tmp_path / name / "ckpt")
        first = world2.run(_run, BASE + ["--save", ckpt, "--exit-interval", "4", *save_flag],
                           str(tmp_path / name / "a.jsonl"))[0]  # fmt: skip
        second = world2.run(_run, BASE + ["--save", ckpt, "--load", ckpt, *load_flag],
                            str(tmp_path / name / "b.jsonl"))[0]  # fmt: skip
        assert set(first["save"]) == {saved} and set(second["load"]) == {loaded}, name
        assert second["exchange"] == (None if name == "default" else
                                      "broadcast" if name == "flags" else name)  # fmt: skip
    from tst.config import parse_args
    from tst.plan import check_launchable

    rounds = BASE + [*parallel, "gather_rounds", "--load", str(tmp_path / "ckpt")]
    with pytest.raises(ValueError, match="gather_rounds all-gathers tensors of different sizes "
                                         ".*this machine has no GPU"):  # fmt: skip
        check_launchable(parse_args(rounds))
        got = {**first["loss"], **second["loss"]}
        assert sorted(got) == sorted(want)
        for it, loss in want.items():
            assert abs(got[it] - loss) <= 1e-6 * abs(loss), (name, it, got[it], loss)


def test_shared_expert_overlap_changes_nothing_at_ep2(world2, tmp_path):
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
           "--moe-shared-expert-intermediate-size", "24", "--expert-model-parallel-size", "2",
           "--moe-token-dispatcher-type", "alltoall"]  # fmt: skip
    plain = world2.run(_run, BASE + moe, str(tmp_path / "plain.jsonl"))[0]
    overlap = world2.run(_run, BASE + moe + ["--moe-shared-expert-overlap"],
                         str(tmp_path / "overlap.jsonl"))[0]  # fmt: skip
    assert (plain["shared_expert_overlap"], overlap["shared_expert_overlap"]) == (False, True)
    plain, overlap = plain["loss"], overlap["loss"]
    assert sorted(plain) == sorted(overlap) == list(range(1, 7))
    for it, loss in plain.items():
        assert abs(overlap[it] - loss) <= 1e-5 * abs(loss), (it, overlap[it], loss)


def test_moe_with_megatron_default_biases_trains(world2, tmp_path):
    """Megatron-LM's defaults (linear biases, LayerNorm, learned positions) on a MoE: at
    TP 1 / EP 1 megatron-core 0.16.1's experts died at the first step (an in-place bias add
    on a custom-Function view; tst/megatron_fixes.py). Now it trains at DP 2: the first loss
    is the uniform guess's ln(512) within 0.1 nats, and the loss falls: the last three
    steps' mean is 0.05 nats below the first step's (single steps of 32 tokens are noisy)."""
    argv = ["--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "12", "--tst-bag-size", "1",
            "--lr", "3e-3", "--log-interval", "1", "--eval-iters", "0",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--num-experts", "4",
            "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16"]  # fmt: skip
    loss = world2.run(_run, argv, str(tmp_path / "tp1.jsonl"))[0]["loss"]
    assert sorted(loss) == list(range(1, 13))
    assert abs(loss[1] - math.log(512)) < 0.1
    assert sum(loss[i] for i in (10, 11, 12)) / 3 < loss[1] - 0.05, loss


def _run_overlap(argv: list[str], metrics: str, fp32: bool) -> dict:
    """Losses and gradient norms of a run, with how often megatron-core's combined 1F1B
    schedule asked for a schedule plan. ``fp32``: the model in fp32 although megatron-core
    accepts the overlap only in bf16 / fp16 (checked and built as bf16, then set back), to
    compare the two schedules without bf16 rounding."""
    import torch
    import torch.distributed as dist

    from tst import plan as plan_module
    from tst import trainer as trainer_module

    build, forward_step = trainer_module.transformer_config, trainer_module.Trainer._forward_step
    check = plan_module._check_expert_comm_overlap
    plans, early = [], []

    def as_bf16(fn, cfg, *args, **kwargs):
        if not fp32:
            return fn(cfg, *args, **kwargs)
        cfg.training.bf16 = True
        try:
            return fn(cfg, *args, **kwargs)
        finally:
            cfg.training.bf16 = False

    def transformer_config(cfg, *args, **kwargs):
        config = as_bf16(build, cfg, *args, **kwargs)
        early.append(config.ep_overlap_early_attn_memory_release)
        if fp32:
            config.bf16, config.params_dtype = False, torch.float32
            config.pipeline_dtype = torch.float32
        return config

    def spy(self, phase, data_iterator, model, return_schedule_plan=False):
        plans.append(return_schedule_plan)
        return forward_step(self, phase, data_iterator, model, return_schedule_plan)

    trainer_module.transformer_config = transformer_config
    trainer_module.Trainer._forward_step = spy
    plan_module._check_expert_comm_overlap = lambda cfg, *a: as_bf16(check, cfg, *a)
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        trainer_module.transformer_config = build
        trainer_module.Trainer._forward_step = forward_step
        plan_module._check_expert_comm_overlap = check
    dist.barrier()
    with open(metrics) as f:
        records = [r for r in map(json.loads, f) if r.get("loss")]
    return {
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "mtp": [r.get("mtp_1_loss") for r in records],
        "plans": sum(plans),
        "early_release": set(early),
    }


def test_expert_parallel_comm_overlap_trains_the_same_model(world2, tmp_path):
    """--overlap-moe-expert-parallel-comm at EP 2: megatron-core's combined 1F1B schedule
    (one micro-batch's expert all-to-all overlapped with another's compute) runs the TST
    model as per-layer pieces, the bag embedding first and the phase's loss last. In fp32 it
    trains bit-for-bit what the plain schedule trains, through the switch; in bf16 (the
    precision megatron-core runs it in) within bf16 rounding of the summation order (rel
    1e-4). Every training micro-batch went through a schedule plan. With
    --ep-overlap-early-attn-memory-release (the attention's backward moved before the other
    micro-batch's expert compute) the same, bit for bit in fp32."""
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
           "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
           "--global-batch-size", "8"]  # fmt: skip
    overlap = ["--overlap-moe-expert-parallel-comm"]
    for precision, extra, rel in (("fp32", [], 1e-6), ("bf16", ["--bf16"], 1e-4)):
        fp32 = precision == "fp32"
        plain = world2.run(_run_overlap, BASE + moe + extra,
                           str(tmp_path / f"{precision}.jsonl"), fp32)[0]  # fmt: skip
        got = world2.run(_run_overlap, BASE + moe + extra + overlap,
                         str(tmp_path / f"{precision}-overlap.jsonl"), fp32)[0]  # fmt: skip
        assert plain["plans"] == 0 and got["plans"] == 6 * 2  # 6 steps x 2 micro-batches
        for key in ("loss", "grad_norm"):
            assert len(got[key]) == len(plain[key]) == 6, (precision, key)
            for step, (g, w) in enumerate(zip(got[key], plain[key], strict=True), 1):
                assert abs(g - w) <= rel * abs(w), (precision, key, step, g, w)
        assert got["early_release"] == {False}
        if fp32:
            early = world2.run(_run_overlap, BASE + moe + overlap +
                               ["--ep-overlap-early-attn-memory-release"],
                               str(tmp_path / "early.jsonl"), fp32)[0]  # fmt: skip
            assert early["early_release"] == {True} and early["plans"] == 12
            assert early["loss"] == got["loss"] and early["grad_norm"] == got["grad_norm"]


# A small MoE with one MTP depth through the switch, in fp32 (argv of _run_overlap); the
# pipeline flags are each test's.
MTP_OVERLAP = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "1",
    "--train-iters", "4", "--tst-bag-size", "2", "--tst-iters", "2", "--lr", "3e-3",
    "--log-interval", "1", "--eval-iters", "0", "--untie-embeddings-and-output-weights",
    *SMALL_GPT, "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
    "--expert-model-parallel-size", "2", "--mtp-num-layers", "1",
]  # fmt: skip


def _overlap_trains_what_plain_trains(world, argv: list[str], tmp_path) -> None:
    """``argv`` with and without --overlap-moe-expert-parallel-comm: the same losses, MTP
    losses and gradient norms, bit for bit (fp32), the overlap through schedule plans."""
    plain = world.run(_run_overlap, argv, str(tmp_path / "plain.jsonl"), True)[0]
    got = world.run(_run_overlap, argv + ["--overlap-moe-expert-parallel-comm"],
                    str(tmp_path / "overlap.jsonl"), True)[0]  # fmt: skip
    assert plain["plans"] == 0 and got["plans"] > 0
    assert len(plain["loss"]) == 4 and all(m is not None for m in plain["mtp"]), plain
    for key in ("loss", "mtp", "grad_norm"):
        assert got[key] == plain[key], (key, got[key], plain[key])


def test_expert_parallel_comm_overlap_with_mtp_under_virtual_pipeline_stages(world4, tmp_path):
    """--overlap-moe-expert-parallel-comm with an MTP depth, PP 2 x 2 virtual stages, EP 2:
    megatron-core's combined 1F1B schedule runs the MTP depth as schedule nodes of its own and
    hands the model's post-process its output stacked after the main hidden states. Scored as
    in the plain schedule (the bag ``k + 1`` ahead in the superposition phase), the run
    trains bit for bit what the plain schedule trains in fp32: the loss, the MTP depth's loss
    (its statistics taken after each micro-batch's forward, which that schedule runs later)
    and the gradient norm, through the switch. (Before, the post-process scored the stacked
    hidden states as one sequence: the last stage refused the shapes and the first waited.)"""
    pipeline = ["--global-batch-size", "8", "--pipeline-model-parallel-size", "2",
                "--num-virtual-stages-per-pipeline-rank", "2"]  # fmt: skip
    _overlap_trains_what_plain_trains(world4, MTP_OVERLAP + pipeline, tmp_path)


def test_expert_parallel_comm_overlap_with_a_standalone_mtp_stage(world6, tmp_path):
    """The same with the MTP block on a rank of its own before the loss's (megatron-core's
    standalone MTP, DeepSeek-V3's layout in Megatron-LM's documentation, here at PP 3 x 2
    virtual stages, EP 2): the combined 1F1B schedule runs the depth as schedule nodes on
    rank 1's last virtual stage, which sends the stacked states on, and the last rank's
    post-process scores them; bit for bit the plain schedule's run in fp32."""
    pipeline = ["--global-batch-size", "6", "--pipeline-model-parallel-size", "3",
                "--pipeline-model-parallel-layout", "Et|t|t|t|m|L"]  # fmt: skip
    _overlap_trains_what_plain_trains(world6, MTP_OVERLAP + pipeline, tmp_path)


def test_moe_checkpoints_resume_under_another_expert_layout(world2, tmp_path):
    """A MoE checkpoint saved at TP 1 / EP 1 resumes exactly at TP 2 + SP with expert-TP 1
    and at EP 2 (the optimizer is split into dense and expert parts at every layout, so its
    state has the same keys everywhere; megatron-core's single optimizer at EP 1 could not be
    read at EP 2). Distributed-optimizer state reshards over DP only: another expert layout
    is refused in one line naming --no-load-optim, which then resumes the weights."""
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
           "--moe-aux-loss-coeff", "0.1", "--global-batch-size", "8"]  # fmt: skip
    argv = BASE + moe
    want = world2.run(_run, argv, str(tmp_path / "full.jsonl"))[0]["loss"]
    ckpt = str(tmp_path / "ckpt")
    world2.run(_run, argv + ["--save", ckpt, "--exit-interval", "4"], str(tmp_path / "a.jsonl"))
    for name, layout in (
        ("TP 2 + SP, expert-TP 1", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                    "--expert-tensor-parallel-size", "1"]),
        ("EP 2", ["--expert-model-parallel-size", "2"]),
    ):  # fmt: skip
        got = world2.run(_run, argv + layout + ["--load", ckpt], str(tmp_path / f"{name}.jsonl"))
        got = got[0]["loss"]
        assert sorted(got) == [5, 6], name
        for it, loss in got.items():
            assert abs(loss - want[it]) <= 1e-6 * abs(want[it]), (name, it, loss, want[it])

    dist_opt = argv + ["--use-distributed-optimizer"]
    saved = str(tmp_path / "dist")
    world2.run(_run, dist_opt + ["--expert-model-parallel-size", "2", "--save", saved,
                                 "--exit-interval", "4"], str(tmp_path / "d.jsonl"))  # fmt: skip
    refused = world2.run(_refused, dist_opt + ["--load", saved])
    assert refused[0] == (
        f"checkpoint {saved}/iter_0000004 holds distributed-optimizer state saved at TP 1, "
        "PP 1, VPP 1, EP 2, ETP 1; this run is at TP 1, PP 1, VPP 1, EP 1, ETP 1. That state "
        "reshards over data parallelism only (megatron-core's dp_reshardable format): resume "
        "at the saving run's layout, or pass --no-load-optim to load the weights and start "
        "the optimizer state fresh (checkpoints saved with --dist-ckpt-optim-fully-reshardable "
        "reshard anywhere)"
    )
    assert world2.run(_refused, argv + ["--load", saved])[0] == (
        f"checkpoint {saved}/iter_0000004 holds optimizer state saved with "
        "--use-distributed-optimizer, in another format than this run's: give the same "
        "--use-distributed-optimizer setting, or pass --no-load-optim to load the weights and "
        "start the optimizer state fresh"
    )
    weights = world2.run(_run, dist_opt + ["--load", saved, "--no-load-optim"],
                         str(tmp_path / "w.jsonl"))[0]["loss"]  # fmt: skip
    assert sorted(weights) == [5, 6]


def _refused(argv: list[str]) -> str:
    """The one-line error pretrain_tst.main raised."""
    import pytest

    from tst.checkpointing import CheckpointError

    with pytest.raises(CheckpointError) as error:
        pretrain_tst.main(argv)
    return str(error.value)


def _resumed(world2, argv: list[str], folder) -> dict:
    """Losses of ``argv`` stopped at iteration 4 and resumed from its checkpoint."""
    ckpt = str(folder / "ckpt")
    first = world2.run(_run, argv + ["--save", ckpt, "--exit-interval", "4"],
                       str(folder / "a.jsonl"))[0]  # fmt: skip
    second = world2.run(_run, argv + ["--load", ckpt], str(folder / "b.jsonl"))[0]
    return {**first["loss"], **second["loss"]}


def _assert_same(got: dict, want: dict, label: str) -> None:
    assert sorted(got) == sorted(want) == list(range(1, 7)), label
    for it, loss in want.items():
        assert abs(got[it] - loss) <= 1e-6 * abs(loss), (label, it, got[it], loss)


def test_random_draws_resume_exactly_and_per_replica_streams(world2, tmp_path):
    """Every step reseeds from (seed, iteration) when the model draws random numbers: the
    MoE router's input jitter (no dropout) resumes exactly too. --data-parallel-random-init
    gives each data-parallel rank its own dropout stream: other losses than one shared
    stream, the weights the same on both replicas at every step (the hash check), and an
    exact resume."""
    jitter = BASE + ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size",
                     "16", "--moe-input-jitter-eps", "0.1"]  # fmt: skip
    want = world2.run(_run, jitter, str(tmp_path / "jitter.jsonl"))[0]["loss"]
    _assert_same(_resumed(world2, jitter, tmp_path / "jitter"), want, "jitter")

    dropout = list(BASE)
    dropout[dropout.index("--hidden-dropout") + 1] = "0.2"
    shared = world2.run(_run, dropout, str(tmp_path / "shared.jsonl"))[0]["loss"]
    own = dropout + ["--data-parallel-random-init"]
    want = world2.run(_run, own + ["--check-weight-hash-across-dp-replicas-interval", "1"],
                      str(tmp_path / "own.jsonl"))[0]["loss"]  # fmt: skip
    assert sorted(want) == sorted(shared) and all(
        abs(want[it] - shared[it]) > 1e-6 * abs(shared[it]) for it in shared
    ), (want, shared)
    _assert_same(_resumed(world2, own, tmp_path / "own"), want, "--data-parallel-random-init")


# The flags of a run, none of the model's (Megatron-LM's --use-checkpoint-args brings those).
BARE = [
    "--mock-data", "--vocab-size", "512", "--micro-batch-size", "2", "--train-iters", "6",
    "--tst-bag-size", "3", "--tst-iters", "3", "--lr", "3e-3", "--log-interval", "1",
    "--eval-iters", "0", "--adam-beta2", "0.95", "--weight-decay", "0.1",
    "--lr-decay-style", "cosine",
]  # fmt: skip


def test_use_checkpoint_args_takes_the_model_flags_from_the_checkpoint(world2, tmp_path, capsys):
    """--use-checkpoint-args (Megatron-LM's list and rules): a run given no model flag resumes
    a TP-2 checkpoint of another shape exactly (with --use-mp-args-from-checkpoint-args, its
    TP too); a size the command line gives wins, a layer kind is the checkpoint's; the
    tokenizer is the checkpoint's unless --no-use-tokenizer-model-from-checkpoint-args; a
    --load with no checkpoint yet keeps the command line's flags."""
    from tst.config import parse_args

    trained = BASE + ["--num-layers", "3", "--hidden-size", "48", "--group-query-attention",
                      "--num-query-groups", "2", "--tensor-model-parallel-size", "2"]  # fmt: skip
    want = world2.run(_run, trained, str(tmp_path / "whole.jsonl"))[0]["loss"]
    ckpt = str(tmp_path / "ckpt")
    world2.run(_run, trained + ["--save", ckpt, "--exit-interval", "4"], str(tmp_path / "a.jsonl"))
    use = ["--use-checkpoint-args", "--load", ckpt]
    second = world2.run(_run, BARE + use + ["--use-mp-args-from-checkpoint-args"],
                        str(tmp_path / "b.jsonl"))[0]["loss"]  # fmt: skip
    assert sorted(second) == [5, 6]
    for it, loss in second.items():
        assert abs(loss - want[it]) <= 1e-6 * abs(want[it]), (it, loss, want[it])

    m = parse_args(BARE + use).model
    assert (m.num_layers, m.hidden_size, m.seq_length, m.num_query_groups) == (3, 48, 8, 2)
    assert (m.swiglu, m.normalization, m.add_bias_linear, m.position_embedding_type) == (
        True, "RMSNorm", False, "rope")  # fmt: skip
    assert m.untie_embeddings_and_output_weights and m.group_query_attention
    assert "model flags from" in capsys.readouterr().out
    assert parse_args(BARE + use).parallel.tensor_model_parallel_size == 1
    assert parse_args(BARE + use + ["--use-mp-args-from-checkpoint-args"]).parallel \
        .tensor_model_parallel_size == 2  # fmt: skip
    given = parse_args(BARE + use + ["--hidden-size", "64", "--normalization", "LayerNorm"])
    assert (given.model.hidden_size, given.model.normalization) == (64, "RMSNorm")
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "tok.json"]
    saved = parse_args(trained).data  # NullTokenizer, no model file (None: not taken)
    took = parse_args(BARE + use + hf).data
    assert saved.tokenizer_type != "HuggingFaceTokenizer" and saved.tokenizer_model is None
    assert (took.tokenizer_type, took.tokenizer_model) == (saved.tokenizer_type, "tok.json")
    kept = parse_args(BARE + use + hf + ["--no-use-tokenizer-model-from-checkpoint-args"]).data
    assert (kept.tokenizer_type, kept.tokenizer_model) == ("HuggingFaceTokenizer", "tok.json")
    capsys.readouterr()
    shape = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--seq-length", "8"]  # fmt: skip
    empty = parse_args(BARE + shape + ["--use-checkpoint-args", "--load", str(tmp_path / "no")])
    assert empty.model == parse_args(BARE + shape).model
    assert "no checkpoint in --load" in capsys.readouterr().out


def _run_with_a_slow_rank(argv: list[str], metrics: str, stall_s: float) -> tuple:
    """_run with rank 1 stalled ``stall_s`` seconds before its third step; the default
    group's timeout before and after the run (the world outlives it)."""
    import time

    import torch.distributed as dist

    from tst.platform import _timeout_of
    from tst.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, phase):
        if dist.get_rank() == 1 and self.iteration == 2:
            time.sleep(stall_s)
        return original(self, phase)

    before = _timeout_of(dist.group.WORLD)
    Trainer.train_step = train_step
    try:
        losses = _run(argv, metrics)["loss"]
    finally:
        Trainer.train_step = original
    return losses, before, _timeout_of(dist.group.WORLD)


def test_distributed_timeout_after_init_ends_a_stalled_run(world2, tmp_path):
    """--distributed-timeout-seconds-after-init 2: after the first step every group's
    collectives wait 2 s, so a rank stalled 8 s ends the run with gloo's timeout (without the
    flag the same stall only delays it); the group gets its own timeout back after a run."""
    import distributed

    flag = ["--distributed-timeout-seconds-after-init", "2"]
    losses, before, after = world2.run(_run_with_a_slow_rank, BASE, str(tmp_path / "a"), 8.0)[0]
    assert sorted(losses) == list(range(1, 7)) and after == before
    losses, before, after = world2.run(_run_with_a_slow_rank, BASE + flag, str(tmp_path / "b"),
                                       0.0)[0]  # fmt: skip
    assert sorted(losses) == list(range(1, 7)) and after == before
    # One line naming the cause and the timeouts (was gloo's bare RuntimeError).
    with pytest.raises(distributed.RankFailure, match=r"RunError: rank \d: a collective operation "
                       r"did not complete \(.*Timed out waiting 2000ms.*\)\. Another rank stalled "
                       r"or died .*--distributed-timeout-seconds-after-init 2 after the first step"):  # fmt: skip
        world2.run(_run_with_a_slow_rank, BASE + flag, str(tmp_path / "c"), 8.0)


def _evaluated(argv: list[str], metrics: str) -> list[float]:
    """pretrain_tst.main on this rank; the validation losses it wrote."""
    from trainer_runs import main_records

    return [r["val_loss"] for r in main_records(argv, metrics) if "val_loss" in r]


def test_moe_upcycling_grows_a_dense_checkpoint_into_the_same_function(world2, tmp_path):
    """--moe-use-upcycling: a dense checkpoint becomes an MoE model whose every expert is its
    layer's dense MLP; with softmax top-2 weights summing to 1 the model computes the dense
    function, so its held-out loss equals the dense model's (rel 1e-5), at EP 1 and at EP 2
    (each rank's experts sliced by its EP rank). The upcycled checkpoint is saved at once and
    trains on without the flag at another expert layout; a relaunch with the flag is
    refused by name, as is an MoE checkpoint as the source. Granularity 2 (experts half the
    dense width, scaled by megatron-core's rule) trains."""
    dense = str(tmp_path / "dense")
    world2.run(_run, BASE + ["--ffn-hidden-size", "32", "--global-batch-size", "8",
                             "--save", dense], str(tmp_path / "d.jsonl"))  # fmt: skip
    evaluate = BASE + ["--skip-train", "--eval-iters", "2", "--global-batch-size", "8"]
    want = world2.run(_evaluated, evaluate + ["--ffn-hidden-size", "32", "--load", dense],
                      str(tmp_path / "dv.jsonl"))[0]  # fmt: skip
    assert len(want) == 1 and math.isfinite(want[0])
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
    for name, extra in {"ep1": [], "ep2": ["--expert-model-parallel-size", "2"]}.items():
        got = world2.run(_evaluated, evaluate + moe + extra + [
            "--moe-use-upcycling", "--load", dense, "--save", str(tmp_path / name)],
            str(tmp_path / f"{name}.jsonl"))[0]  # fmt: skip
        assert got == pytest.approx(want, rel=1e-5), name
    on = world2.run(_run, BASE + moe + ["--expert-model-parallel-size", "2", "--load",
                                        str(tmp_path / "ep1"), "--global-batch-size", "8"],
                    str(tmp_path / "on.jsonl"))[0]  # fmt: skip
    assert sorted(on["loss"]) == [1, 2, 3, 4, 5, 6]
    again = moe + ["--moe-use-upcycling", "--load", dense, "--save", str(tmp_path / "ep1")]
    assert "already holds a checkpoint. Upcycling is for the first launch only" in world2.run(
        _refused, BASE + again)[0]  # fmt: skip
    from_moe = moe + ["--moe-use-upcycling", "--load", str(tmp_path / "ep1"), "--save",
                      str(tmp_path / "x")]  # fmt: skip
    assert "is an MoE checkpoint (4 experts per layer)" in world2.run(_refused, BASE + from_moe)[0]
    granular = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
                "--moe-upcycling-granularity", "2", "--moe-use-upcycling", "--load", dense,
                "--save", str(tmp_path / "g2"), "--global-batch-size", "8"]  # fmt: skip
    trained = world2.run(_run, BASE + granular, str(tmp_path / "g2.jsonl"))[0]["loss"]
    assert sorted(trained) == [1, 2, 3, 4, 5, 6] and all(map(math.isfinite, trained.values()))


def _load_error(argv: list[str], metrics: str) -> str:
    from tst.checkpointing import CheckpointError

    with pytest.raises(CheckpointError) as error:
        pretrain_tst.main(argv + ["--metrics-file", metrics])
    return str(error.value)


def test_dist_ckpt_strictness_agrees_across_pipeline_stages(world2, tmp_path):
    """A tied checkpoint loaded untied at PP 2: only the last stage has the output layer the
    checkpoint lacks, yet both ranks refuse it by default (rank 0 would otherwise wait in the
    load's collectives), and with log_unexpected both load and train what DP 2 trains (the
    output layer's initial value is the same at every layout)."""
    tied = [arg for arg in BASE if arg != "--untie-embeddings-and-output-weights"]
    tied += ["--global-batch-size", "4"]
    ckpt = str(tmp_path / "tied")
    world2.run(_run, tied + ["--save", ckpt, "--exit-interval", "3"], str(tmp_path / "a.jsonl"))
    untied = tied + ["--untie-embeddings-and-output-weights", "--load", ckpt, "--finetune"]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    messages = world2.run(_load_error, untied + pp2, str(tmp_path / "b.jsonl"))
    assert all("lacks 1 tensor of this model (output_layer.weight)" in m for m in messages)
    lenient = untied + ["--dist-ckpt-strictness", "log_unexpected"]
    dp2 = world2.run(_run, lenient, str(tmp_path / "dp.jsonl"))[0]["loss"]
    pp = world2.run(_run, lenient + pp2, str(tmp_path / "pp.jsonl"))[0]["loss"]
    assert sorted(dp2) == sorted(pp) == list(range(1, 7))
    for it, loss in dp2.items():
        assert abs(pp[it] - loss) <= 1e-5 * abs(loss), (it, pp[it], loss)


def test_fully_parallel_load_of_a_moe_at_dp4_ep2(world4, tmp_path):
    """--ckpt-fully-parallel-load with experts replicated over 2 of the 4 data-parallel
    ranks: a rank receives shards it did not read, which megatron-core allocates on "cuda"
    (tst/cpu_compat.py places them on the CPU here; every such resume failed). Resumed after
    the switch, the run repeats the unbroken one (rel 1e-6)."""
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
           "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
           "--use-distributed-optimizer", "--global-batch-size", "8"]  # fmt: skip
    want = world4.run(_run, BASE + moe, str(tmp_path / "whole.jsonl"))[0]["loss"]
    ckpt = str(tmp_path / "ckpt")
    first = world4.run(_run, BASE + moe + ["--save", ckpt, "--exit-interval", "4"],
                       str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    second = world4.run(_run, BASE + moe + ["--load", ckpt, "--ckpt-fully-parallel-load"],
                        str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    assert set(second["load"]) == {"FullyParallelLoadStrategyWrapper"}
    got = {**first["loss"], **second["loss"]}
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for it, loss in want.items():
        assert abs(got[it] - loss) <= 1e-6 * abs(loss), (it, got[it], loss)
