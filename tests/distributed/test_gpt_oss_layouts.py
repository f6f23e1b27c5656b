"""A GPT-OSS-shaped model (quick-GEGLU MLP with offset and clamp, learned attention sinks,
sliding-window attention on some layers) through pretrain_tst.py: tensor, sequence and
pipeline parallelism train what one tensor-parallel rank trains across the phase switch, and
a TP 2 checkpoint resumes at TP 1.

Gradients are clipped at every step (--clip-grad below every step's norm), so the gradient
norm counts each rank's sinks once; the sinks are drawn for the whole model and split by
head. The window pattern is a list in which layers 3 and 4 differ, so a pipeline stage that
numbered its layers locally would window the wrong ones. Weights start at std 0.3, so that
attention is far from uniform and the sinks change the losses by more than 1e-3; the
layouts agree within rel 2e-5 (measured: 2e-7 at most, interleaved PP 2 included when this
was written; the same fp32 math, reductions in another order).
"""

from __future__ import annotations

import pytest
from test_trainer import BASE, _assert_close, _losses, _train

OSS = [a for a in BASE if a != "--swiglu"] + [
    "--quick-geglu", "--glu-linear-offset", "1.0", "--activation-func-clamp-value", "1.0",
    "--softmax-type", "learnable", "--window-size", "2,0", "--window-attn-skip-freq",
    "[1,1,0,1]", "--clip-grad", "0.05", "--global-batch-size", "4", "--init-method-std", "0.3",
]  # fmt: skip
LAYOUTS = {
    "TP2-SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
}


def test_gpt_oss_layers_agree_across_layouts_the_switch_and_a_reshard(world2, tmp_path):
    want = world2.run(_train, OSS, str(tmp_path / "ref.jsonl"))[0]
    norms = [r["grad_norm"] for r in want if "grad_norm" in r]
    assert len(norms) == 6 and min(norms) > 0.05  # every step clipped
    losses = _losses(want)
    assert [p for _, p, _ in losses] == ["superposition"] * 3 + ["recovery"] * 3
    for name, extra in LAYOUTS.items():
        got = world2.run(_train, OSS + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _assert_close(_losses(got), losses, 2e-5, name)
        got_norms = [r["grad_norm"] for r in got if "grad_norm" in r]
        assert got_norms == pytest.approx(norms, rel=2e-5), name
    # Plain softmax trains another model: the comparison above can tell (measured 0.045; a
    # window of the whole sequence instead: 0.021).
    other = _losses(world2.run(_train, OSS + ["--softmax-type", "vanilla"],
                               str(tmp_path / "vanilla.jsonl"))[0])  # fmt: skip
    assert max(abs(g[-1] / w[-1] - 1) for g, w in zip(other, losses, strict=True)) > 1e-3
    # A TP 2 + SP checkpoint (sinks split by head) resumes at TP 1 as the unbroken run.
    ckpt = str(tmp_path / "ckpt")
    world2.run(_train, OSS + LAYOUTS["TP2-SP"] + ["--save", ckpt, "--exit-interval", "4"],
               str(tmp_path / "a.jsonl"))  # fmt: skip
    resumed = _losses(world2.run(_train, OSS + ["--load", ckpt], str(tmp_path / "b.jsonl"))[0])
    _assert_close(resumed, losses[4:], 2e-5, "resumed at TP 1")
