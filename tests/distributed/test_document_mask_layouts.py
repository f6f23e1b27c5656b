"""--reset-position-ids / --reset-attention-mask through pretrain_tst.py at every layout.

The document mask and positions are built from each micro-batch's rows on every pipeline
stage; attention heads split over TP, layers over PP (and virtual stages), sequences over CP
(each rank the mask's rows of its queries), and recomputed layers rerun with the same mask. Every layout must train the same model as data parallelism
alone, through the phase switch (bags of 3, then tokens) and evaluation: fp32, rel 1e-5
(measured up to 4e-8: reductions in another order); and the flags must change the run (the
mock documents' EODs fall inside the rows; by 5.8e-3 nats at most, 100x that tolerance).
"""

from __future__ import annotations

import json

import pytest
from flags import SMALL_GPT

import pretrain_tst

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "16", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "6", "--tst-bag-size", "3", "--tst-iters", "3",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
    "--eval-iters", "1", *SMALL_GPT, "--position-embedding-type", "learned_absolute",
]  # fmt: skip
DOCS = ["--reset-position-ids", "--reset-attention-mask"]
LAYOUTS = {
    "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2-vpp2": ["--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1"],
    "tp2-full-recompute": ["--tensor-model-parallel-size", "2", "--recompute-granularity", "full",
                           "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "dp2-sdpa": ["--attention-backend", "flash"],
    # The local spec's CP attention, given the mask's rows of each rank's queries.
    "cp2": ["--context-parallel-size", "2"],
}  # fmt: skip
REL = 1e-5  # measured up to 4e-8


def _losses(argv: list[str], metrics: str) -> list[tuple[int, str, float]]:
    import torch.distributed as dist

    assert pretrain_tst.main([*argv, "--metrics-file", metrics]) == 0
    dist.barrier()
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    rows = [(r["iteration"], "train", r["loss"]) for r in records if r.get("loss") is not None]
    rows += [(r["iteration"], "eval", r["val_loss"]) for r in records
             if r.get("val_loss") is not None]  # fmt: skip
    return rows


def test_every_layout_trains_the_data_parallel_model(world2, tmp_path):
    want = world2.run(_losses, BASE + DOCS, str(tmp_path / "dp2.jsonl"))[0]
    assert {kind for _, kind, _ in want} == {"train", "eval"} and len(want) >= 8
    plain = world2.run(_losses, BASE, str(tmp_path / "plain.jsonl"))[0]
    effect = max(abs(a - b) for (*_, a), (*_, b) in zip(plain, want, strict=True))
    assert effect > 2e-3  # measured 5.8e-3: 100x the tolerance below
    for name, extra in LAYOUTS.items():
        got = world2.run(_losses, BASE + DOCS + extra, str(tmp_path / f"{name}.jsonl"))[0]
        assert [(i, k) for i, k, _ in got] == [(i, k) for i, k, _ in want], name
        for (i, kind, a), (_, _, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, rel=REL), f"{name}, {kind} at {i}: {got} vs {want}"


def test_the_combined_1f1b_schedule_keeps_the_mask_through_experts(world2, tmp_path):
    """EP 2 MoE: megatron-core's combined 1F1B schedule (--overlap-moe-expert-parallel-comm)
    hands the mask to its per-layer pieces; it trains what the plain schedule trains with the mask (bf16, which that schedule
    needs: rel 1e-4 for the summation order, as in test_checkpoint_moe_flags.py), and the
    mask changes that run."""
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
           "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
           "--bf16"]  # fmt: skip
    want = world2.run(_losses, BASE + DOCS + moe, str(tmp_path / "plain.jsonl"))[0]
    unmasked = world2.run(_losses, BASE + moe, str(tmp_path / "unmasked.jsonl"))[0]
    assert max(abs(a - b) for (*_, a), (*_, b) in zip(unmasked, want, strict=True)) > 2e-3
    got = world2.run(_losses, BASE + DOCS + moe + ["--overlap-moe-expert-parallel-comm"],
                     str(tmp_path / "overlap.jsonl"))[0]  # fmt: skip
    assert [(i, k) for i, k, _ in got] == [(i, k) for i, k, _ in want]
    for (i, kind, a), (_, _, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-4), f"{kind} at {i}: {got} vs {want}"


def test_an_mtp_depth_reads_the_mask_alike_at_pp2(world2, tmp_path):
    """An MTP depth (its own transformer layer, handed the model's mask) on the last of two
    pipeline stages trains what DP 2 trains (rel 1e-5); RoPE, which MTP under PP needs."""
    mtp = BASE + ["--position-embedding-type", "rope", "--reset-attention-mask",
                  "--mtp-num-layers", "1"]  # fmt: skip
    want = world2.run(_losses, mtp, str(tmp_path / "dp2.jsonl"))[0]
    got = world2.run(_losses, mtp + ["--pipeline-model-parallel-size", "2"],
                     str(tmp_path / "pp2.jsonl"))[0]  # fmt: skip
    assert [(i, k) for i, k, _ in got] == [(i, k) for i, k, _ in want]
    for (i, kind, a), (_, _, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=REL), f"{kind} at {i}: {got} vs {want}"
