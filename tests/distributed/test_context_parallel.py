"""The context-parallel split of TST batches against an unsplit reference (CP 2, gloo).

Each CP rank must hold exactly positions ``r`` and ``2 CP - 1 - r`` of the ``2 CP`` chunks
(megatron-core's load balancing), in both phases: whole bags of input ids, their target
bags, mask and global position ids. Reassembled, the two ranks' shares are the batch.
"""

from __future__ import annotations

import torch

from tst.data.batch import make_tst_batch
from tst.data.context_parallel import kept_positions, split_for_context_parallel

L, B = 8, 3


def _shares(bag: int) -> list:
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    chunk = torch.arange(B * bag * (L + 1)).reshape(B, -1) % 97
    batch = make_tst_batch(chunk, bag)
    positions = torch.arange(L).expand(B, -1)
    split, pos = split_for_context_parallel(batch, positions, group)
    dist.destroy_process_group(group)
    return [batch, positions, split, pos]


def test_split_matches_the_unsplit_batch(world2):
    for bag in (1, 4):  # recovery and superposition batches
        ranks = world2.run(_shares, bag)
        batch, positions = ranks[0][0], ranks[0][1]
        for rank, (_, _, split, pos) in enumerate(ranks):
            keep = kept_positions(L, 2, rank)
            assert keep.tolist() == (
                [rank * 2, rank * 2 + 1] + [(3 - rank) * 2, (3 - rank) * 2 + 1]
            )
            assert torch.equal(pos, positions[:, keep])
            assert torch.equal(split.targets, batch.targets[:, keep])
            assert torch.equal(split.loss_mask, batch.loss_mask[:, keep])
            ids = batch.input_ids.view(B, L, bag)[:, keep].reshape(B, -1)
            assert torch.equal(split.input_ids, ids)  # whole bags, never cut
        # Together the two ranks hold every position once.
        held = torch.cat([kept_positions(L, 2, r) for r in range(2)]).sort().values
        assert torch.equal(held, torch.arange(L))
