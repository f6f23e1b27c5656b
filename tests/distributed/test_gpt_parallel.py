"""A tiny megatron-core GPTModel (local spec) with the bag embedding and the multi-hot loss,
forward and backward through megatron-core's schedules at TP=2, PP=2 (1F1B), PP=2 with
virtual stages (interleaved) and TP=2 x PP=2, against the same model at TP=1, PP=1; and the
local spec's fused core attention (``tst.attention.SDPAttention``) at TP=2 and TP=2 x PP=2
against megatron-core's attention at TP=1, PP=1.

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


@pytest.mark.parametrize(
    "bag_size, sdpa, layouts",
    [(1, False, LAYOUTS), (3, False, LAYOUTS), (3, True, [(2, 1, None), (2, 2, None)])],
    ids=["recovery", "superposition", "superposition-fused-attention"],
)
def test_gpt_forward_backward_matches_across_layouts(world4, bag_size, sdpa, layouts):
    """With ``sdpa`` the sharded runs use the local spec's fused core attention (grouped
    query heads split over TP ranks) against the reference's megatron-core attention."""
    seed = fresh_seed()
    reference = world4.run(run_one_step, 1, 1, None, seed, bag_size)
    want_losses = _last_stage_losses(reference)
    want_norm = reference[0][1]
    assert want_norm > 0
    for tp, pp, vpp in layouts:
        results = world4.run(run_one_step, tp, pp, vpp, seed, bag_size, sdpa)
        got_losses = _last_stage_losses(results)
        label = f"TP={tp} PP={pp} VPP={vpp} bag={bag_size} sdpa={sdpa} seed={seed}"
        assert len(got_losses) == len(want_losses), label
        for got, want in zip(got_losses, want_losses, strict=True):
            assert got[1] == want[1], label
            assert got[0] == pytest.approx(want[0], rel=1e-5), label
        for _, norm in results:
            assert norm == pytest.approx(want_norm, rel=1e-4), label
