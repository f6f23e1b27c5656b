"""Uneven pipeline stages: --decoder-first/last-pipeline-num-layers,
--pipeline-model-parallel-layout, and the embedding / loss counted as a layer of the split
(--account-for-embedding-in-pipeline-split / --account-for-loss-in-pipeline-split).

Three layers split 1 + 2 (and 2 + 1, and interleaved through a layout) over PP 2 train the
model PP 1 trains across the phase switch (rel 2e-4 per logged loss: the same fp32 math,
reductions in another order), untied and tied (the last stage's output copy equals the
first stage's embedding exactly: layout-independent initialisation numbers layers
globally). The run plan checks megatron-core's layout rules up front, one line each, and the
dry run's per-stage parameters equal what each stage really builds.
"""

from __future__ import annotations

import pytest
from test_trainer import BASE, _assert_close, _losses, _train, _train_tied_copies_equal

from tst.config import parse_args
from tst.plan import validate

THREE = [a for a in BASE] + ["--num-layers", "3"]  # the last --num-layers wins
THREE_TIED = [a for a in THREE if a != "--untie-embeddings-and-output-weights"]
PP2 = ["--pipeline-model-parallel-size", "2"]

UNEVEN = {
    "first-1": PP2 + ["--decoder-first-pipeline-num-layers", "1"],
    "last-1": PP2 + ["--decoder-last-pipeline-num-layers", "1"],
    "layout-1+2": PP2 + ["--pipeline-model-parallel-layout", "Et|ttL"],
    # Interleaved: rank 0 runs chunks [E t] and [t], rank 1 [t] and [L] (no layer at all).
    "layout-vpp2": PP2 + ["--pipeline-model-parallel-layout", "Et|t|t|L"],
    # (3 layers + the embedding) / 2: the first stage builds 1, the second 2; with the loss
    # counted instead, 2 and 1.
    "embedding-split": PP2 + ["--account-for-embedding-in-pipeline-split"],
    "loss-split": PP2 + ["--account-for-loss-in-pipeline-split"],
}


