"""pretrain_tst.py runs with multi-token prediction and MoE routing statistics, both phases.

MTP: a run with ``--mtp-num-layers 1`` crosses the switch logging the depth's loss in both
phases; a run stopped after the switch and resumed from its checkpoint repeats the unbroken
run's main and MTP losses to rel 1e-6; under TP 2 (and TP 2 with sequence parallelism) the
same run agrees with TP 1 to rel 2e-4 per logged loss (fp32, reductions in another order),
and so do PP 2 (untied and tied), an interleaved PP 2 schedule, and an MoE with MTP under
EP 2 against EP 1; the PP 2 runs, untied and tied (the MTP block and a copy of the
embedding on the last stage), resume exactly from their checkpoints.

Routing: a small MoE (EP 2, alltoall dispatch, MTP depth 1 whose layer is MoE too) logs per
layer and per phase the tokens each expert computed, the dropped tokens and the balancing
loss. Checked per window (one step): every layer routed the step's positions
(``global batch x L``) in both phases; ``sum(tokens per expert) + dropped = routed x topk``;
no drops without a capacity factor; with ``--moe-expert-capacity-factor 0.5`` drops, and no
expert above its capacity (``ceil(tokens x topk / E x 0.5)`` per router call) summed over
the window's calls; under full activation recompute each layer still counts its tokens once.
Balance across the switch, the bound stated: every expert's count stays
within 2x the even share in every window of both phases (``load_imbalance <= 2``), and the
balancing loss (1 when balanced) stays in [0.9, 1.5].
"""

from __future__ import annotations

import json
import math

import pytest
from flags import SMALL_GPT

import pretrain_tst

L, MBS, GBS, E, TOPK = 8, 2, 8, 4, 2
BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", str(L), "--micro-batch-size", str(MBS),
    "--global-batch-size", str(GBS), "--train-iters", "6", "--tst-bag-size", "3",
    "--tst-iters", "3", "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
    "--eval-interval", "3", "--eval-iters", "1", "--untie-embeddings-and-output-weights",
    "--mtp-num-layers", "1", *SMALL_GPT,
]  # fmt: skip
MOE = [
    "--num-experts", str(E), "--moe-router-topk", str(TOPK), "--moe-ffn-hidden-size", "16",
    "--moe-aux-loss-coeff", "0.01", "--expert-model-parallel-size", "2",
]  # fmt: skip


def _train(argv: list[str], metrics: str) -> list[dict]:
    import torch.distributed as dist

    assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    dist.barrier()
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def _train_records(records):
    return [r for r in records if "loss" in r and "iteration" in r]


def _losses(records, key):
    return [(r["iteration"], r["phase"], r[key]) for r in _train_records(records)]


def _assert_close(got, want, rel, label):
    assert [g[:-1] for g in got] == [w[:-1] for w in want], label
    for g, w in zip(got, want, strict=True):
        assert g[-1] == pytest.approx(w[-1], rel=rel), f"{label}: {g} vs {w}"


def test_mtp_run_crosses_the_switch_resumes_exactly_and_agrees_under_tp(world2, tmp_path):
    want = world2.run(_train, BASE, str(tmp_path / "full.jsonl"))[0]
    mtp = _losses(want, "mtp_1_loss")
    assert [phase for _, phase, _ in mtp] == ["superposition"] * 3 + ["recovery"] * 3
    # An untrained model scores about log(V) in both phases (MCE and next-token alike).
    assert all(abs(loss - math.log(512)) < 0.5 for _, _, loss in mtp)
    _resumes_exactly(world2, BASE, want, tmp_path / "pp1", "resume")
    for name, extra in {
        "TP2": ["--tensor-model-parallel-size", "2"],
        "TP2-SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "PP2": ["--pipeline-model-parallel-size", "2"],
    }.items():
        got = world2.run(_train, BASE + extra, str(tmp_path / f"{name}.jsonl"))[0]
        for key in ("loss", "mtp_1_loss"):
            _assert_close(_losses(got, key), _losses(want, key), 2e-4, f"{name} {key}")
        if name == "PP2":
            _resumes_exactly(world2, BASE + extra, got, tmp_path / "pp2", name)


