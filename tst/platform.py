"""Where and how a process runs: device, backend, megatron-core parallel state, seeds.

One entry point, :func:`initialize`, returns a :class:`Layout` value that describes this
rank's place in the TP x PP x DP (x EP) grid and holds the process groups. Callers pass
that value (or the groups in it) on explicitly; nothing in ``tst`` reads a global of its
own. megatron-core keeps its own module-level parallel state, which :func:`initialize`
fills and :func:`shutdown` clears.
"""

from __future__ import annotations

import datetime
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tst import cpu_compat, megatron_fixes

__all__ = [
    "Layout",
    "initialize",
    "reset_parallel_state",
    "seed_everything",
    "select_device",
    "set_group_timeouts",
    "shutdown",
]


@dataclass(frozen=True)
class Layout:
    """This rank's place in the parallel grid. Sizes multiply to the world size."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" on CUDA, "gloo" on CPU
    tp: int
    pp: int
    vpp: int | None  # virtual pipeline stages per rank (interleaved 1F1B); None when off
    dp: int
    ep: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    cpu_patched: bool  # megatron-core CPU compatibility patches are in place
    owns_process_group: bool = True  # initialize() created it (so shutdown() may destroy it)
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    ep_group: Any = None
    cp: int = 1  # context-parallel size: each CP rank holds 2 of 2 x CP sequence chunks
    cp_rank: int = 0
    cp_group: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        vpp = f" VPP={self.vpp}" if self.vpp else ""
        cp = f" CP={self.cp}" if self.cp > 1 else ""
        return (
            f"world={self.world_size} TP={self.tp} PP={self.pp}{vpp}{cp} DP={self.dp} EP={self.ep} "
            f"on {self.device.type} ({self.backend})"
        )


def select_device(local_rank: int = 0) -> tuple[torch.device, str]:
    """CUDA + NCCL where CUDA is present, CPU + gloo otherwise."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def _init_process_group(backend: str, device: torch.device, timeout_minutes: float) -> None:
    if dist.is_initialized():
        return
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    if "WORLD_SIZE" not in os.environ:
        # A plain `python script.py` is a world of one (torchrun/Slurm set the variables). Its
        # store lives in this process: no port to race for with other runs on the host, and
        # nothing for the processes this one starts to inherit.
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs
    )


def transformer_engine_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def initialize(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    ep: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 30.0,
    etp: int | None = None,
    cp: int = 1,
    gloo_groups: bool = True,
    order: str = "tp-cp-ep-dp-pp",
    distributed_optimizer_instances: int = 1,
    hierarchical_cp_sizes: list[int] | None = None,
    nccl_group_options: dict | None = None,
    embedding_stages: tuple[int, ...] | None = None,
) -> Layout:
    """Start (or join) the process group, set up megatron-core parallel state, seed RNGs.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them;
    without them the process is a world of one. Data parallelism takes what is left:
    ``dp = world_size / (tp * pp * cp)``; the expert grid is ETP x EP x PP x expert-DP
    (megatron-core's rule). The run plan (:func:`tst.plan.check_grid`) checks both before
    anything starts; these checks guard direct callers. ``order`` numbers the ranks
    (megatron-core's, fastest-varying first); ``distributed_optimizer_instances`` splits the
    data-parallel groups into that many partial groups the distributed optimizer shards over.
    ``embedding_stages``: the pipeline ranks whose word-embedding copies megatron-core keeps
    equal (:func:`tst.plan.embedding_stages`); None: its default, the first and the last.
    """
    for name, value in (("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(
            "virtual pipeline stages need --pipeline-model-parallel-size >= 2 and a positive "
            f"count, got PP={pp} VPP={vpp}"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, backend = select_device(local_rank)
    patched = cpu_compat.apply()
    megatron_fixes.apply()
    if not transformer_engine_importable():
        cpu_compat.patch_without_transformer_engine()
    owns_process_group = not dist.is_initialized()
    _init_process_group(backend, device, timeout_minutes)
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {tp * pp * cp}: launch a "
            "multiple of that many processes or change the parallel sizes"
        )
    dp = world // (tp * pp * cp)
    if world % ((etp or tp) * ep * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by ETP x EP x PP = {(etp or tp) * ep * pp}: "
            "change --expert-model-parallel-size / --expert-tensor-parallel-size"
        )

    from megatron.core import parallel_state as ps

    nccl = nccl_group_options or {}
    if nccl and backend != "nccl":
        if dist.get_rank() == 0:
            flags = ", ".join("--" + name.replace("_", "-") for name in nccl)
            warnings.warn(f"{flags} set NCCL communicators; this run's groups are {backend}: "
                          "ignored", stacklevel=2)  # fmt: skip
        nccl = {}
    reset_parallel_state()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        context_parallel_size=cp,
        hierarchical_context_parallel_sizes=hierarchical_cp_sizes,
        distributed_timeout_minutes=int(timeout_minutes),
        create_gloo_process_groups=gloo_groups,
        order=order,
        num_distributed_optimizer_instances=distributed_optimizer_instances,
        get_embedding_ranks=(
            None if embedding_stages is None
            else lambda pp_ranks: [pp_ranks[stage] for stage in embedding_stages]
        ),
        **nccl,
    )  # fmt: skip
    layout = Layout(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dp=dp,
        ep=ep,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        cpu_patched=patched,
        owns_process_group=owns_process_group,
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        cp=cp,
        cp_rank=ps.get_context_parallel_rank(),
        cp_group=ps.get_context_parallel_group(),
    )
    seed_everything(seed, layout)
    return layout


