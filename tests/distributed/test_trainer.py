"""pretrain_tst.py end to end on tiny models: layouts agree, resume is exact, errors are clear.

Runs use mock data and layout-independent initial weights, with a phase switch inside the
run. Tolerances: the same run under another layout agrees to rel 2e-4 per logged loss over a
few Adam steps (fp32, reductions in a different order); a resume under the same layout is
exact to rel 1e-6.
"""

from __future__ import annotations

import json
import os

import pytest
from flags import SMALL_GPT

import pretrain_tst
from tst.checkpointing import TRACKER, CheckpointError, latest_iteration
from tst.config import parse_args
from tst.plan import validate

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--swiglu",
    "--seq-length", "8", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--train-iters", "6", "--tst-bag-size", "3", "--tst-iters", "3", "--lr", "3e-3",
    "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
    "--eval-iters", "1", "--untie-embeddings-and-output-weights", *SMALL_GPT,
]  # fmt: skip


def _train(argv: list[str], metrics: str) -> list[dict]:
    import torch.distributed as dist

    rc = pretrain_tst.main(argv + ["--metrics-file", metrics])
    assert rc == 0
    dist.barrier()
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def _losses(records):
    return [(r["iteration"], r["phase"], r["loss"]) for r in records if "loss" in r]


def _val(records):
    return [(r["iteration"], r["val_loss"]) for r in records if "val_loss" in r]


def _assert_close(got, want, rel, label):
    assert [g[:-1] for g in got] == [w[:-1] for w in want], label
    for g, w in zip(got, want, strict=True):
        assert g[-1] == pytest.approx(w[-1], rel=rel), f"{label}: {g} vs {w}"


# PP2 and DP4 with the distributed optimizer are in GROUPINGS below (the same runs, their
# groups checked too).
LAYOUTS = {
    "TP2": ["--tensor-model-parallel-size", "2"],
    "TP2-SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "TP2xPP2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    # Interleaved: p2p overlapped with compute (Megatron-LM's default there), and in the
    # warm-up and flush too.
    "PP2-interleaved": [
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
    ],
    "PP2-interleaved-warmup-flush": [
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
        "--overlap-p2p-communication-warmup-flush",
    ],
}  # fmt: skip