def _resumes_exactly(world, argv, unbroken, folder, label) -> None:
    """``argv`` stopped after the switch (iteration 4) and resumed from its checkpoint
    repeats the unbroken run's main and MTP losses (rel 1e-6). Under PP the last stage holds
    the MTP block and a copy of the embedding: its saves failed (megatron-core needs the
    data-parallel group to tie the copy, and with tied weights asserted that the output
    layer holds no weight of its own there; tst/megatron_fixes.py)."""
    ckpt = str(folder / "ckpt")
    first = world.run(_train, argv + ["--save", ckpt, "--exit-interval", "4"],
                      str(folder / "a.jsonl"))[0]  # fmt: skip
    second = world.run(_train, argv + ["--load", ckpt], str(folder / "b.jsonl"))[0]
    for key in ("loss", "mtp_1_loss"):
        _assert_close(_losses(first, key) + _losses(second, key), _losses(unbroken, key), 1e-6,
                      f"{label} resumed {key}")  # fmt: skip


TIED = [a for a in BASE if a != "--untie-embeddings-and-output-weights"]
DEEPER = [*BASE, "--num-layers", "4"]


def test_mtp_under_pipeline_and_expert_parallelism(world2, tmp_path):
    """The MTP block sits on the last stage with a copy of the (bag) embedding, kept equal to
    the first stage's by megatron-core's embedding-group reduction: tied weights and an
    interleaved schedule agree with PP 1 too, and an MoE with MTP (whose MTP layer is an MoE
    layer) under EP 2 agrees with EP 1, and under a layout whose last virtual stage holds
    only the MTP block and the loss with PP 1 (rel 2e-4 per logged loss)."""
    moe_ep1 = MOE[: MOE.index("--expert-model-parallel-size")]
    for name, base, extra in (
        ("MoE EP2", BASE + moe_ep1, ["--expert-model-parallel-size", "2"]),
        ("tied PP2", TIED, ["--pipeline-model-parallel-size", "2"]),
        ("PP2 interleaved", DEEPER, ["--pipeline-model-parallel-size", "2",
                                     "--num-layers-per-virtual-pipeline-stage", "1"]),
        # The MTP block alone with the loss in the last virtual stage (Megatron-LM's
        # functional test ..._fine_grained_offloading lays DeepSeek-V3 out so): its layer
        # is an MoE layer, as the decoder's last.
        ("MoE PP2 layout ...|mL", DEEPER + moe_ep1, ["--pipeline-model-parallel-size", "2",
                                                     "--pipeline-model-parallel-layout",
                                                     "Et|t|tt|mL"]),
    ):  # fmt: skip
        want = world2.run(_train, base, str(tmp_path / f"{name} ref.jsonl"))[0]
        got = world2.run(_train, base + extra, str(tmp_path / f"{name}.jsonl"))[0]
        for key in ("loss", "mtp_1_loss"):
            _assert_close(_losses(got, key), _losses(want, key), 2e-4, f"{name} {key}")
        if name == "tied PP2":
            _resumes_exactly(world2, base + extra, got, tmp_path / "tied-pp2", name)


def _routing_rows(records):
    """(iteration, record phase, routing phase, layer, stats) of every routing entry."""
    return [
        (r["iteration"], r["phase"], phase, layer, stats)
        for r in _train_records(records)
        for phase, layers in r.get("routing", {}).items()
        for layer, stats in layers.items()
    ]


def _read_tensorboard(path: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(path)
    events.Reload()
    return set(events.Tags()["scalars"])


def test_routing_records_per_layer_and_phase(world2, tmp_path):
    tb = str(tmp_path / "tb")
    records = world2.run(_train, BASE + MOE + ["--tensorboard-dir", tb],
                         str(tmp_path / "moe.jsonl"))[0]  # fmt: skip
    rows = _routing_rows(records)
    assert {(it, layer) for it, *_, layer, _ in rows} == {
        (it, layer) for it in range(1, 7) for layer in ("layer_1", "layer_2", "mtp_1")
    }
    for it, record_phase, phase, layer, stats in rows:
        assert phase == record_phase == ("superposition" if it <= 3 else "recovery")
        assert stats["routed_tokens"] == GBS * L, (it, layer)
        assert sum(stats["tokens_per_expert"]) == stats["routed_tokens"] * TOPK
        assert stats["dropped_tokens"] == 0
        assert stats["min_tokens_per_expert"] == min(stats["tokens_per_expert"])
        assert stats["max_tokens_per_expert"] == max(stats["tokens_per_expert"])
        assert stats["load_imbalance"] <= 2.0, (it, layer, stats)
        assert 0.9 <= stats["load_balancing_loss"] <= 1.5, (it, layer, stats)
    tags = _read_tensorboard(tb)
    for phase in ("superposition", "recovery"):
        assert f"train/routing/{phase}/layer_2/max_tokens_per_expert" in tags
        assert f"train/routing/{phase}/mtp_1/load_balancing_loss" in tags
    assert "train/mtp_1_loss" in tags

    capped = world2.run(_train, BASE + MOE + ["--moe-expert-capacity-factor", "0.5"],
                        str(tmp_path / "capped.jsonl"))[0]  # fmt: skip
    capacity = math.ceil(MBS * L * TOPK / E * 0.5)  # per router call (one micro-batch)
    calls = GBS // MBS  # router calls per layer per step, over both ranks
    rows = _routing_rows(capped)
    assert {phase for _, _, phase, _, _ in rows} == {"superposition", "recovery"}
    for it, _, _, layer, stats in rows:
        assert stats["dropped_tokens"] > 0, (it, layer)
        assert sum(stats["tokens_per_expert"]) + stats["dropped_tokens"] == GBS * L * TOPK
        assert stats["max_tokens_per_expert"] <= calls * capacity, (it, layer, stats)

    # Under full activation recompute a layer's router runs twice a step; it counts once.
    recompute = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]  # fmt: skip
    again = world2.run(_train, BASE + MOE + recompute, str(tmp_path / "recompute.jsonl"))[0]
    rows = _routing_rows(again)
    assert len(rows) == 6 * 3
    assert all(stats["routed_tokens"] == GBS * L for *_, stats in rows)


