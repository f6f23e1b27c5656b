"""The spawned-world helper itself: results in rank order, child tracebacks, timeouts."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distributed import ProcessWorld, RankFailure


def _all_reduce_rank() -> tuple[int, int, float]:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return dist.get_rank(), dist.get_world_size(), value.item()


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank one says no")


def _hang_on_rank_zero() -> None:
    if dist.get_rank() == 0:
        time.sleep(60)


@pytest.mark.parametrize("size", [2, 4])
def test_runs_on_every_rank(world2, world4, size):
    world = world2 if size == 2 else world4
    results = world.run(_all_reduce_rank)
    total = size * (size + 1) / 2
    assert results == [(rank, size, total) for rank in range(size)]


def test_child_traceback_reaches_the_failure(world2):
    with pytest.raises(RankFailure, match=r"(?s)ranks \[1\].*ValueError: rank one says no"):
        world2.run(_fail_on_rank_one)
    assert world2.closed  # a failed world is not reused: peers may be mid-collective


def test_a_hang_times_out():
    world = ProcessWorld(2, timeout_s=5)
    try:
        with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish"):
            world.run(_hang_on_rank_zero)
    finally:
        world.close(force=True)