def _train_seeing_groups(argv: list[str], metrics: str) -> tuple[list[dict], dict]:
    """_train, and rank 0's pipeline and data-parallel groups and the ranks its optimizer
    state is sharded over (with the distributed optimizer)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tst.trainer import Trainer

    original, seen = Trainer.train, {}

    def train(self):
        seen.update(
            pp=dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
            dp=dist.get_process_group_ranks(ps.get_data_parallel_group()),
            shards=dist.get_process_group_ranks(self.model[0].intra_dp_cp_group),
        )
        return original(self)

    Trainer.train = train
    try:
        return _train(argv, metrics), seen
    finally:
        Trainer.train = original


# Rank numbering (megatron-core's default tp-cp-ep-dp-pp, or tp-cp-ep-pp-dp) and the
# distributed optimizer's copies: the same model trained, the groups as asked.
GROUPINGS = {  # flags: rank 0's (pipeline, data-parallel, optimizer-shard) group
    "PP2": (["--pipeline-model-parallel-size", "2"], ([0, 2], [0, 1], [0, 1])),
    "PP2-tp-pp-dp-mapping": (
        ["--pipeline-model-parallel-size", "2", "--use-tp-pp-dp-mapping"],
        ([0, 1], [0, 2], [0, 2]),
    ),
    "DP4-distopt": (["--use-distributed-optimizer"], ([0], [0, 1, 2, 3], [0, 1, 2, 3])),
    "DP4-distopt-2-instances": (
        ["--use-distributed-optimizer", "--num-distributed-optimizer-instances", "2",
         "--overlap-grad-reduce", "--overlap-param-gather"], ([0], [0, 1, 2, 3], [0, 1]),
    ),
}  # fmt: skip


def test_layouts_agree_across_the_switch(world4, tmp_path):
    want = world4.run(_train, BASE, str(tmp_path / "ref.jsonl"))[0]
    assert [r["phase"] for r in want if "loss" in r] == ["superposition"] * 3 + ["recovery"] * 3
    assert [r["loss_name"] for r in want if "loss" in r] == ["mce"] * 3 + ["lm"] * 3
    for name, extra in LAYOUTS.items():
        got = world4.run(_train, BASE + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _assert_close(_losses(got), _losses(want), 2e-4, name)
        _assert_close(_val(got), _val(want), 2e-4, name)
    runs, ckpt = {}, str(tmp_path / "ckpt")
    two = GROUPINGS["DP4-distopt-2-instances"][0]
    for name, (extra, groups) in GROUPINGS.items():
        if extra is two:  # its state saved at step 3, inside the run
            extra = extra + ["--save", ckpt, "--save-interval", "3"]
        got, seen = world4.run(_train_seeing_groups, BASE + extra, str(tmp_path / f"{name}.g"))[0]
        assert (seen["pp"], seen["dp"], seen["shards"]) == groups, name
        _assert_close(_losses(got), _losses(want), 2e-4, name)
        _assert_close(_val(got), _val(want), 2e-4, name)
        runs[name] = got
    # Two copies' state resumes exactly, with two copies or with one (its shards, regrouped),
    # from step 3 (the tracker names the newest checkpoint, the run's end; point it back).
    full = _losses(runs["DP4-distopt-2-instances"])
    assert latest_iteration(ckpt) == 6 and os.path.isdir(os.path.join(ckpt, "iter_0000003"))
    with open(os.path.join(ckpt, TRACKER), "w") as f:
        f.write("3")
    for name, flags in (("2", two), ("1", ["--use-distributed-optimizer"])):
        got = world4.run(_train, BASE + flags + ["--load", ckpt], str(tmp_path / f"b{name}"))[0]
        _assert_close(_losses(got), full[3:], 1e-6, f"resumed with {name} copies")


TIED = [a for a in BASE if a != "--untie-embeddings-and-output-weights"]


def _train_tied_copies_equal(argv: list[str], metrics: str) -> list[dict]:
    """_train, then check that every last stage's tied output copy equals its embedding."""
    import torch
    import torch.distributed as dist
    from trainer_runs import after_training

    seen = {}

    def look(trainer):
        mine = {}
        for chunk in trainer.raw_chunks:
            if chunk.pre_process:
                mine["embedding"] = chunk.embedding.word_embeddings.weight.detach().clone()
            if chunk.post_process and not chunk.pre_process:
                mine["output"] = chunk.output_layer.weight.detach().clone()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (trainer.layout.tp_rank, mine))
        seen["pairs"] = gathered

    with after_training(look):
        records = _train(argv, metrics)
    by_tp: dict[int, dict] = {}
    for tp_rank, tensors in seen["pairs"]:
        by_tp.setdefault(tp_rank, {}).update(tensors)
    for tensors in by_tp.values():
        if "output" in tensors:  # PP > 1: the last stage holds a copy of the embedding
            torch.testing.assert_close(tensors["output"], tensors["embedding"], rtol=0, atol=0)
    return records


TIED_LAYOUTS = {
    "PP2": ["--pipeline-model-parallel-size", "2"],
    "PP2-interleaved": [
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
    ],
    "TP2xPP2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "PP2-distopt": ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"],
}  # fmt: skip


