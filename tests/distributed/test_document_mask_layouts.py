"""--reset-position-ids / --reset-attention-mask through pretrain_tst.py at every layout.

The document mask and positions are built from each micro-batch's rows on every pipeline
stage; attention heads split over TP, layers over PP (and virtual stages), and recomputed
layers rerun with the same mask. Every layout must train the same model as data parallelism
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
