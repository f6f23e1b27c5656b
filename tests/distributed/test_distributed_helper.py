"""The spawned-world helper itself: results in rank order, child tracebacks, timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
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


def _hang_on_rank_zero(pid_file: str | None = None) -> None:
    if dist.get_rank() == 0:
        if pid_file:  # something the rank started: it must not outlive the killed world
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            with open(pid_file, "w") as f:
                f.write(str(child.pid))
        time.sleep(60)


@pytest.mark.parametrize("size", [2, 4])
def test_runs_on_every_rank(world2, world4, size):
    world = world2 if size == 2 else world4
    results = world.run(_all_reduce_rank)
    total = size * (size + 1) / 2
    assert results == [(rank, size, total) for rank in range(size)]


def _gloo_loops_and_group_sums() -> tuple[int, list[float]]:
    """A TP 2 x PP 2 megatron-core layout (a few dozen groups): this rank's gloo transport
    threads, and an all-reduce over each of its groups against the sum of the group's ranks."""
    import os

    from megatron.core import parallel_state as ps

    from tst import platform

    platform.initialize(tp=2, pp=2)
    sums = []
    for group in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                  ps.get_data_parallel_group(), ps.get_model_parallel_group(),
                  ps.get_embedding_group()):  # fmt: skip
        value = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(value, group=group)
        want = sum(dist.get_process_group_ranks(group))
        sums.append(value.item() - want)
    names = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/comm") as f:
            names.append(f.read().strip())
    return names.count("gloo_tcp_loop"), sums


def test_every_gloo_group_shares_one_transport_device(world4):
    """tst.cpu_compat puts a process's gloo groups on one device: one transport thread per
    rank (torch's default is one per group, 40-50 per rank of a megatron-core layout, each
    waking every 10 ms), and every group still reduces over exactly its own ranks."""
    for loops, sums in world4.run(_gloo_loops_and_group_sums):
        assert sums == [0.0] * 5
        assert loops == 1, f"{loops} gloo transport threads in one rank"


def test_child_traceback_reaches_the_failure(world2):
    with pytest.raises(RankFailure, match=r"(?s)ranks \[1\].*ValueError: rank one says no"):
        world2.run(_fail_on_rank_one)
    assert world2.closed  # a failed world is not reused: peers may be mid-collective


def _exit_on_rank_one() -> None:
    if dist.get_rank() == 1:
        os._exit(3)


def test_a_rank_that_ends_fails_the_world_at_once(world2):
    """A rank that ends without answering (a crash, os._exit) is reported with its exit code
    when it ends, not as a hang when the timeout (here 10 minutes) runs out."""
    with pytest.raises(RankFailure, match=r"ranks \[1\] ended without an answer.*rank 1: 3;"):
        world2.run(_exit_on_rank_one, timeout_s=600)
    assert world2.closed


def test_a_hang_times_out_and_takes_what_the_rank_started_along(tmp_path):
    world = ProcessWorld(2, timeout_s=5)
    pid_file = str(tmp_path / "child.pid")
    try:
        with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish") as hung:
            world.run(_hang_on_rank_zero, pid_file)
        # What the hung rank was doing: its stack, the test body's frame in it.
        assert "rank 0, stacks at the timeout" in str(hung.value), hung.value
        assert "in _hang_on_rank_zero" in str(hung.value).split("stacks at the timeout")[1]
    finally:
        world.close(force=True)
    with open(pid_file) as f:
        child = int(f.read())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the rank's child {child} outlived the world"
        time.sleep(0.1)


def _forked_pair_sum(path: str, rank: int, queue) -> None:
    from torch.distributed import distributed_c10d as c10d

    store = dist.FileStore(path, 2)
    group = c10d.ProcessGroupGloo(store, rank, 2)
    value = torch.tensor([float(rank + 1)])
    group.allreduce([value]).wait()
    queue.put((rank, value.item()))


def test_a_forked_child_gets_a_gloo_device_of_its_own(tmp_path):
    """The shared device's transport thread lives in the process that made it: a forked
    child (a data worker, a multiprocessing pool) that makes groups must make its own device.
    With the parent's (measured, by caching the device across processes), the children's
    all-reduce never completes and the parent, whose loop thread gets their connections,
    dies of a segmentation fault."""
    import multiprocessing

    from torch.distributed import distributed_c10d as c10d

    from tst import cpu_compat

    cpu_compat.apply()
    parent = c10d.ProcessGroupGloo(dist.HashStore(), 0, 1)  # the parent's device is made
    assert parent.size() == 1
    fork = multiprocessing.get_context("fork")
    queue, path = fork.Queue(), str(tmp_path / "store")
    children = [fork.Process(target=_forked_pair_sum, args=(path, r, queue)) for r in (0, 1)]
    for child in children:
        child.start()
    try:
        results = sorted(queue.get(timeout=30) for _ in children)
    finally:
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()
    assert results == [(0, 3.0), (1, 3.0)]
