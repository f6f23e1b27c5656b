"""--position-embedding-type yarn through pretrain_tst.py on 2 gloo ranks: DP 2, TP 2 with
sequence parallelism and CP 2 (each rank rotating its own positions' share) train the same
losses across the switch (rel 1e-5) with megatron-core's YaRN rotation built from the flags,
and a run stopped inside the
superposition phase resumes exactly (rel 1e-6)."""

from __future__ import annotations

import pytest
from flags import SMALL_GPT

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "16", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "6", "--tst-bag-size", "3", "--tst-iters", "3",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
    "--eval-iters", "1", "--untie-embeddings-and-output-weights", *SMALL_GPT,
]  # fmt: skip
YARN = ["--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
        "--yarn-original-max-position-embeddings", "8"]  # fmt: skip


def _losses(argv: list[str], metrics: str) -> list[tuple[int, float]]:
    from trainer_runs import main_records

    return [(r["iteration"], r["loss"]) for r in main_records(argv, metrics) if "loss" in r]


def _rotary(argv: list[str], metrics: str) -> tuple:
    from trainer_runs import after_training, main_records

    seen = []

    def look(trainer):
        rotary = trainer.raw_chunks[0].rotary_pos_emb
        seen.append((type(rotary).__name__, rotary.scaling_factor,
                     rotary.original_max_position_embeddings, rotary.beta_fast,
                     rotary.beta_slow, rotary.correction_range_round_to_int))  # fmt: skip

    with after_training(look):
        main_records(argv, metrics)
    return seen[0]


def _close(got, want, rel, label):
    assert [i for i, _ in got] == [i for i, _ in want], label
    for (i, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=rel), f"{label}, step {i}: {got} vs {want}"


def test_yarn_layouts_agree_and_resume(world2, tmp_path):
    want = world2.run(_losses, BASE + YARN, str(tmp_path / "dp2.jsonl"))[0]
    for name, layout in (("tp2-sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                         ("cp2", ["--context-parallel-size", "2"])):  # fmt: skip
        _close(world2.run(_losses, BASE + YARN + layout, str(tmp_path / f"{name}.jsonl"))[0],
               want, 1e-5, name)  # fmt: skip
    # What the run built: megatron-core's YaRN rotation with the flags' values (the forward
    # itself is checked against YaRN's formula in tests/unit/test_yarn.py).
    # At the defaults of the other YaRN flags, and at values given for each.
    assert world2.run(_rotary, BASE + YARN, str(tmp_path / "rotary.jsonl"))[0] == (
        "YarnRotaryEmbedding", 4.0, 8, 32.0, 1.0, True)  # fmt: skip
    given = ["--yarn-beta-fast", "8", "--yarn-beta-slow", "0.5",
             "--no-yarn-correction-range-round-to-int"]  # fmt: skip
    assert world2.run(_rotary, BASE + YARN + given, str(tmp_path / "given.jsonl"))[0] == (
        "YarnRotaryEmbedding", 4.0, 8, 8.0, 0.5, False)  # fmt: skip
    ckpt = str(tmp_path / "ckpt")
    first = world2.run(_losses, BASE + YARN + ["--save", ckpt, "--exit-interval", "2"],
                       str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    second = world2.run(_losses, BASE + YARN + ["--load", ckpt], str(tmp_path / "b.jsonl"))[0]
    _close(first + second, want, 1e-6, "resumed")