def test_uneven_stages_agree_with_pp1_across_the_switch(world2, tmp_path):
    want = world2.run(_train, THREE, str(tmp_path / "ref.jsonl"))[0]
    assert [r["phase"] for r in want if "loss" in r] == ["superposition"] * 3 + ["recovery"] * 3
    for name, extra in UNEVEN.items():
        got = world2.run(_train, THREE + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _assert_close(_losses(got), _losses(want), 2e-4, name)


def test_uneven_interleaved_stages_agree_with_pp1(world2, tmp_path):
    """Six layers as 2 + 4 over PP 2, each rank's share in two virtual stages
    (--num-virtual-stages-per-pipeline-rank, Megatron-LM's way to interleave uneven stages):
    chunks of 1, 2, 1, 2 layers train what PP 1 trains across the switch."""
    six = THREE + ["--num-layers", "6"]
    want = world2.run(_train, six, str(tmp_path / "ref.jsonl"))[0]
    extra = PP2 + ["--decoder-first-pipeline-num-layers", "2",
                   "--num-virtual-stages-per-pipeline-rank", "2"]  # fmt: skip
    results = world2.run(_train_with_layers, six + extra, str(tmp_path / "vpp.jsonl"))
    # Chunks in layer order: rank 0 [0] then [3], rank 1 [1, 2] then [4, 5].
    assert [layers for _, layers in results] == [["0:MLP", "3:MLP"],
                                                 ["1:MLP", "2:MLP", "4:MLP", "5:MLP"]]  # fmt: skip
    got = next(records for records, _ in results if _losses(records))
    _assert_close(_losses(got), _losses(want), 2e-4, "2 + 4 layers, VPP 2")
    # The embedding and the loss counted as layers, Megatron-LM's layers-per-virtual-stage
    # flag: (6 + 2) / PP 2 = 4 a rank, VPP 4 / 2 = 2, chunks of 1, 2, 2, 1 layers.
    extra = PP2 + ["--account-for-embedding-in-pipeline-split",
                   "--account-for-loss-in-pipeline-split",
                   "--num-layers-per-virtual-pipeline-stage", "2"]  # fmt: skip
    results = world2.run(_train_with_layers, six + extra, str(tmp_path / "counted.jsonl"))
    assert [layers for _, layers in results] == [["0:MLP", "3:MLP", "4:MLP"],
                                                 ["1:MLP", "2:MLP", "5:MLP"]]  # fmt: skip
    got = next(records for records, _ in results if _losses(records))
    _assert_close(_losses(got), _losses(want), 2e-4, "embedding and loss counted, VPP 2")
    # Breadth-first interleaving: all 4 micro-batches of a step on a virtual stage in turn.
    extra += ["--microbatch-group-size-per-virtual-pipeline-stage", "4"]
    results = world2.run(_train_with_layers, six + extra, str(tmp_path / "breadth.jsonl"))
    got = next(records for records, _ in results if _losses(records))
    _assert_close(_losses(got), _losses(want), 2e-4, "breadth-first, VPP 2")
    # 3 micro-batches a step on PP 2: not a multiple of PP, which megatron-core's interleaved
    # schedule takes in one group of 3 (Megatron-LM's tunable-overlap functional tests: 5 on
    # PP 4). Reference: TP 2 at the same batch.
    odd = six + ["--micro-batch-size", "1", "--global-batch-size", "3"]
    want = world2.run(_train, odd + ["--tensor-model-parallel-size", "2"],
                      str(tmp_path / "odd-ref.jsonl"))[0]  # fmt: skip
    extra = PP2 + ["--num-layers-per-virtual-pipeline-stage", "1",
                   "--microbatch-group-size-per-virtual-pipeline-stage", "3"]  # fmt: skip
    results = world2.run(_train_with_layers, odd + extra, str(tmp_path / "odd.jsonl"))
    got = next(records for records, _ in results if _losses(records))
    _assert_close(_losses(got), _losses(want), 2e-4, "3 micro-batches, one group, VPP 3")


def test_uneven_stages_with_tied_embeddings_agree(world2, tmp_path):
    want = world2.run(_train_tied_copies_equal, THREE_TIED, str(tmp_path / "ref.jsonl"))[0]
    for name in ("first-1", "layout-vpp2"):
        got = world2.run(
            _train_tied_copies_equal, THREE_TIED + UNEVEN[name], str(tmp_path / f"{name}.jsonl")
        )[0]
        _assert_close(_losses(got), _losses(want), 2e-4, f"tied {name}")


def _stage_parameters(argv: list[str]) -> tuple[int, list[int], int]:
    """On a rank: this rank's pipeline rank, its chunks' global layer numbers and parameters."""
    import torch

    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_model_chunks
    from tst.platform import initialize

    cfg = parse_args(argv)
    plan = validate(cfg, 2, cfg.data.vocab_size)
    grid = plan.grid
    layout = initialize(tp=grid.tp, pp=grid.pp, vpp=grid.vpp)
    config = transformer_config(cfg, plan, layout)
    shape = ModelShape.from_config(cfg.model, plan.padded_vocab_size, False)
    chunks = build_model_chunks(config, shape, plan.vpp, torch.device("cpu"))
    layers = [layer.layer_number - 1 for c in chunks for layer in c.decoder.layers]
    return layout.pp_rank, layers, sum(p.numel() for c in chunks for p in c.parameters())


@pytest.mark.parametrize("name", ["first-1", "layout-vpp2", "loss-split"])
def test_dry_run_stages_match_a_real_build(name, world2):
    from tst.dry_run import meta_parameters, per_rank_parameters

    argv = THREE + UNEVEN[name]
    cfg = parse_args(argv)
    plan = validate(cfg, 2, cfg.data.vocab_size)
    stages = per_rank_parameters(meta_parameters(cfg, plan.padded_vocab_size), cfg, plan.grid)
    for pp_rank, layers, count in world2.run(_stage_parameters, argv):
        assert sorted(layers) == stages[pp_rank]["layers"], (name, pp_rank)
        assert count == stages[pp_rank]["dense"] + stages[pp_rank]["experts"], (name, pp_rank)


# ------------------------------------------------------------------------------ plan checks


def test_stage_layers_follow_megatron_cores_rules():
    def chunks(*extra, world=8):
        argv = THREE + ["--num-layers", "61", "--global-batch-size", "16", *extra]
        grid = validate(parse_args(argv), world, 512).grid
        return grid.chunk_layers, grid.vpp

    pp8 = ["--pipeline-model-parallel-size", "8"]
    assert chunks(*pp8, "--decoder-first-pipeline-num-layers", "5") == ((5,) + (8,) * 7, None)
    assert chunks(*pp8, "--decoder-last-pipeline-num-layers", "5", "--decoder-first-pipeline-"
                  "num-layers", "2") == ((2,) + (9,) * 6 + (5,), None)  # fmt: skip
    # One virtual stage per rank is no interleaving; with two, each rank's layers split in
    # two chunks in layer order (rank 0: layers 0-1, then 6-7; rank 1: 2-5, then 8-11).
    assert chunks(*pp8, "--decoder-first-pipeline-num-layers", "5",
                  "--decoder-last-pipeline-num-layers", "8", "--num-virtual-stages-per-"
                  "pipeline-rank", "1") == ((5,) + (8,) * 7, None)  # fmt: skip
    assert chunks("--num-layers", "12", "--pipeline-model-parallel-size", "2",
                  "--decoder-first-pipeline-num-layers", "4", "--num-virtual-stages-per-"
                  "pipeline-rank", "2", world=2) == ((2, 4, 2, 4), 2)  # fmt: skip
    layout = chunks(*pp8, "--pipeline-model-parallel-layout", "Et|(tt|)*30L")
    assert layout == ((1,) + (2,) * 30 + (0,), 4)
    argv = THREE + ["--num-layers", "61", "--global-batch-size", "16", *pp8,
                    "--pipeline-model-parallel-layout", "Et|(tt|)*30L"]  # fmt: skip
    grid = validate(parse_args(argv), 8, 512).grid
    # Chunk c (layers 2c-1, 2c) sits on pipeline rank c % 8; the last rank's last chunk is
    # the loss alone, so layer 60 (chunk 30) is on rank 6.
    assert [grid.stage_of_layer(i, 61) for i in (0, 1, 2, 15, 16, 17, 60)] == [0, 1, 1, 0, 0, 1, 6]


def _megatron_core_chunks(num_layers, pp, vpp, embedding, loss):
    """(first layer, layers) of each chunk in layer order, from megatron-core's own
    get_transformer_layer_offset / get_num_layers_to_build (what the model build calls)."""
    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=8, num_attention_heads=1,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32, account_for_embedding_in_pipeline_split=embedding,
        account_for_loss_in_pipeline_split=loss,
    )  # fmt: skip
    stages = [(v if vpp else None, r) for v in range(vpp or 1) for r in range(pp)]
    return [(get_transformer_layer_offset(config, v, r), get_num_layers_to_build(config, v, r))
            for v, r in stages]  # fmt: skip


