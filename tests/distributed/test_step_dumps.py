"""Megatron-LM 0.19's debugging dumps through pretrain_tst.py on 2 gloo ranks (an MoE at EP 2,
the distributed optimizer gathering in the forward, full recomputation):
--save-params-interval, --save-activations-interval, --save-tokens-per-expert-interval.

The weights dumped after the last step are the trained model's, bit for bit; each linear
layer's recorded output is torch's F.linear of its recorded input and the weights the
previous step's dump holds (rel 1e-5); the tokens per local expert, summed over the two
expert-parallel ranks, are each micro-batch's tokens x top-k, one entry per micro-batch
(recomputed forwards are not counted twice). The losses are the run's without the dumps.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from flags import SMALL_GPT

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "4", "--tst-bag-size", "3", "--tst-iters", "3",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "4",
    "--eval-iters", "1", "--untie-embeddings-and-output-weights", "--num-experts", "4",
    "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
    "--use-distributed-optimizer", "--overlap-param-gather", "--recompute-granularity", "full",
    "--recompute-method", "uniform", "--recompute-num-layers", "1", *SMALL_GPT,
]  # fmt: skip
DUMPS = ["--save-params-interval", "1", "--save-activations-interval", "2",
         "--save-tokens-per-expert-interval", "2"]  # fmt: skip


def _run(argv: list[str], metrics: str) -> dict:
    """pretrain_tst.main; the losses, this rank's trained weights and (with --save) the
    dumps this rank wrote."""
    import torch.distributed as dist
    from trainer_runs import after_training, main_records

    seen = {}

    def look(trainer):
        seen["weights"] = {
            n: p.detach().clone() for n, p in trainer.raw_chunks[0].named_parameters()
        }

    with after_training(look):
        records = main_records(argv, metrics)
    seen["losses"] = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    if "--save" not in argv:
        return seen
    save, rank = argv[argv.index("--save") + 1], dist.get_rank()
    name = f"mp_rank_00_{rank:03d}.pth"  # TP rank 0, EP rank = this rank
    for label in ("params", "activations"):
        folder = os.path.join(save, label)
        seen[label] = {int(it[len("iter_"):]): torch.load(os.path.join(folder, it, name),
                                                          weights_only=True)["model_chunk0"]
                       for it in sorted(os.listdir(folder))}  # fmt: skip
    with open(os.path.join(save, "tokens_per_expert", f"rank{rank}.jsonl")) as f:
        seen["tpe"] = [json.loads(line) for line in f]
    return seen


def test_dumps_hold_the_weights_activations_and_routing_of_their_steps(world2, tmp_path):
    plain = world2.run(_run, BASE, str(tmp_path / "plain.jsonl"))
    ranks = world2.run(_run, BASE + DUMPS + ["--save", str(tmp_path / "ckpt")],
                       str(tmp_path / "dumps.jsonl"))  # fmt: skip
    assert ranks[0]["losses"] == plain[0]["losses"]
    for rank in ranks:
        # Every step's weights; the last step's are the trained model's.
        assert sorted(rank["params"]) == [1, 2, 3, 4] and sorted(rank["activations"]) == [2, 4]
        assert rank["params"][4].keys() == rank["weights"].keys()
        for name, weight in rank["weights"].items():
            assert torch.equal(rank["params"][4][name], weight), name
        # Step 2's forward ran with the weights step 1 left: output = F.linear(input, W).
        acts, before = rank["activations"][2], rank["params"][1]
        layers = [key[: -len("/output0")] for key in acts if key.endswith("/output0")]
        linear = [n for n in layers if f"{n}.weight" in before and f"{n}/input0" in acts
                  and "router" not in n]  # fmt: skip
        assert "output_layer" in linear and "decoder.layers.1.self_attention.linear_qkv" in linear
        assert "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2" in linear
        assert "decoder.layers.0.mlp.router/output0" in acts
        for n in linear:
            want = F.linear(acts[f"{n}/input0"], before[f"{n}.weight"])
            torch.testing.assert_close(acts[f"{n}/output0"], want, rtol=1e-5, atol=1e-6, msg=n)
        # The output layer's logits are the superposition phase's: [L, b, V].
        assert tuple(acts["output_layer/output0"].shape) == (8, 2, 512)
    # Tokens per local expert (2 per rank), per micro-batch (2 per rank and step): over both
    # ranks each micro-batch routes 2 ranks x 2 samples x 8 positions x top-2 = 64.
    lines = [line for rank in ranks for line in rank["tpe"]]
    assert {(x["iter"], x["block"], x["layer"]) for x in lines} == {
        (it, "decoder", layer) for it in (2, 4) for layer in (0, 1)}  # fmt: skip
    for it in (2, 4):
        for layer in (0, 1):
            mine = [x["tpe"] for x in lines if x["iter"] == it and x["layer"] == layer]
            assert len(mine) == 2 and all(len(t) == 2 and len(t[0]) == 2 for t in mine)
            for micro in range(2):
                assert sum(sum(t[micro]) for t in mine) == 2 * 2 * 8 * 2


@pytest.mark.parametrize("flag", ["--save-params-interval", "--save-activations-interval",
                                  "--save-tokens-per-expert-interval"])  # fmt: skip
def test_a_dump_needs_save_and_a_positive_interval(flag):
    from tst.config import parse_args
    from tst.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{flag} writes under the --save directory"):
        parse_args([*BASE, flag, "2"])
    with pytest.raises(ConfigError, match=f"{flag} must be >= 1"):
        parse_args([*BASE, flag, "0", "--save", "/tmp/x"])
