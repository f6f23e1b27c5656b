"""megatron-core on a machine without CUDA: the patches that make it run on CPU over gloo.

megatron-core is written for GPUs and calls CUDA in a few dozen places that matter even
when no kernel does: tensors placed with ``device="cuda"`` or ``.cuda()``, pinned host
buffers, streams and events, the CUDA RNG state behind the tensor-parallel RNG tracker,
and ``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizer. Its
``torch.compile``'d fusions run as plain Python here (inductor's C++ compile costs more than a
small CPU run's training).

:func:`apply` patches exactly those, and only when CUDA is absent; on a GPU machine it
does nothing. The patches are narrow on purpose: a process-wide ``TorchFunctionMode``
would catch everything in one place, but it intercepts every op of every forward pass
(about 25% of step time on a tiny model). Instead, the megatron-core modules that
hard-code CUDA tensor placement see a thin ``torch`` stand-in whose factory functions
place tensors on the CPU; everywhere else ``torch`` is untouched.

Applying twice is harmless. The patches change library modules, so they are
process-wide by nature; :func:`apply` returns whether it patched anything.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types
from typing import Any

import torch

__all__ = ["DuplicatedLinear", "apply", "is_applied"]

_APPLIED_FLAG = "_tst_cpu_compat_applied"

# megatron-core modules that name the CUDA device in tensor factories or call `torch.cuda.*`
# directly (megatron-core 0.16.x). Each sees `_CpuTorch` in place of its `torch` global.
_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.fine_grained_activation_offload",  # its pinned host pool
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",  # --distribute-saved-activations' buffers
    "megatron.core.rerun_state_machine",
    "megatron.core.utils",
    "megatron.core.parallel_state",
)

_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand",
    "randn",
    "randint",
)


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device designation (str, int, torch.device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    return factory


class _NullStream:
    """Stands in for `torch.cuda.Stream` / `Event`: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True

    def record_event(self, *args, **kwargs):
        return _NullStream()


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as megatron-core sees it without CUDA: CPU RNG, no-op streams."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    Stream = _NullStream
    Event = _NullStream

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        torch.manual_seed(seed)