@pytest.mark.parametrize(
    "num_layers, pp, virtual, embedding, loss",
    [
        (94, 8, ["--num-virtual-stages-per-pipeline-rank", "4"], True, True),  # Qwen3-235B's
        (15, 8, [], True, False),
        (7, 4, [], False, True),
        (6, 2, ["--num-layers-per-virtual-pipeline-stage", "2"], True, True),
        (4, 1, [], True, True),  # PP 1: nothing to split, every layer on the one stage
    ],
)  # fmt: skip
def test_counted_embedding_and_loss_split_as_megatron_core_builds(
    num_layers, pp, virtual, embedding, loss
):
    counted = ["--account-for-embedding-in-pipeline-split"] * embedding + [
        "--account-for-loss-in-pipeline-split"
    ] * loss
    argv = THREE + ["--num-layers", str(num_layers), "--global-batch-size", "16",
                    "--pipeline-model-parallel-size", str(pp), *virtual, *counted]  # fmt: skip
    grid = validate(parse_args(argv), pp, 512).grid
    want = _megatron_core_chunks(num_layers, pp, grid.vpp, embedding, loss)
    assert grid.chunk_layers == tuple(count for _, count in want)
    # Contiguous in chunk order: each chunk starts where the one before it ended.
    starts = [sum(grid.chunk_layers[:c]) for c in range(len(grid.chunk_layers))]
    assert starts == [offset for offset, _ in want] and sum(grid.chunk_layers) == num_layers


