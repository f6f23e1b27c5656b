"""Fixes for megatron-core 0.16.1 defects that are not about the device (applied on every
machine, once, when a run lays out its process groups).

``RowParallelLinear`` sends its output through ``reduce_from_tensor_model_parallel_region``,
a custom autograd Function that returns its input unchanged when the group has one rank.
autograd then treats the output as a view made inside a custom Function, and any in-place
change to it is refused. ``SequentialMLP`` experts with linear biases (``--num-experts``
with Megatron-LM's default biases, expert-parallel and expert-tensor-parallel sizes 1) add
the probability-weighted bias to that output in place (``megatron/core/transformer/mlp.py``),
so such a run died at its first step; with sequence parallelism and expert-TP 1 the
reduce-scatter does the same. With one rank both are the identity in both directions, so the
fix skips the Function there; with more ranks nothing changes.
"""

from __future__ import annotations

__all__ = ["apply"]

_APPLIED = "_tst_megatron_fixes_applied"


def apply() -> None:
    """Idempotent: patch the names ``megatron.core.tensor_parallel.layers`` calls."""
    from megatron.core.tensor_parallel import layers, mappings

    if getattr(layers, _APPLIED, False):
        return
    reduce = mappings.reduce_from_tensor_model_parallel_region
    reduce_scatter = mappings.reduce_scatter_to_sequence_parallel_region

    def reduce_from_tensor_model_parallel_region(input_, group=None):
        group = mappings.get_tensor_model_parallel_group_if_none(group)
        if group.size() == 1:  # the identity, forward and backward
            return input_
        return reduce(input_, group)

    def reduce_scatter_to_sequence_parallel_region(input_, group=None, **kwargs):
        group = mappings.get_tensor_model_parallel_group_if_none(group)
        if group.size() == 1 and kwargs.get("input_split_sizes") is None:  # the identity
            return input_
        return reduce_scatter(input_, group, **kwargs)

    layers.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region
    layers.reduce_scatter_to_sequence_parallel_region = reduce_scatter_to_sequence_parallel_region
    setattr(layers, _APPLIED, True)
