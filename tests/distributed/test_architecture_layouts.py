"""Megatron-LM's remaining architecture flags through pretrain_tst.py under tensor, sequence,
pipeline and expert parallelism: each layout trains what one tensor-parallel rank trains
across the phase switch (rel 2e-5 per logged loss; measured differences are ~1e-7).

The dense model uses every attention / MLP / RoPE / initialisation flag at once, with the RoPE
pattern a list whose layers 3 and 4 differ (a stage numbering its layers locally would skip
RoPE on the wrong ones) and Xavier bounds taken from each whole matrix (megatron-core's
per-shard Xavier would differ at TP 2). The MoE model gates its shared expert, scales the
top-1 expert's input by its probability and recomputes its MoE layers.
"""

from __future__ import annotations

import pytest
from test_trainer import BASE, _assert_close, _losses, _train

DENSE = [a for a in BASE if a != "--swiglu"] + [
    "--squared-relu", "--rotary-interleaved", "--no-rope-freq", "[0,1,1,0]", "--qk-l2-norm",
    "--attention-output-gate", "--apply-query-key-layer-scaling", "--init-method-xavier-uniform",
    "--embedding-init-method-std", "0.05", "--global-batch-size", "4",
]  # fmt: skip
MOE = BASE + [
    "--num-experts", "4", "--moe-router-topk", "1", "--moe-router-pre-softmax",
    "--moe-apply-probs-on-input", "--moe-shared-expert-intermediate-size", "32",
    "--moe-shared-expert-gate", "--moe-layer-recompute", "--global-batch-size", "4",
]  # fmt: skip
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]


@pytest.mark.parametrize(
    "argv, layouts",
    [(DENSE, {"TP2-SP": TP2, "PP2": PP2}),
     (MOE, {"TP2-SP": TP2, "EP2": ["--expert-model-parallel-size", "2"]})],
    ids=["dense", "moe"],
)  # fmt: skip
def test_layouts_agree_across_the_switch(world2, tmp_path, argv, layouts):
    want = _losses(world2.run(_train, argv, str(tmp_path / "ref.jsonl"))[0])
    assert [p for _, p, _ in want] == ["superposition"] * 3 + ["recovery"] * 3
    for name, extra in layouts.items():
        got = _losses(world2.run(_train, argv + extra, str(tmp_path / f"{name}.jsonl"))[0])
        _assert_close(got, want, 2e-5, name)
