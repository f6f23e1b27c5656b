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


def _train(argv: list[str], metrics: str) -> list[dict]:
    from trainer_runs import main_records

    return main_records(argv, metrics)


def _steps(records, key):
    return [r[key] for r in records if key in r and "iteration" in r]


def _assert_same_run(got, want, name, rel=1e-5, extra_keys=()):
    for key in ("loss", "grad_norm", "val_loss", *extra_keys):
        w, g = _steps(want, key), _steps(got, key)
        assert len(w) == len(g) and w, (name, key)
        for step, (a, b) in enumerate(zip(g, w, strict=True)):
            assert abs(a - b) <= rel * abs(b), (name, key, step, a, b)


def test_context_parallel_trains_what_cp1_trains(world2, tmp_path):
    """CP 2 (one data-parallel rank; the local spec's tst.attention.ContextParallelAttention)
    equals CP 1 at DP 2 (megatron-core's own attention) with the same global batch, through
    the switch: training loss, gradient norm and validation loss (rel 1e-5), with RoPE and
    grouped-query attention, with learned absolute positions (whose position ids must be
    each kept position's global index), and with the fused (SDPA) attention and selective
    recomputation of the core attention (which gathers again in the recomputation). Wrong
    position ids, a wrong causal mask of global positions, a loss normalised per CP rank,
    key / value gradients not summed over CP, or model gradients not summed over CP each
    break it. Multi-token prediction (two depths, learned positions): each depth rolls its
    input bags, position ids, targets and mask one position along the whole sequence, across
    the CP ranks' chunk boundaries (megatron-core's CP-aware ``roll_tensor``); the depths'
    losses are compared too."""
    from flags import SMALL_GPT

    gqa = ["--group-query-attention", "--num-query-groups", "2"]
    # Multi-latent attention: query / key heads of 16 + 8 (YaRN RoPE) channels, values of 12.
    mla = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
           "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "12",
           "--rotary-scaling-factor", "4", "--mscale-all-dim", "1.0"]  # fmt: skip
    cases = (("rope-gqa", SMALL_GPT + gqa), ("learned", []), ("mla", SMALL_GPT + mla),
             ("sdpa-recompute", SMALL_GPT + ["--attention-backend", "flash",
                                             "--recompute-activations"]),
             ("mtp", ["--mtp-num-layers", "2"]))  # fmt: skip
    for name, extra in cases:
        want = world2.run(_train, CP_RUN + extra, str(tmp_path / f"{name}-cp1.jsonl"))[0]
        got = world2.run(_train, CP_RUN + extra + ["--context-parallel-size", "2"],
                         str(tmp_path / f"{name}-cp2.jsonl"))[0]  # fmt: skip
        depths = int(dict(zip(extra, extra[1:], strict=False)).get("--mtp-num-layers", 0))
        _assert_same_run(
            got, want, name, extra_keys=[f"mtp_{k}_loss" for k in range(1, depths + 1)]
        )


def test_context_parallel_with_tensor_sequence_and_pipeline_parallelism(world4, tmp_path):
    """CP 2 beside TP 2 with sequence parallelism, and beside PP 2, equals the same layout
    at CP 1 (DP 2 instead) through the switch (rel 1e-5)."""
    from flags import SMALL_GPT

    base = CP_RUN + SMALL_GPT + ["--group-query-attention", "--num-query-groups", "2"]
    for name, layout in (("tp2-sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                         ("pp2", ["--pipeline-model-parallel-size", "2"])):  # fmt: skip
        want = world4.run(_train, base + layout, str(tmp_path / f"{name}-cp1.jsonl"))[0]
        got = world4.run(_train, base + layout + ["--context-parallel-size", "2"],
                         str(tmp_path / f"{name}-cp2.jsonl"))[0]  # fmt: skip
        _assert_same_run(got, want, name)