def test_interleaved_pp4_with_batched_p2p_agrees(world4, tmp_path):
    """--no-overlap-p2p-communication: an interleaved schedule with its p2p batched, not
    overlapped (Megatron-LM allows it at PP > 2 only). An 8-layer model at PP 4 x VPP 2, both
    ways, trains what data parallelism trains (rel 2e-4, both phases)."""
    i = BASE.index("--num-layers")
    eight = BASE[:i] + ["--num-layers", "8"] + BASE[i + 2 :]
    want = world4.run(_train, eight, str(tmp_path / "ref.jsonl"))[0]
    interleaved = ["--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage",
                   "1"]  # fmt: skip
    for name, extra in {"overlapped": [], "batched": ["--no-overlap-p2p-communication"]}.items():
        got = world4.run(_train, eight + interleaved + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _assert_close(_losses(got), _losses(want), 2e-4, f"PP4 x VPP2, p2p {name}")
        _assert_close(_val(got), _val(want), 2e-4, f"PP4 x VPP2, p2p {name}")


def test_tied_embeddings_agree_across_layouts(world4, tmp_path):
    """The default (tied) model is the same model under PP: the loss at step 1 already showed
    it when the last stage's output copy was drawn on its own. After 6 steps across the switch
    the copy equals the first stage's embedding exactly."""
    want = world4.run(_train_tied_copies_equal, TIED, str(tmp_path / "ref.jsonl"))[0]
    untied = world4.run(_train, BASE, str(tmp_path / "untied.jsonl"))[0]
    # The tied and untied models differ from step 1: the check below compares models.
    assert abs(_losses(untied)[0][-1] - _losses(want)[0][-1]) > 1e-3
    for name, extra in TIED_LAYOUTS.items():
        got = world4.run(_train_tied_copies_equal, TIED + extra, str(tmp_path / f"{name}.jsonl"))
        _assert_close(_losses(got[0]), _losses(want), 2e-4, f"tied {name}")
        _assert_close(_val(got[0]), _val(want), 2e-4, f"tied {name}")


def test_tied_resume_at_another_layout(world4, tmp_path):
    """A tied checkpoint saved at TP1 / PP1 continues the run at TP2 and at PP2."""
    want = world4.run(_train, TIED, str(tmp_path / "full.jsonl"))[0]
    ckpt = str(tmp_path / "ckpt")
    world4.run(_train, TIED + ["--save", ckpt, "--exit-interval", "4"], str(tmp_path / "a.jsonl"))
    for name, extra in {
        "TP2": ["--tensor-model-parallel-size", "2"],
        "PP2": ["--pipeline-model-parallel-size", "2"],
    }.items():
        got = world4.run(_train_tied_copies_equal, TIED + ["--load", ckpt] + extra,
                         str(tmp_path / f"{name}.jsonl"))[0]  # fmt: skip
        _assert_close(_losses(got), _losses(want)[4:], 2e-4, f"tied resume at {name}")


def test_moe_expert_parallel_agrees(world2, tmp_path):
    moe = BASE + ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
    want = world2.run(_train, moe, str(tmp_path / "ep1.jsonl"))[0]
    got = world2.run(_train, moe + ["--expert-model-parallel-size", "2"],
                     str(tmp_path / "ep2.jsonl"))[0]  # fmt: skip
    _assert_close(_losses(got), _losses(want), 2e-4, "EP2")


def test_resume_is_exact_and_reshards(world2, tmp_path):
    want = world2.run(_train, BASE, str(tmp_path / "full.jsonl"))[0]
    for stop in (2, 4):  # the switch (after step 3) in the second half, then in the first
        ckpt = str(tmp_path / f"ckpt{stop}")
        first = world2.run(_train, BASE + ["--save", ckpt, "--exit-interval", str(stop)],
                           str(tmp_path / f"a{stop}.jsonl"))[0]  # fmt: skip
        second = world2.run(_train, BASE + ["--load", ckpt, "--save", ckpt],
                            str(tmp_path / f"b{stop}.jsonl"))[0]  # fmt: skip
        assert latest_iteration(ckpt) == 6
        _assert_close(_losses(first) + _losses(second), _losses(want), 1e-6, f"stop {stop}")
    # The distributed optimizer (DP-sharded Adam state) resumes exactly too; its checkpoint
    # saved and loaded with --verify-integrity (the two ranks share the hashing).
    distopt = BASE + ["--use-distributed-optimizer"]
    want_d = world2.run(_train, distopt, str(tmp_path / "full_d.jsonl"))[0]
    ckpt = str(tmp_path / "ckpt_d")
    first = world2.run(_train, distopt + ["--save", ckpt, "--exit-interval", "2",
                                          "--verify-integrity"],
                       str(tmp_path / "a_d.jsonl"))[0]  # fmt: skip
    with open(os.path.join(ckpt, "iter_0000002", "tst_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["hashed"] == "all" and manifest["files"]
    assert all("sha256" in entry for entry in manifest["files"].values())
    second = world2.run(_train, distopt + ["--load", ckpt, "--verify-integrity"],
                        str(tmp_path / "b_d.jsonl"))[0]  # fmt: skip
    _assert_close(_losses(first) + _losses(second), _losses(want_d), 1e-6, "distributed optimizer")
    # The same checkpoint resumed under TP=2 (saved under TP=1, DP=2).
    ckpt = str(tmp_path / "ckpt_tp")
    world2.run(_train, BASE + ["--save", ckpt, "--exit-interval", "4"], str(tmp_path / "c.jsonl"))
    second = world2.run(_train, BASE + ["--load", ckpt, "--tensor-model-parallel-size", "2"],
                        str(tmp_path / "d.jsonl"))[0]  # fmt: skip
    _assert_close(_losses(second), _losses(want)[4:], 2e-4, "resume at TP=2")


def test_fully_reshardable_distributed_optimizer_state_resumes_at_another_layout(world2, tmp_path):
    """--dist-ckpt-optim-fully-reshardable: distributed-optimizer state saved at DP 2 (at
    iteration 4) resumes with its Adam moments at TP 2 (DP 1): the unbroken DP-2 run's
    losses (rel 1e-5; 2e-8 measured), which a fresh optimizer state misses (by 2.9e-4 at
    step 6); at DP 2 exactly (rel 1e-6), loaded in the format it was saved in whatever this
    run's flags say. The same with the gather over gloo onto DP rank 0 (mem-efficient). The
    default format at TP 2 is refused, naming the flag."""
    distopt = BASE + ["--use-distributed-optimizer"]
    want = _losses(world2.run(_train, distopt, str(tmp_path / "full.jsonl"))[0])[4:]
    tp2 = ["--tensor-model-parallel-size", "2"]
    for name, flags in (("gathered", []),
                        ("mem-efficient", ["--distrib-optim-fully-reshardable-mem-efficient"])):  # fmt: skip
        ckpt = str(tmp_path / name)
        world2.run(_train, distopt + ["--dist-ckpt-optim-fully-reshardable", *flags, "--save", ckpt,
                                      "--exit-interval", "4"], str(tmp_path / f"a{name}.jsonl"))  # fmt: skip
        same = world2.run(_train, distopt + ["--load", ckpt], str(tmp_path / f"b{name}.jsonl"))[0]
        _assert_close(_losses(same), want, 1e-6, f"{name}: resume at DP 2")
        other = world2.run(_train, distopt + tp2 + ["--load", ckpt],
                           str(tmp_path / f"c{name}.jsonl"))[0]  # fmt: skip
        _assert_close(_losses(other), want, 1e-5, f"{name}: resume at TP 2")
    fresh = world2.run(_train, distopt + tp2 + ["--load", ckpt, "--no-load-optim"],
                       str(tmp_path / "d.jsonl"))[0]  # fmt: skip
    assert abs(_losses(fresh)[1][-1] - want[1][-1]) > 1e-4 * abs(want[1][-1])  # 2.9e-4 measured
    ckpt = str(tmp_path / "default")
    world2.run(
        _train, distopt + ["--save", ckpt, "--exit-interval", "4"], str(tmp_path / "e.jsonl")
    )
    message = world2.run(_resume_refused, distopt + tp2 + ["--load", ckpt],
                         str(tmp_path / "f.jsonl"))[0]  # fmt: skip
    assert "reshards over data parallelism only" in message
    assert "--dist-ckpt-optim-fully-reshardable reshard anywhere" in message


def _train_signalled_on_rank_1(argv: list[str], metrics: str, at: int) -> list[dict]:
    """_train, with rank 1 alone voting to stop (as if it got SIGTERM) from iteration ``at``."""
    import torch.distributed as dist

    from tst.trainer import Trainer

    original = Trainer._local_stop_votes

    def votes(self):
        signalled, out_of_time = original(self)
        return float(signalled or (dist.get_rank() == 1 and self.iteration >= at)), out_of_time

    Trainer._local_stop_votes = votes
    try:
        return _train(argv, metrics)
    finally:
        Trainer._local_stop_votes = original


def test_one_signalled_rank_stops_every_rank_at_the_same_step(world2, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    records = world2.run(_train_signalled_on_rank_1, BASE + ["--save", ckpt],
                         str(tmp_path / "m.jsonl"), 2)  # fmt: skip
    assert [it for it, _, _ in _losses(records[0])] == [1, 2, 3]  # the vote at step 3's end
    assert latest_iteration(ckpt) == 3  # saved before stopping, by both ranks together


def _resume_refused(argv: list[str], metrics: str) -> str:
    with pytest.raises(CheckpointError) as error:
        pretrain_tst.main(argv + ["--metrics-file", metrics])
    return str(error.value)


def test_resume_at_another_tp_with_another_vocabulary_padding(world2, tmp_path):
    """300 ids pad to 384 rows at TP=1 but 512 at TP=2: the resume is refused with the fix,
    and with it, --padded-vocab-size 384 (192 rows a TP rank), it continues the run."""
    odd = _with(vocab_size=300)
    want = world2.run(_train, odd, str(tmp_path / "full.jsonl"))[0]
    ckpt = str(tmp_path / "ckpt")
    world2.run(_train, odd + ["--save", ckpt, "--exit-interval", "4"], str(tmp_path / "a.jsonl"))
    tp2 = odd + ["--load", ckpt, "--tensor-model-parallel-size", "2"]
    message = world2.run(_resume_refused, tp2, str(tmp_path / "b.jsonl"))[0]
    assert "does not fit this model" in message and "saved (384, 32), this run (512, 32)" in message
    assert "give --padded-vocab-size 384 (or a --make-vocab-size-divisible-by" in message
    second = world2.run(_train, tp2 + ["--padded-vocab-size", "384"], str(tmp_path / "c.jsonl"))[0]
    _assert_close(_losses(second), _losses(want)[4:], 2e-4, "resume at TP=2, 384 rows")


def test_raw_token_accounting_in_both_phases(world2, tmp_path):
    """Bag size 1: one recovery phase of ordinary next-token steps reading L+1 tokens a row;
    a TST run reads bag_size units a row in phase 1, then one, from where phase 1 stopped."""
    plain = _with(tst_bag_size=1)
    got = world2.run(_train, plain, str(tmp_path / "bag1.jsonl"))[0]
    train = [r for r in got if "loss" in r]
    assert {r["phase"] for r in train} == {"recovery"}
    assert {r["loss_name"] for r in train} == {"lm"}
    rows_per_step, unit = 8, 8 + 1
    assert [r["raw_tokens"] for r in train] == [i * rows_per_step * unit for i in range(1, 7)]
    tst = world2.run(_train, BASE, str(tmp_path / "bag3.jsonl"))[0]
    raw = [r["raw_tokens"] for r in tst if "loss" in r]
    # Superposition rows read three units each, recovery rows one, from where phase 1 stopped.
    assert raw == [i * rows_per_step * unit * 3 for i in range(1, 4)] + [
        raw[2] + i * rows_per_step * unit for i in range(1, 4)
    ]


def test_evaluation_batch_and_start(world2, tmp_path):
    """--eval-global-batch-size / --eval-micro-batch-size (Megatron-LM 0.19) at PP 2: one
    evaluation batch of 16 rows in 4 micro-batches of 4 scores what two training-sized
    batches (8 rows, micro-batches of 2) score over the same rows; --start-eval-at-iter 3
    drops the evaluation at step 2, keeping those at 4 and 6 (the last step's)."""
    pp2 = dict(pipeline_model_parallel_size=2, eval_interval=2)
    want = world2.run(_train, _with(**pp2, eval_iters=2), str(tmp_path / "a.jsonl"))[0]
    got = world2.run(_train, _with(**pp2, eval_iters=1, eval_global_batch_size=16,
                                   eval_micro_batch_size=4, start_eval_at_iter=3),
                     str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    assert [i for i, _ in _val(want)] == [2, 4, 6]
    assert [i for i, _ in _val(got)] == [4, 6]
    _assert_close(_val(got), _val(want)[1:], 1e-5, "evaluation batch")
    _assert_close(_losses(got), _losses(want), 1e-6, "training")


def _with(**flags) -> list[str]:
    """BASE with some flags replaced or added."""
    argv = BASE[:]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize(
    "argv,message",
    [
        (_with(num_attention_heads=6, hidden_size=36, num_query_groups=3,
               tensor_model_parallel_size=4), "--num-attention-heads 6 is not divisible by"),
        (_with(num_layers=3, pipeline_model_parallel_size=2), "--num-layers 3 is not divisible"),
        (_with(global_batch_size=6), "--global-batch-size 6 is not divisible"),
        (_with(tst_iters=9), "--tst-iters must be <= --train-iters"),
        (_with(tensor_model_parallel_size=3), "world size 4 is not divisible by TP x PP x CP = 3"),
        (_with(eval_global_batch_size=10, eval_micro_batch_size=1),
         "--eval-global-batch-size 10 is not divisible by --eval-micro-batch-size 1 x "
         "data-parallel size 4"),
        (_with(eval_global_batch_size=6, pipeline_model_parallel_size=2,
               num_virtual_stages_per_pipeline_rank=2, global_batch_size=4, micro_batch_size=1),
         r"micro-batches of an evaluation batch \(3: .*\) to be a multiple of PP=2"),
    ],
)  # fmt: skip
def test_impossible_layouts_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        validate(parse_args(argv), 4, 512)


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--tst-bag-size", "0", "--tst-bag-size must be between 1 and 64"),
        ("--tst-fraction", "1.0", r"--tst-fraction must be in \[0, 1\)"),
        ("--tst-fraction", "-0.1", r"--tst-fraction must be in \[0, 1\)"),
    ],
)
def test_out_of_range_tst_flags_are_refused(flag, value, message):
    argv = _with(**{flag[2:].replace("-", "_"): value})
    i = argv.index("--tst-iters")
    del argv[i : i + 2]
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_load_of_missing_or_incomplete_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        latest_iteration(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20")
    os.makedirs(tmp_path / "iter_0000020")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        latest_iteration(str(tmp_path))


def test_bag_size_one_equals_a_plain_megatron_loop(tmp_path):
    """--tst-bag-size 1 trains exactly like a stock megatron-core GPT loop (same weights and
    data): same losses to rel 1e-6 over 6 steps (only fp32 summation order may differ)."""
    from plain_loop import plain_training

    argv = _with(tst_bag_size=1, lr_decay_style="constant", lr_warmup_iters=0)
    metrics = str(tmp_path / "bag1.jsonl")
    assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    with open(metrics) as f:
        ours = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    plain, _ = plain_training(argv)
    assert len(ours) == len(plain) == 6
    for i, (a, b) in enumerate(zip(ours, plain, strict=True)):
        assert a == pytest.approx(b, rel=1e-6), f"step {i + 1}: {ours} vs {plain}"


def _train_with_fused_wgrad(argv: list[str], metrics: str) -> tuple[list[dict], list[int]]:
    """_train with gradient accumulation fusion on CPU: megatron-core's own code path for it
    (weight gradients accumulated into the main-gradient buffers, the output layer's deferred
    with --defer-embedding-wgrad-compute), with a torch stand-in for APEX's CUDA kernel
    ``fused_weight_gradient_mlp_cuda`` (its definition: ``main_grad += grad_output^T input``).
    Returns the records and, per drain of the deferred gradients, how many were buffered."""
    import sys
    import types

    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import layers

    import tst.megatron_config as megatron_config

    def accumulate(total_input, grad_output, main_grad):
        main_grad.add_(grad_output.t().matmul(total_input).to(main_grad.dtype))

    kernel = types.ModuleType("fused_weight_gradient_mlp_cuda")
    kernel.wgrad_gemm_accum_fp32 = kernel.wgrad_gemm_accum_fp16 = accumulate
    drained: list[int] = []
    finish = schedules.finish_embedding_wgrad_compute

    def counted(config, embedding_module, is_last_stage, tp_group):
        if embedding_module is not None:
            drained.append(len(embedding_module.embedding_activation_buffer))
        return finish(config, embedding_module, is_last_stage, tp_group)

    saved = (layers._grad_accum_fusion_available, getattr(layers, "fused_weight_gradient_mlp_cuda",
             None), megatron_config.gradient_accumulation_fusion, pretrain_tst.check_launchable)  # fmt: skip
    sys.modules["fused_weight_gradient_mlp_cuda"] = layers.fused_weight_gradient_mlp_cuda = kernel
    layers._grad_accum_fusion_available = True
    megatron_config.gradient_accumulation_fusion = lambda cfg, on_gpu, te: (
        cfg.model.gradient_accumulation_fusion
    )
    pretrain_tst.check_launchable = lambda cfg: None  # the CPU refusal, checked elsewhere
    schedules.finish_embedding_wgrad_compute = counted
    try:
        return _train(argv, metrics), drained
    finally:
        (
            layers._grad_accum_fusion_available,
            layers.fused_weight_gradient_mlp_cuda,
            megatron_config.gradient_accumulation_fusion,
            pretrain_tst.check_launchable,
        ) = saved
        sys.modules.pop("fused_weight_gradient_mlp_cuda")
        schedules.finish_embedding_wgrad_compute = finish


def test_deferred_output_layer_wgrad_trains_the_same_model(world4, tmp_path):
    """--defer-embedding-wgrad-compute (Megatron-LM's): the output layer's weight gradients of
    a step's micro-batches are buffered and computed in the pipeline's flush. With gradient
    accumulation fusion (megatron-core's path; the CUDA kernel stood in for by its torch
    definition) the run trains what the default CPU run trains (rel 2e-4, both phases, the
    evaluations too): at PP 2 x DP 2 (a step's 2 micro-batches drained), with
    --wgrad-deferral-limit 1 at TP 2 x PP 2 with sequence parallelism (1 deferred, the rest
    computed at once), and tied embeddings in an interleaved pipeline."""
    want = world4.run(_train, BASE, str(tmp_path / "ref.jsonl"))[0]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    defer = ["--defer-embedding-wgrad-compute"]
    tied = world4.run(_train, TIED, str(tmp_path / "tied.jsonl"))[0]
    cases = {
        "PP2-fused": (BASE + pp2, [], want),
        "PP2-deferred": (BASE + pp2 + defer, [2] * 6, want),
        "TP2xPP2-SP-limit1": (BASE + pp2 + defer + ["--tensor-model-parallel-size", "2",
                              "--sequence-parallel", "--wgrad-deferral-limit", "1"], [1] * 6, want),
        "tied-PP2-interleaved": (TIED + pp2 + defer + ["--num-layers-per-virtual-pipeline-stage",
                                 "1"], [2] * 6, tied),
    }  # fmt: skip
    for name, (argv, drains, reference) in cases.items():
        ranks = world4.run(_train_with_fused_wgrad, argv, str(tmp_path / f"{name}.jsonl"))
        got = ranks[0][0]
        _assert_close(_losses(got), _losses(reference), 2e-4, name)
        _assert_close(_val(got), _val(reference), 2e-4, name)
        # Drained on the last stage only, once per training step (evaluations buffer none).
        assert max((d for _, d in ranks), key=len) == drains, name


def test_expert_tp_on_a_dense_model_trains_the_same_model(world2, tmp_path):
    """--expert-tensor-parallel-size on a dense model (Megatron-LM takes it: megatron-core
    builds expert groups nothing uses): the same training, exactly."""
    want = world2.run(_train, BASE, str(tmp_path / "a.jsonl"))[0]
    got = world2.run(_train, BASE + ["--expert-tensor-parallel-size", "2"],
                     str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    assert _losses(got) == _losses(want)


def _train_seeing_the_save_cache(argv: list[str], metrics: str) -> tuple[list[dict], bool]:
    """_train, and whether the writer kept across saves had reused its cached plans."""
    from trainer_runs import after_training

    seen = []

    def look(trainer):
        strategy = trainer._save_structure["strategy"]
        base = getattr(strategy, "base_strategy", strategy)
        seen.append(base.use_cached_ckpt_structure and base.validated_cache_reuse)

    with after_training(look):
        records = _train(argv, metrics)
    return records, seen[0]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_constant_structure_saves_reuse_their_plan_and_resume_exactly(world2, tmp_path, mode):
    """--ckpt-assume-constant-structure (DP 2, fully parallel, distributed optimizer): a save
    every step through the switch, the third on reusing the first two's plan and metadata
    (megatron-core's cache, checked); the run resumed from a reused-plan checkpoint (step 4)
    repeats the unbroken run's steps exactly."""
    argv = BASE + ["--use-distributed-optimizer", "--save-interval", "1",
                   *(["--async-save"] if mode == "async" else [])]  # fmt: skip
    want = world2.run(_train, argv, str(tmp_path / "want.jsonl"))[0]
    ckpt = str(tmp_path / "ckpt")
    flag = ["--ckpt-assume-constant-structure"]
    results = world2.run(_train_seeing_the_save_cache,
                         argv + flag + ["--save", ckpt, "--exit-interval", "4"],
                         str(tmp_path / "a.jsonl"))  # fmt: skip
    assert [reused for _, reused in results] == [True, True]
    assert latest_iteration(ckpt) == 4
    second = world2.run(_train, argv + flag + ["--load", ckpt, "--save", ckpt],
                        str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    assert _losses(results[0][0]) + _losses(second) == _losses(want)
    assert latest_iteration(ckpt) == 6


class _Crash(Exception):
    """Every rank dying as the same step starts (no save at the stop, unlike a signal)."""


def _train_until_crash(argv: list[str], metrics: str, step: int) -> list[dict]:
    from tst.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, phase):
        if self.iteration + 1 == step:
            raise _Crash(step)
        return original(self, phase)

    Trainer.train_step = train_step
    try:
        _train(argv, metrics)
    except _Crash:
        pass
    finally:
        Trainer.train_step = original
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def test_non_persistent_checkpoint_resumes_at_another_layout(world2, tmp_path):
    """--non-persistent-ckpt-type global under DP 2 with the distributed optimizer: a save
    every step, the newest only kept; a crash before step 5 leaves iteration 4's (after the
    switch), which the relaunch at TP 2 resumes from (the losses as the unbroken run's; the
    optimizer state saved fully reshardable)."""
    distopt = BASE + ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]
    want = world2.run(_train, distopt, str(tmp_path / "want.jsonl"))[0]
    ckpt = str(tmp_path / "ckpt")
    frequent = ["--non-persistent-save-interval", "1", "--non-persistent-ckpt-type", "global"]
    first = world2.run(_train_until_crash, distopt + frequent + ["--save", ckpt],
                       str(tmp_path / "a.jsonl"), 5)[0]  # fmt: skip
    kept = [
        n for n in os.listdir(os.path.join(ckpt, "non_persistent")) if not n.endswith(".deleting")
    ]  # (the rest may still be going: a crash)
    assert sorted(kept) == ["iter_0000004", TRACKER]  # fmt: skip
    assert not os.path.exists(os.path.join(ckpt, TRACKER))  # no persistent save yet
    second = world2.run(_train, distopt + frequent + ["--load", ckpt, "--save", ckpt,
                                                      "--tensor-model-parallel-size", "2"],
                        str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    _assert_close(_losses(first), _losses(want)[:4], 1e-6, "before the crash")
    _assert_close(_losses(second), _losses(want)[4:], 2e-4, "resumed at TP=2")
    assert latest_iteration(ckpt) == 6