@pytest.mark.parametrize(
    "extra, message",
    [
        (PP2 + ["--pipeline-model-parallel-layout", "Et|t|tL"],
         r"3 stages is not a multiple of --pipeline-model-parallel-size 2"),
        (PP2 + ["--pipeline-model-parallel-layout", "Et|tL"],
         r"places 2 layers \(t\) but --num-layers is 3"),
        (PP2 + ["--pipeline-model-parallel-layout", "tE|ttL"], r"the embedding E must come once"),
        (PP2 + ["--pipeline-model-parallel-layout", "Et|ttLL"], r"the loss L must come once"),
        (PP2 + ["--pipeline-model-parallel-layout", "Et|ttx"], r"Invalid layer character: x"),
        (PP2 + ["--pipeline-model-parallel-layout", "Et|ttmL"],
         r"places 1 multi-token-prediction layers \(m\) but --mtp-num-layers is 0"),
        (PP2 + ["--mtp-num-layers", "1", "--pipeline-model-parallel-layout", "Et|tt|m|L"],
         r"puts the multi-token-prediction layers \(m\) on the first pipeline rank, beside the "
         r"embedding: .* put the m on a later rank"),
        (PP2 + ["--pipeline-model-parallel-layout", "Et|ttL",
                "--decoder-first-pipeline-num-layers", "1"],
         r"sets every stage's layers: drop --decoder-first-pipeline-num-layers"),
        (["--decoder-first-pipeline-num-layers", "1"],
         r"--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size > 1"),
        (PP2 + ["--decoder-first-pipeline-num-layers", "0"], r"must be >= 1, got 0"),
        (PP2 + ["--decoder-first-pipeline-num-layers", "1",
                "--decoder-last-pipeline-num-layers", "1"],
         r"leaves 1 layers for 0 middle stage\(s\)"),
        (PP2 + ["--decoder-first-pipeline-num-layers", "1",
                "--num-layers-per-virtual-pipeline-stage", "1"],
         r"with --num-layers-per-virtual-pipeline-stage is refused \(as in Megatron-LM\): give "
         r"--num-virtual-stages-per-pipeline-rank"),
        (PP2 + ["--decoder-first-pipeline-num-layers", "1",
                "--num-virtual-stages-per-pipeline-rank", "2"],
         r"the stages' layers \[1, 2\] must each be divisible by "
         r"--num-virtual-stages-per-pipeline-rank 2"),
        (PP2 + ["--num-virtual-stages-per-pipeline-rank", "2",
                "--num-layers-per-virtual-pipeline-stage", "1"],
         r"give --num-layers-per-virtual-pipeline-stage or --num-virtual-stages-per-pipeline-"
         r"rank, not both"),
        (PP2, r"--num-layers 3 is not divisible by --pipeline-model-parallel-size 2 \(or give "
              r"--decoder-first/last-pipeline-num-layers"),
        (PP2 + ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"],
         r"--num-layers 3 \+ 2 \(--account-for-embedding-in-pipeline-split and --account-for-"
         r"loss-in-pipeline-split\) = 5 is not divisible by --pipeline-model-parallel-size 2"),
        (PP2 + ["--pipeline-model-parallel-layout", "Et|ttL",
                "--account-for-loss-in-pipeline-split"],
         r"sets every stage's layers: drop --account-for-loss-in-pipeline-split"),
        (PP2 + ["--decoder-first-pipeline-num-layers", "1",
                "--account-for-embedding-in-pipeline-split"],
         r"--account-for-embedding-in-pipeline-split with --decoder-first-pipeline-num-layers "
         r"is refused \(as in megatron-core\)"),
    ],
    ids=["stages-vs-pp", "layer-count", "embedding", "loss", "character", "mtp", "mtp-first-rank", "both",
         "pp1", "zero", "middle", "vpp", "vpp-split", "vpp-both", "even", "counted-even",
         "counted-layout", "counted-uneven"],
)  # fmt: skip
def test_bad_layouts_are_refused_in_one_line(extra, message):
    with pytest.raises(ValueError, match=message) as error:
        validate(parse_args(THREE + extra), 2, 512)
    assert "\n" not in str(error.value)


