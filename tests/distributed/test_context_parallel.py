"""The context-parallel split of TST batches against an unsplit reference (CP 2, gloo).

Each CP rank must hold exactly positions ``r`` and ``2 CP - 1 - r`` of the ``2 CP`` chunks
(megatron-core's load balancing), in both phases: whole bags of input ids, their target
bags, mask and global position ids. Reassembled, the two ranks' shares are the batch.
"""

from __future__ import annotations

import torch

from tst.data.batch import make_tst_batch
from tst.data.context_parallel import kept_positions, split_for_context_parallel

L, B = 8, 3


def _shares(bag: int) -> list:
    import torch.distributed as dist

    # The world's own group is the CP group of two ranks: no new gloo group to connect (a
    # group made and destroyed per call once failed to connect on a machine loaded 40x).
    group = dist.group.WORLD
    assert dist.get_world_size(group) == 2
    chunk = torch.arange(B * bag * (L + 1)).reshape(B, -1) % 97
    batch = make_tst_batch(chunk, bag)
    positions = torch.arange(L).expand(B, -1)
    split, pos = split_for_context_parallel(batch, positions, group)
    return [batch, positions, split, pos]


def test_split_matches_the_unsplit_batch(world2):
    for bag in (1, 4):  # recovery and superposition batches
        ranks = world2.run(_shares, bag)
        batch, positions = ranks[0][0], ranks[0][1]
        for rank, (_, _, split, pos) in enumerate(ranks):
            keep = kept_positions(L, 2, rank)
            assert keep.tolist() == (
                [rank * 2, rank * 2 + 1] + [(3 - rank) * 2, (3 - rank) * 2 + 1]
            )
            assert torch.equal(pos, positions[:, keep])
            assert torch.equal(split.targets, batch.targets[:, keep])
            assert torch.equal(split.loss_mask, batch.loss_mask[:, keep])
            ids = batch.input_ids.view(B, L, bag)[:, keep].reshape(B, -1)
            assert torch.equal(split.input_ids, ids)  # whole bags, never cut
        # Together the two ranks hold every position once.
        held = torch.cat([kept_positions(L, 2, r) for r in range(2)]).sort().values
        assert torch.equal(held, torch.arange(L))


# ---------------------------------------------------------------- CP through the trainer

CP_RUN = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "6", "--tst-bag-size", "2", "--tst-iters", "3",
    "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--untie-embeddings-and-output-weights",
]  # fmt: skip


def _train_with_cp_attention(argv: list[str], metrics: str) -> list[dict]:
    """pretrain_tst.main with the plain CP attention (tests/helpers/cp_attention.py) in place
    of Transformer Engine's, which the CPU does not have; records of the metrics file."""
    import dataclasses
    import json

    import torch.distributed as dist
    from cp_attention import GatheredContextParallelAttention

    import pretrain_tst
    from tst import megatron_config, model

    spec_of, check = model.layer_spec, megatron_config._check_device_features

    def layer_spec(shape, multi_latent_attention=False):
        spec = spec_of(shape, multi_latent_attention)
        attention = spec.submodules.self_attention
        attention = dataclasses.replace(attention, submodules=dataclasses.replace(
            attention.submodules, core_attention=GatheredContextParallelAttention))  # fmt: skip
        return dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, self_attention=attention))  # fmt: skip

    model.layer_spec = layer_spec
    megatron_config._check_device_features = lambda cfg, layout, te: None  # CP on CPU
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        model.layer_spec, megatron_config._check_device_features = spec_of, check
    dist.barrier()
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def _steps(records, key):
    return [r[key] for r in records if key in r and "iteration" in r]


def test_context_parallel_trains_the_model_cp1_trains(world2, tmp_path):
    """CP 2 (one data-parallel rank) equals CP 1 at DP 2 with the same global batch, through
    the switch: training loss, gradient norm and validation loss (rel 1e-5), with RoPE and
    with learned absolute positions (whose position ids must be each kept position's global
    index). Wrong position ids, a loss normalised per CP rank, or gradients not summed over
    CP each break it."""
    from flags import SMALL_GPT

    for name, extra in (("rope", SMALL_GPT), ("learned", [])):
        want = world2.run(_train_with_cp_attention, CP_RUN + extra,
                          str(tmp_path / f"{name}-cp1.jsonl"))[0]  # fmt: skip
        got = world2.run(_train_with_cp_attention,
                         CP_RUN + extra + ["--context-parallel-size", "2"],
                         str(tmp_path / f"{name}-cp2.jsonl"))[0]  # fmt: skip
        for key in ("loss", "grad_norm", "val_loss"):
            w, g = _steps(want, key), _steps(got, key)
            assert len(w) == len(g) and w, (name, key)
            for step, (a, b) in enumerate(zip(g, w, strict=True)):
                assert abs(a - b) <= 1e-5 * abs(b), (name, key, step, a, b)
