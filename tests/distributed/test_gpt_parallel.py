"""A tiny megatron-core GPTModel (local spec) with the bag embedding and the multi-hot loss,
forward and backward through megatron-core's schedules at TP=2, PP=2 (1F1B), PP=2 with
virtual stages (interleaved) and TP=2 x PP=2, against the same model at TP=1, PP=1.

Tolerances: loss sums agree to rtol 1e-5 and the squared gradient norm to rtol 1e-4 (the
same fp32 math summed in a different order across shards and stages).
"""

from __future__ import annotations

import pytest

from gpt_helpers import run_one_step
from test_losses import fresh_seed

LAYOUTS = [(2, 1, None), (1, 2, None), (1, 2, 2), (2, 2, None)]


def _last_stage_losses(results):
    losses = [sums for sums, _ in results if sums]
    assert all(entry == losses[0] for entry in losses[1:]) or len(losses) >= 1
    return losses[0]


@pytest.mark.parametrize("bag_size", [1, 3])
def test_gpt_forward_backward_matches_across_layouts(world4, bag_size):
    seed = fresh_seed()
    reference = world4.run(run_one_step, 1, 1, None, seed, bag_size)
    want_losses = _last_stage_losses(reference)
    want_norm = reference[0][1]
    assert want_norm > 0
    for tp, pp, vpp in LAYOUTS:
        results = world4.run(run_one_step, tp, pp, vpp, seed, bag_size)
        got_losses = _last_stage_losses(results)
        label = f"TP={tp} PP={pp} VPP={vpp} bag={bag_size} seed={seed}"
        assert len(got_losses) == len(want_losses), label
        for got, want in zip(got_losses, want_losses, strict=True):
            assert got[1] == want[1], label
            assert got[0] == pytest.approx(want[0], rel=1e-5), label
        for _, norm in results:
            assert norm == pytest.approx(want_norm, rel=1e-4), label