DEEPSEEK = [
    *BASE, "--num-layers", "3", "--moe-layer-freq", "([0]+[1]*2)", "--multi-latent-attention",
    "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
    "--qk-pos-emb-head-dim", "4", "--v-head-dim", "8", "--num-experts", str(E),
    "--moe-router-topk", str(TOPK), "--moe-ffn-hidden-size", "16",
    "--moe-shared-expert-intermediate-size", "16", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "seq_aux_loss",
    "--moe-aux-loss-coeff", "0.001",
]  # fmt: skip


def test_deepseek_shaped_model_with_mtp_across_the_switch(world2, tmp_path):
    """A tiny DeepSeek-V3-shaped model (MLA, a dense first layer, a shared expert, sigmoid
    routing with the aux-loss-free expert bias and a sequence-level aux loss, MTP depth 1)
    trains through the switch: its routing records name the MoE layers and the MTP layer
    only, with the sequence-level balancing loss; a resume after the switch repeats the
    main and MTP losses to rel 1e-6 (the expert bias restored); EP 2 agrees with EP 1 to
    rel 2e-4."""
    want = world2.run(_train, DEEPSEEK, str(tmp_path / "ref.jsonl"))[0]
    rows = _routing_rows(want)
    assert {layer for *_, layer, _ in rows} == {"layer_2", "layer_3", "mtp_1"}
    assert {phase for _, _, phase, _, _ in rows} == {"superposition", "recovery"}
    assert all(0.9 <= stats["seq_load_balancing_loss"] <= 1.5 for *_, stats in rows)
    ckpt = str(tmp_path / "ckpt")
    first = world2.run(_train, DEEPSEEK + ["--save", ckpt, "--exit-interval", "4"],
                       str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    second = world2.run(_train, DEEPSEEK + ["--load", ckpt], str(tmp_path / "b.jsonl"))[0]
    ep2 = world2.run(_train, DEEPSEEK + ["--expert-model-parallel-size", "2"],
                     str(tmp_path / "ep2.jsonl"))[0]  # fmt: skip
    for key in ("loss", "mtp_1_loss"):
        _assert_close(_losses(first, key) + _losses(second, key), _losses(want, key), 1e-6,
                      f"resume {key}")  # fmt: skip
        _assert_close(_losses(ep2, key), _losses(want, key), 2e-4, f"EP2 {key}")


def _stage_parameters(argv: list[str], world: int = 2) -> tuple[int, int]:
    """On a rank of a world of ``world``: this rank's model chunks built for ``argv`` (with
    the embedding group a launch makes), and their parameter count."""
    import torch

    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_model_chunks
    from tst.plan import embedding_stages, validate
    from tst.platform import initialize

    cfg = parse_args(argv)
    plan = validate(cfg, world, cfg.data.vocab_size)
    grid = plan.grid
    layout = initialize(tp=grid.tp, pp=grid.pp, vpp=grid.vpp, ep=grid.ep,
                        embedding_stages=embedding_stages(cfg, grid))  # fmt: skip
    config = transformer_config(cfg, plan, layout)
    shape = ModelShape.from_config(cfg.model, plan.padded_vocab_size, False)
    chunks = build_model_chunks(config, shape, plan.vpp, torch.device("cpu"))
    return layout.pp_rank, sum(p.numel() for c in chunks for p in c.parameters())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dry_run_stages_hold_the_mtp_block_as_a_real_build(tied, world2):
    """The dry run puts the MTP block, and the last stage's embedding copy it embeds with,
    on the last stage: per-stage parameters equal a real PP 2 build's."""
    from tst.config import parse_args
    from tst.dry_run import meta_parameters, per_rank_parameters
    from tst.plan import validate

    argv = (TIED if tied else BASE) + MOE[:6] + ["--pipeline-model-parallel-size", "2"]
    cfg = parse_args(argv)
    plan = validate(cfg, 2, cfg.data.vocab_size)
    stages = per_rank_parameters(meta_parameters(cfg, plan.padded_vocab_size), cfg, plan.grid)
    for pp_rank, count in world2.run(_stage_parameters, argv):
        assert count == stages[pp_rank]["dense"] + stages[pp_rank]["experts"], (pp_rank, stages)


# ------------------------------------------- the MTP block on a rank of its own (standalone)

# Megatron-LM's DeepSeek-V3 layout ("Et*3|(tt|)*29,m|L" at PP 16 x VPP 2) puts the MTP block
# in a rank's last virtual stage and the loss alone on the last rank; here the same shape at
# PP 4: the block on rank 2 after the last decoder layer, the loss alone on rank 3.
STANDALONE = ["--num-layers", "3", "--pipeline-model-parallel-size", "4",
              "--pipeline-model-parallel-layout", "Et|t|tm|L"]  # fmt: skip


def test_standalone_mtp_stage_trains_what_pp1_trains(world4, tmp_path):
    """With the MTP block on a pipeline rank before the last (megatron-core's standalone MTP:
    that rank sends the main and the depth's states on, stacked, and the last rank scores
    both), untied and tied, training equals PP 1 (DP 4, the same global batch) through the
    switch: main and MTP losses and the gradient norm per step (rel 2e-4). The MTP rank's
    copy of the embedding starts equal to the first rank's and sums its gradient with it;
    with untied weights the last rank's output layer stays out of that sum (Megatron-LM
    0.16.1's default embedding group has it the other way round). The untied run, stopped
    after the switch, resumes at PP 1 repeating the unbroken run (the MTP rank's embedding
    copy is saved tied to the first rank's)."""
    for name, base in (("untied", BASE), ("tied", TIED)):
        base = [*base, "--num-layers", "3"]
        want = world4.run(_train, base, str(tmp_path / f"{name}-pp1.jsonl"))[0]
        got = world4.run(_train, base + STANDALONE, str(tmp_path / f"{name}-pp4.jsonl"))[0]
        for key in ("loss", "mtp_1_loss", "grad_norm"):
            _assert_close(_losses(got, key), _losses(want, key), 2e-4, f"{name} {key}")
        if name == "untied":
            ckpt = str(tmp_path / "ckpt")
            first = world4.run(_train, base + STANDALONE + ["--save", ckpt, "--exit-interval",
                               "4"], str(tmp_path / "a.jsonl"))[0]  # fmt: skip
            second = world4.run(_train, base + ["--load", ckpt], str(tmp_path / "b.jsonl"))[0]
            for key in ("loss", "mtp_1_loss"):
                _assert_close(_losses(first, key) + _losses(second, key), _losses(want, key),
                              2e-4, f"standalone checkpoint resumed at PP 1: {key}")  # fmt: skip


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dry_run_stages_hold_a_standalone_mtp_block_as_a_real_build(tied, world4):
    """The dry run puts the MTP block and its embedding copy on the layout's MTP rank, the
    final norm with the last decoder layer, the output layer (and, tied, its embedding copy)
    on the last rank: per-stage parameters equal a real build's."""
    from tst.config import parse_args
    from tst.dry_run import meta_parameters, per_rank_parameters
    from tst.plan import validate

    argv = [*(TIED if tied else BASE), *STANDALONE]
    cfg = parse_args(argv)
    plan = validate(cfg, 4, cfg.data.vocab_size)
    assert plan.grid.mtp_stage == 2
    stages = per_rank_parameters(meta_parameters(cfg, plan.padded_vocab_size), cfg, plan.grid)
    for pp_rank, count in world4.run(_stage_parameters, argv, 4):
        assert count == stages[pp_rank]["dense"] + stages[pp_rank]["experts"], (pp_rank, stages)