class _CpuTorch(types.ModuleType):
    """`torch` as a CUDA-hard-coding megatron-core module sees it: CPU placement."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)


def is_applied() -> bool:
    return getattr(torch, _APPLIED_FLAG, False)


def apply() -> bool:
    """Patch megatron-core and torch for CPU execution; a no-op where CUDA is available.

    Returns True when the patches are in place after the call (applied now or before).
    """
    if torch.cuda.is_available():
        return False
    if is_applied():
        return True

    # Tensor methods that name CUDA: stay on the CPU, never pin.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.Tensor.record_stream = lambda self, *args, **kwargs: None
    _original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        # megatron-core's optimizer compares `param.type()` against CUDA type names.
        if dtype is None and not kwargs:
            name = _original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return _original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    # Process-wide `torch.cuda` calls made outside the stand-in modules.
    cpu_cuda = _CpuCuda()
    torch.cuda.current_device = cpu_cuda.current_device
    torch.cuda.synchronize = cpu_cuda.synchronize
    torch.cuda.current_stream = cpu_cuda.current_stream
    torch.cuda.default_stream = cpu_cuda.current_stream  # the partial distributed optimizer's
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.stream = cpu_cuda.stream
    # Profiler ranges (megatron-core's combined 1F1B schedule marks every piece): no NVTX.
    for name in ("range_push", "range_pop", "mark"):
        setattr(torch.cuda.nvtx, name, lambda *args, **kwargs: None)

    cpu_torch = _CpuTorch()
    for module_name in _MODULES_WITH_CUDA_FACTORIES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch

    # The tensor-parallel RNG tracker keeps CUDA generator states: use the CPU generator.
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # With one generator for "CPU" and "CUDA", every fork changes the CPU state by design.
    logging.getLogger(tp_random.__name__).setLevel(logging.ERROR)

    patch_without_transformer_engine()
    _run_compiled_fusions_eagerly()
    _patch_moe_split_sizes_to_numpy()
    _patch_uneven_first_dim_collectives()
    _patch_pipeline_p2p_tags()
    _share_one_gloo_device()
    _place_exchanged_shards_on_cpu()
    _fsdp2_mesh_on_cpu()
    _hybrid_optimizer_on_cpu()
    setattr(torch, _APPLIED_FLAG, True)
    return True


def _compiled_original(value: Any) -> Any:
    """The plain function behind a ``torch.compile``-wrapped one (None for anything else)."""
    if isinstance(value, (staticmethod, classmethod)):
        inner = _compiled_original(value.__func__)
        return None if inner is None else type(value)(inner)
    if not isinstance(value, types.FunctionType):  # not a stand-in for a missing package
        return None
    original = getattr(value, "_torchdynamo_orig_callable", None)
    return original if isinstance(original, types.FunctionType) else None


def _run_compiled_fusions_eagerly() -> None:
    """megatron-core wraps its small fusions (the router's expert-bias update, the grouped
    experts' GLU, the bias + activation and bias + dropout fusions, ...) in
    ``megatron.core.jit.jit_fuser``, which is ``torch.compile``. Without CUDA, inductor writes
    and compiles C++ for each of them at its first call in every process and again for new
    shapes: seconds to a minute of g++ apiece, more than a small CPU run spends training, and
    no speed-up at these sizes. Here they run as the Python functions they wrap (the same
    ops, unfused); modules imported later get the no-op decorator. ``torch.compile`` outside
    megatron-core is untouched. (After ``import tst``, megatron-core's first import already
    leaves them uncompiled: ``tst.megatron_import``; this covers an earlier import.)"""
    import sys

    from megatron.core import jit

    if jit.jit_fuser is not torch.compile:
        return  # imported after ``import tst``: nothing was compiled (tst.megatron_import)
    jit.disable_jit_fuser()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "megatron.core" or name.startswith("megatron.core.")):
            continue
        namespace = vars(module)
        if namespace.get("jit_fuser") is torch.compile:
            module.jit_fuser = jit.noop_decorator  # closures decorated at construction time
        for attr, value in list(namespace.items()):
            original = _compiled_original(value)
            if original is not None:
                setattr(module, attr, original)
            elif isinstance(value, type) and value.__module__ == name:
                for key, member in list(vars(value).items()):
                    original = _compiled_original(member)
                    if original is not None:
                        setattr(value, key, original)


def prepare_persistent_writer() -> None:
    """``--use-persistent-ckpt-worker``: megatron-core's long-lived writer is a *spawned*
    process, which the patches above do not reach, and whose loop first calls
    ``torch.cuda.set_device(rank % device_count())``, dividing by zero without a GPU. Its
    loop (``tst.checkpointing.persistent_writer_loop``) calls this first, in that process:
    the writer reads tensors as the trainer does (``torch.cuda.synchronize`` and the like),
    and the device call is harmless."""
    apply()
    torch.cuda.set_device = lambda device: None
    torch.cuda.device_count = lambda: 1


def patch_without_transformer_engine() -> None:
    """Names and flags megatron-core 0.16.1 gets wrong when Transformer Engine is absent;
    needed wherever TE is absent, on a GPU too (idempotent).

    - MoE: the router reads ``moe_utils.te_general_gemm``, defined only under TE's guard.
    - Selective recomputation of ``layernorm`` / ``mlp`` / ``moe_act``:
      ``CheckpointWithoutOutput(fp8=False)`` sets ``self.fp8 = fp8 is not None`` (True), so
      its forward takes the FP8 path, which needs TE. Without TE nothing runs in FP8.
    - Multi-latent attention: ``isinstance(self.linear_proj, TELinear)`` with TE's stand-in
      (a mock instance, not a class) raises; a class nothing is an instance of answers False.
    - ``--moe-latent-size``: the MoE layer builds its two latent projections with
      ``TELinear(parallel_mode="duplicated")`` and asserts TE is present. Without TE they are
      :class:`DuplicatedLinear`, the same computation (``x W^T + b``, W whole on every
      tensor-parallel rank) with the same gradient reduction and checkpoint layout.
    """
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_layer, moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not moe_layer.HAVE_TE:
        moe_layer.TELinear = DuplicatedLinear
        # Read by the latent projections' assertion only: the other TE path of the MoE layer
        # (te_checkpoint) runs in FP8, which is refused without TE before any model is built.
        moe_layer.HAVE_TE = True
    if not isinstance(mla.TELinear, type):
        mla.TELinear = type("TELinearAbsent", (), {})
    cls = tp_random.CheckpointWithoutOutput
    if not getattr(cls, "_tst_no_fp8", False):
        original = cls.__init__

        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.fp8 = False

        cls.__init__ = __init__
        cls._tst_no_fp8 = True


class DuplicatedLinear(torch.nn.Module):
    """``TELinear(parallel_mode="duplicated")`` without Transformer Engine: ``y = x W^T + b``
    with W (``[out, in]``, TE's layout) whole on every tensor-parallel rank.

    As TE's: the weight is drawn under the data-parallel RNG stream (equal on every TP rank),
    its gradient is all-reduced over data parallelism and, under sequence parallelism (each
    TP rank then sees its own slice of the sequence), summed over the TP group too
    (megatron-core's ``sequence_parallel`` parameter attribute); the checkpoint holds one
    replicated tensor. ``forward`` returns ``(output, None)``: the bias is added, not returned.
    """

    def __init__(self, input_size: int, output_size: int, *, parallel_mode: str | None, config,
                 init_method, bias: bool, skip_bias_add: bool,
                 skip_weight_param_allocation: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name: str | None = None, tp_group=None, **unused):  # fmt: skip
        super().__init__()
        if parallel_mode != "duplicated" or skip_bias_add or skip_weight_param_allocation:
            raise NotImplementedError(
                "without Transformer Engine only a duplicated linear that adds its own bias is "
                f"available (got parallel_mode={parallel_mode!r}, skip_bias_add={skip_bias_add})"
            )
        if is_expert or tp_group is not None:
            raise NotImplementedError("a duplicated linear is neither an expert nor TP-split")
        from megatron.core.tensor_parallel.random import (
            get_cuda_rng_tracker,
            get_data_parallel_rng_tracker_name,
        )

        device = None
        if not config.use_cpu_initialization and torch.cuda.is_available():
            device = torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(
                torch.zeros(output_size, dtype=config.params_dtype, device=device)
            )
        if config.perform_initialization:
            tracker = get_cuda_rng_tracker()
            fork = (tracker.fork(get_data_parallel_rng_tracker_name())
                    if tracker.is_initialized() else contextlib.nullcontext())  # fmt: skip
            with fork:
                init_method(self.weight)
        for param in self.parameters():
            param.allreduce = True
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight, self.bias), None


def _patch_uneven_first_dim_collectives() -> None:
    """Uneven gathers / reduce-scatters over TP on gloo (MoE token dispatch with TP > 1).

    megatron-core gathers a different number of tokens from each TP rank with a list
    ``all_gather`` and scatters them back with a list ``reduce_scatter``; gloo refuses lists of
    unequal tensors. Gather: pad every part to the largest, gather, trim. Reduce-scatter:
    all-reduce the whole input, keep this rank's rows (more traffic, the same sums).
    """
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim
    if getattr(gather, "_tst_uneven", False):
        return

    def uneven(sizes) -> bool:
        return sizes is not None and len(set(int(n) for n in sizes)) > 1

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if not uneven(output_split_sizes):
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0)

    def reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        if not uneven(input_split_sizes):
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: torch.distributed.get_rank(group)])
        return total[start : start + sizes[torch.distributed.get_rank(group)]].contiguous()

    gather_along_first_dim._tst_uneven = True
    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _patch_moe_split_sizes_to_numpy() -> None:
    """gloo's all_to_all_single rejects split sizes given as tensors.

    The MoE alltoall dispatcher asks `maybe_move_tensor_to_cpu(..., as_numpy=True)` for its
    split sizes, which converts only CUDA tensors; on the CPU the tensor is returned as is.
    """
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# Tags for pipeline point-to-point messages: activations travel to the next stage, gradients
# to the previous one.
_FORWARD_TAG, _BACKWARD_TAG = 1, 2


def _patch_pipeline_p2p_tags() -> None:
    """Tag pipeline messages by direction so that gloo cannot pair them up wrongly.

    With PP=2 the previous and next stage are the same peer. In the interleaved schedule a
    rank then receives an activation and a gradient of one shape from one peer in the same
    batch; NCCL pairs them by posting order, but gloo pairs untagged messages first come,
    first served and can hand the gradient to the activation's buffer (seen: wrong losses
    from the third micro-batch on). Distinct tags per direction make the pairing exact.
    """
    from megatron.core.pipeline_parallel import p2p_communication

    dist = torch.distributed

    def batched_p2p_ops(
        *,
        tensor_send_prev,
        tensor_recv_prev,
        tensor_send_next,
        tensor_recv_next,
        group,
        prev_pipeline_rank,
        next_pipeline_rank,
    ):
        ops = []
        for tensor, fn, peer, tag in (
            (tensor_send_prev, dist.isend, prev_pipeline_rank, _BACKWARD_TAG),
            (tensor_recv_prev, dist.irecv, prev_pipeline_rank, _FORWARD_TAG),
            (tensor_send_next, dist.isend, next_pipeline_rank, _FORWARD_TAG),
            (tensor_recv_next, dist.irecv, next_pipeline_rank, _BACKWARD_TAG),
        ):
            if tensor is not None:
                ops.append(dist.P2POp(fn, tensor, peer, group, tag))
        return dist.batch_isend_irecv(ops) if ops else []

    p2p_communication._batched_p2p_ops = batched_p2p_ops


def _place_exchanged_shards_on_cpu() -> None:
    """``--ckpt-fully-parallel-load``: each data-parallel rank reads a share and the shards
    are exchanged; a shard this rank receives without having read it is allocated through
    ``ShardedTensor.init_data("cuda")`` (``dist_checkpointing.exchange_utils``), which the
    stand-in ``torch`` of that module does not reach. Measured: MoE at DP 4 / EP 2 (expert
    data parallelism 2) failed every resume ("Torch not compiled with CUDA enabled")."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    original = ShardedTensor.init_data

    def init_data(self, device, init_fn=torch.empty):
        return original(self, _cpu_device(device), init_fn)

    ShardedTensor.init_data = init_data


def _fsdp2_mesh_on_cpu() -> None:
    """``--use-torch-fsdp2``: megatron-core's wrapper builds its device mesh with
    ``DeviceMesh.from_group(group, "cuda")``; FSDP2 runs on the CPU over gloo with a "cpu"
    mesh (torch's own), so that module sees a ``DeviceMesh`` whose ``from_group`` maps the
    CUDA device type to the CPU."""
    from megatron.core.distributed import torch_fully_sharded_data_parallel as fsdp2

    mesh = getattr(fsdp2, "DeviceMesh", None)
    if mesh is None or getattr(mesh, "_tst_cpu", False):
        return

    class CpuDeviceMesh:
        _tst_cpu = True

        @staticmethod
        def from_group(group, device_type, *args, **kwargs):
            return mesh.from_group(group, "cpu" if device_type == "cuda" else device_type,
                                   *args, **kwargs)  # fmt: skip

    fsdp2.DeviceMesh = CpuDeviceMesh


def _hybrid_optimizer_on_cpu() -> None:
    """``--optimizer-cpu-offload``: megatron-core's ``HybridDeviceOptimizer`` splits the
    parameters by ``param.is_cuda`` (the first ``--optimizer-offload-fraction`` of the GPU
    ones get a host copy stepped by the CPU optimizer, the rest stay with the GPU one) and
    takes any parameter already on the host for such a copy, which it then cannot find
    (``KeyError``). Without CUDA the model's parameters play the GPU's part: the same split
    by count, each offloaded parameter copied to a tensor of its own (fp32 where the
    parameter is not, as upstream), so the copies, the hooks that write the weights back and
    the state kept per part run as on a GPU, between two CPU tensors. State loaded into the
    "GPU" part stays where it is (upstream moves it to ``cuda``)."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    def split(self, offload_fraction):
        params = [param for group in self.param_groups for param in group["params"]]
        budget = sum(param.numel() for param in params) * offload_fraction
        offloaded = 0
        host_groups, device_groups = [], []
        to_host, to_device, to_fp32 = {}, {}, {}
        for group in self.param_groups:
            host, device = {**group, "params": []}, {**group, "params": []}
            for param in group["params"]:
                inner, offload = param, offloaded < budget
                if offload:
                    inner = param.detach().clone()
                    offloaded += param.numel()
                if self.param_update_in_fp32 and inner.dtype != torch.float32:
                    inner = inner.detach().clone().float()
                    to_fp32[param] = inner
                if offload:
                    to_host[param], to_device[inner] = inner, param
                (host if offload else device)["params"].append(inner)
            host_groups += [host] if host["params"] else []
            device_groups += [device] if device["params"] else []
        return host_groups, device_groups, to_host, to_device, to_fp32

    HybridDeviceOptimizer._get_sub_optimizer_param_groups = split
    HybridDeviceOptimizer._move_new_state_to_right_device = lambda self: None


def _share_one_gloo_device() -> None:
    """Every gloo process group of a process on one transport device.

    torch gives each gloo group a device of its own, and each device a thread that wakes every
    10 ms whether or not anything is sent. megatron-core makes a few dozen groups per layout,
    so a rank held 40-50 such threads (a test world's rank, and a test process that set up
    layouts in turn, more): on a few cores, thousands of wake-ups a second that every rank
    of every run pays for in latency. A gloo device serves any number of groups (each pair
    of ranks is routed by its own sequence number), so the groups here share one, made as
    torch makes its own (the ``GLOO_SOCKET_IFNAME`` interfaces, else the host's address).
    A forked child that makes groups gets a device of its own: the parent's loop thread does
    not exist there.
    """
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_gloo_available() or getattr(c10d.ProcessGroupGloo, "_tst_shared_device", 0):
        return
    gloo = c10d.ProcessGroupGloo
    made: list = [None, []]  # the process that made the devices, and the devices

    def shared_devices() -> list:
        if made[0] != os.getpid():
            names = [n for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
            made[:] = [
                os.getpid(),
                [gloo.create_device(interface=n) for n in names]
                if names
                else [gloo.create_default_device()],
            ]
        return made[1]

    class SharedDeviceGloo(gloo):
        _tst_shared_device = True

        def __init__(self, store, rank, size, timeout=datetime.timedelta(minutes=30)):
            if isinstance(timeout, gloo._Options):  # the options overload: as given
                super().__init__(store, rank, size, timeout)
                return
            options = gloo._Options()
            options._devices = shared_devices()
            options._timeout = timeout
            options._threads = 2 * len(options._devices)  # torch's own count
            super().__init__(store, rank, size, options)

    SharedDeviceGloo.__name__ = SharedDeviceGloo.__qualname__ = "ProcessGroupGloo"
    c10d.ProcessGroupGloo = SharedDeviceGloo