# ----------------------------------------------------- a tiny DeepSeek-V3 shape, uneven PP

_GQA = THREE.index("--group-query-attention")  # MLA has no key/value groups
DEEPSEEK_TINY = THREE[:_GQA] + THREE[_GQA + 3 :] + [
    "--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
    "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--qk-layernorm",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
    "--moe-layer-freq", "([0]*1+[1]*2)", "--moe-shared-expert-intermediate-size", "16",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate", "1e-2", "--moe-router-topk-scaling-factor", "2.5",
]  # fmt: skip


def _train_with_layers(argv: list[str], metrics: str) -> tuple[list[dict], list[str]]:
    """_train, and this rank's decoder layers as 'global index:MLP class'."""
    from tst.trainer import Trainer

    original, seen = Trainer.train, {}

    def train(self):
        seen["layers"] = [
            f"{layer.layer_number - 1}:{type(layer.mlp).__name__}"
            for chunk in self.raw_chunks
            for layer in chunk.decoder.layers
        ]
        return original(self)

    Trainer.train = train
    try:
        records = _train(argv, metrics)
    finally:
        Trainer.train = original
    return records, seen["layers"]


def test_deepseek_shaped_model_on_uneven_stages_agrees_with_pp1(world2, tmp_path):
    """MLA, a dense first layer then MoE layers (shared expert, sigmoid routing with expert
    bias): the first stage holds the dense layer alone, the second the two MoE layers (the
    --moe-layer-freq pattern follows global layer numbers), and the losses equal PP 1's."""
    (want, layers), _ = world2.run(_train_with_layers, DEEPSEEK_TINY, str(tmp_path / "a.jsonl"))
    assert layers == ["0:MLP", "1:MoELayer", "2:MoELayer"]
    results = world2.run(_train_with_layers, DEEPSEEK_TINY + UNEVEN["first-1"],
                         str(tmp_path / "b.jsonl"))  # fmt: skip
    assert [layers for _, layers in results] == [["0:MLP"], ["1:MoELayer", "2:MoELayer"]]
    got = next(records for records, _ in results if _losses(records))
    _assert_close(_losses(got), _losses(want), 2e-4, "DeepSeek-shaped, first stage 1 layer")


def _train_and_save(argv: list[str], save: str) -> None:
    import torch.distributed as dist

    import pretrain_tst

    assert pretrain_tst.main([*argv, "--save", save]) == 0
    dist.barrier()


def test_uneven_checkpoint_exports_like_pp1(world2, tmp_path):
    """A checkpoint of 1 + 2 layers on PP 2 converts to the Hugging Face model the PP 1 run
    converts to (the exporter loads it at PP 1; atol 5e-5 after two Adam steps)."""
    import torch
    from safetensors.torch import load_file

    from tst.export import convert

    short = ["--train-iters", "2", "--tst-iters", "1", "--eval-iters", "0"]
    uneven, even = str(tmp_path / "uneven"), str(tmp_path / "pp1")
    world2.run(_train_and_save, THREE + short + UNEVEN["first-1"], uneven)
    world2.run(_train_and_save, THREE + short, even)
    a = convert(uneven, str(tmp_path / "hf-uneven"))
    b = convert(even, str(tmp_path / "hf-pp1"))
    got = load_file(f"{a.output}/model.safetensors")
    want = load_file(f"{b.output}/model.safetensors")
    assert got.keys() == want.keys() and "model.layers.2.mlp.up_proj.weight" in want
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=5e-5, msg=name)


def test_dry_run_names_a_stage_without_decoder_layers(capsys):
    """A stage that holds only the embedding (layout E|ttttL) shows "none" in the layers column,
    not an empty cell."""
    import re

    import pretrain_tst

    argv = [a for a in BASE] + PP2 + ["--pipeline-model-parallel-layout", "E|ttttL", "--dry-run",
                                      "--dry-run-world-size", "2"]  # fmt: skip
    assert pretrain_tst.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+0\s+none\s", out, re.M), out
    assert re.search(r"^\s+1\s+0-3\s", out, re.M), out