def seed_everything(seed: int, layout: Layout | None = None) -> None:
    """Seed Python, NumPy and torch, and megatron-core's tensor-parallel RNG tracker.

    The default generators get the same seed on every rank (megatron-core's CPU weight
    initialisation draws the full matrix on every rank and keeps its shard, so identical
    seeds make weights independent of the TP layout). The tracker gives TP ranks distinct
    dropout streams, as megatron-core does.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if layout is not None:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        # The tracker routes through the default generator on CPU: restore the common seed.
        torch.manual_seed(seed)


def reset_parallel_state() -> None:
    """Clear megatron-core's parallel state and destroy the groups it created.

    megatron-core's ``destroy_model_parallel`` forgets its groups without destroying them; a
    process that sets up layouts repeatedly (tests, tools) would keep every gloo group and its
    threads alive (seen: a thousand threads per rank after a test session).
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return
    ps.destroy_model_parallel()
    world = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world:
            dist.destroy_process_group(group)


def set_group_timeouts(seconds: float) -> None:
    """Every process group's collective timeout, from now on (Megatron-LM's
    --distributed-timeout-seconds-after-init): megatron-core's groups and the default one
    (the trainer's per-step all-reduce), after a barrier so that no collective is in flight."""
    global _WORLD_TIMEOUT_BEFORE
    dist.barrier()
    if _WORLD_TIMEOUT_BEFORE is None:  # put back by shutdown() where the group outlives the run
        _WORLD_TIMEOUT_BEFORE = _timeout_of(dist.group.WORLD)
    timeout = datetime.timedelta(seconds=seconds)
    for group in list(dist.distributed_c10d._world.pg_map):  # every live group of this rank
        _set_timeout(group, timeout)


_WORLD_TIMEOUT_BEFORE = None


def _backends(group) -> list:
    """The gloo / NCCL backends behind ``group``. (torch's own ``_set_pg_timeout`` checks
    their class, which the CPU layer's shared-device gloo subclass fails.)"""
    out = []
    for device in group._device_types:
        backend = group._get_backend(device)
        if hasattr(backend, "_set_default_timeout") and backend not in out:
            out.append(backend)
    return out


def _set_timeout(group, timeout: datetime.timedelta) -> None:
    for backend in _backends(group):
        backend._set_default_timeout(timeout)


def _timeout_of(group):
    """A group's collective timeout (its first backend's options), or None where unreadable."""
    for backend in _backends(group):
        options = getattr(backend, "options", None)
        if options is not None and hasattr(options, "_timeout"):
            return options._timeout
    return None


_THREADS_BEFORE_COLLECTING = 150


def shutdown(layout: Layout | None = None) -> None:
    """Tear down megatron-core parallel state, and the process group if ``initialize`` made it
    (else give it back the timeout it had before :func:`set_group_timeouts`)."""
    global _WORLD_TIMEOUT_BEFORE
    reset_parallel_state()
    if _WORLD_TIMEOUT_BEFORE is not None and dist.is_initialized():
        _set_timeout(dist.group.WORLD, _WORLD_TIMEOUT_BEFORE)
    _WORLD_TIMEOUT_BEFORE = None
    if dist.is_initialized() and (layout is None or layout.owns_process_group):
        dist.destroy_process_group()
    # Destroyed groups sit in reference cycles until a collection frees them with their gloo
    # threads (about 30 per layout): a process that sets up layouts repeatedly (a test world,
    # a loop of dry runs) would gather thousands of threads. A full collection costs as much
    # as a dry run's model build, so it runs once the threads pile up, not at every teardown.
    import gc
    import threading

    if threading.active_count() > _THREADS_BEFORE_COLLECTING:
        gc.collect()
