"""Context parallelism: each rank of a CP group keeps two of ``2 x CP`` sequence chunks.

megatron-core's load-balanced split (``get_batch_on_this_cp_rank``): the ``L`` positions
are cut into ``2 x CP`` equal chunks and CP rank ``r`` keeps chunks ``r`` and
``2 x CP - 1 - r``, so that under causal attention every rank has the same work. A TST
batch is split the same way in both phases: input ids ``[b, L * bag]`` in whole bags,
target bags ``[b, L, slots]``, the loss mask ``[b, L]`` and the position ids ``[b, L]``
(RoPE and learned positions need each kept position's global index).
"""

from __future__ import annotations

import torch

from tst.data.batch import TSTBatch

__all__ = ["split_for_context_parallel", "kept_positions"]


def kept_positions(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global indices of the positions CP rank ``cp_rank`` keeps, in order."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"--seq-length {seq_length} must be a multiple of 2 x CP = {2 * cp_size}")
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def split_for_context_parallel(
    batch: TSTBatch, position_ids: torch.Tensor, cp_group
) -> tuple[TSTBatch, torch.Tensor]:
    """This CP rank's share of a batch of either phase, by megatron-core's own splitter.

    ``input_ids`` hold ``bag_size`` tokens per position; a chunk of ``L / (2 CP)`` positions
    is ``bag_size`` times as many ids, so the split never cuts a bag.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    parts = get_batch_on_this_cp_rank(
        {
            "input_ids": batch.input_ids,
            "targets": batch.targets,
            "loss_mask": batch.loss_mask,
            "position_ids": position_ids,
        },
        cp_group=cp_group,
    )
    split = TSTBatch(parts["input_ids"], parts["targets"], parts["loss_mask"])
    return split, parts["position_ids"]
