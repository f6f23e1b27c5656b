"""tst/megatron_fixes.py: with one tensor-parallel rank the row-parallel reduction is the
identity without a custom autograd Function, so an in-place change to its output (what
megatron-core's biased experts do) is allowed, and values and gradients are unchanged."""

from __future__ import annotations

import torch

from tst.platform import initialize, shutdown


def test_tp1_reduction_is_a_plain_identity():
    layout = initialize(seed=1)
    try:
        from megatron.core.parallel_state import get_tensor_model_parallel_group
        from megatron.core.tensor_parallel import layers

        x = torch.randn(3, 4, requires_grad=True)
        y = layers.reduce_from_tensor_model_parallel_region(x * 2.0,
                                                            get_tensor_model_parallel_group())  # fmt: skip
        y += 1.0  # refused by autograd on the stock custom-Function view
        y.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 2.0))
        assert torch.allclose(y, x.detach() * 2.0 + 1.0)
    finally:
        shutdown(layout)
