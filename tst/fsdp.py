"""PyTorch FSDP2 (``--use-torch-fsdp2``): megatron-core's wrapper with this trainer's gradients.

megatron-core's ``TorchFullyShardedDataParallel`` shards every transformer layer, the input
embedding and the model as a whole with ``torch.distributed.fsdp.fully_shard`` over the
data-parallel (x context-parallel) group: each rank keeps ``1/DP`` of every parameter (dim 0,
a ``DTensor``), all-gathers a layer's weights just before its forward and backward, and
reduce-scatters its gradients after the backward (ZeRO-3). Tensor parallelism stays inside
each shard; pipeline and expert parallelism are not supported (Megatron-LM's rules).

Two differences from megatron-core's DDP would change the update, and are closed here:

- FSDP2 *averages* gradients over the data-parallel ranks by default. This trainer's losses
  are sums, normalised once by the global batch's loss tokens (``calculate_per_token_loss``),
  so gradients must be *summed* over ranks, as megatron-core's DDP does then: each FSDP
  module's divide factor is set to 1 and its collectives to plain sums.
- ``finalize_model_grads`` divides the gradients by that token count through the wrapper's
  ``scale_gradients``, which megatron-core's base class leaves empty: here it scales each
  parameter's sharded gradient in place. (It also calls ``finish_grad_sync`` with a
  ``force_all_reduce`` argument the base class does not take, so megatron-core 0.16.1's
  FSDP2 wrapper cannot finish a step as it is.)

Collectives: per sharded module and micro-batch, an all-gather of its parameters in the
forward (and again in the backward with ``--torch-fsdp2-no-reshard-after-forward`` off) and
a reduce-scatter of its gradients, all on the data-parallel group.
"""

from __future__ import annotations

import torch

__all__ = [
    "SHARD_MARK",
    "check_checkpointable",
    "fsdp2_model_chunk",
    "is_sharded",
    "load_sharded_state",
    "mark_shards",
    "reduced_gradients",
    "reshard",
    "reshard_optimizer_state",
    "shard_loaded_main_params",
]


# The attribute mark_shards sets on each FSDP2 parameter's local shard: (DP size, DP rank).
SHARD_MARK = "_tst_fsdp2_shard"


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 ``DTensor`` (a parameter or its gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def reduced_gradients(chunk) -> list[torch.Tensor]:
    """This rank's reduced gradients of a wrapped model chunk: megatron-core DDP's gradient
    buffers (whole, or the distributed optimizer's reduce-scattered shards within them), or
    under FSDP2 each parameter's local gradient shard."""
    from megatron.core.distributed import TorchFullyShardedDataParallel

    if not isinstance(chunk, TorchFullyShardedDataParallel):  # megatron-core's DDP
        return [buffer.grad_data for buffer in chunk.buffers + chunk.expert_parallel_buffers]
    return [
        param.grad.to_local() if is_sharded(param.grad) else param.grad
        for param in chunk.module.parameters()
        if param.grad is not None
    ]


def _forget_meshes_of_earlier_groups() -> None:
    """Clear DTensor's sharding-propagation caches before a model is sharded.

    Two device meshes over the same ranks compare equal whatever process group they name,
    so an op's cached output sharding can hand a new run's gradients the mesh of a group an
    earlier run in this process destroyed ("Could not resolve the process group registered
    under the name N" at the gradient norm: seen with two FSDP2 runs in one process, as the
    tests and the functional sweep run them)."""
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()  # torch's Python cache and its C++ fast path's


def _copy_if_view(module, inputs, output):
    """An output that is a view (the embedding's after a tensor-parallel reduction over one
    rank or a transpose of one sample; the model's per-position losses of one sample)
    becomes a tensor of its own: FSDP2's pre-backward hook on a view is lost to an in-place
    op downstream (torch warns about it)."""
    if isinstance(output, torch.Tensor) and output._is_view():
        return output.clone()
    return output


def reshard(chunk: torch.nn.Module) -> None:
    """Every FSDP2 module of ``chunk`` back to its shards. A forward without a backward (an
    evaluation) leaves the gathered weights in place with
    ``--torch-fsdp2-no-reshard-after-forward``: a checkpoint would then see whole weights
    where it expects shards (measured: a bf16 run resumed 0.0008 nats off its unbroken run)."""
    from torch.distributed.fsdp import FSDPModule

    for module in chunk.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def mark_shards(chunk: torch.nn.Module) -> None:
    """Mark each FSDP2 parameter's local shard with its (DP size, DP rank) before the model's
    sharded state is built: megatron-core's checkpoint entries hold the bare shard, and the
    fused SwiGLU weight's entry must know it holds a row range of it, not a TP shard
    (:func:`tst.megatron_fixes` lays that entry out). Resharded first (:func:`reshard`)."""
    reshard(chunk)
    for param in chunk.parameters():
        if is_sharded(param):
            mesh = param.device_mesh
            setattr(param._local_tensor, SHARD_MARK, (mesh.size(), mesh.get_local_rank()))


def check_checkpointable(chunk: torch.nn.Module, gated_linear_unit: bool) -> None:
    """Refuse, at start, an FSDP2 layout whose shards megatron-core cannot write as sharded
    tensors: each rank's shard must be 1/DP of the parameter's rows exactly, and with SwiGLU
    the fused gate / up weight's shards must each lie in one half (an even DP size)."""
    from tst.errors import RunError

    for name, param in chunk.named_parameters():
        if not is_sharded(param):
            continue
        size = param.device_mesh.size()
        if size > 1 and param.shape[0] % size:
            raise RunError(
                f"--use-torch-fsdp2 at data-parallel size {size}: {name} has "
                f"{param.shape[0]} rows, which FSDP2 cannot split into {size} equal shards, "
                "and checkpoints (megatron-core's sharded tensors) need them equal: use a "
                "data-parallel size that divides every weight's first dimension"
            )
        fused = gated_linear_unit and "linear_fc1" in name
        if size > 1 and fused and size % 2:
            raise RunError(
                f"--use-torch-fsdp2 with --swiglu at data-parallel size {size}: each rank's "
                f"shard of {name} (the gate and up projections stacked) must lie within one "
                "of the two halves checkpoints store apart: use an even data-parallel size"
            )


def load_sharded_state(chunk: torch.nn.Module, state: dict, strict: bool):
    """``chunk.load_state_dict(state, strict)`` for a model whose parameters are FSDP2
    shards: the checkpoint's entries for them are this rank's local shards (megatron-core's
    sharded tensors hold ``DTensor._local_tensor``), written into the shards; the rest load as
    usual. Returns ``load_state_dict``'s result, the shards counted as loaded."""
    own = chunk.state_dict(keep_vars=True)
    if not any(is_sharded(value) for value in own.values()):
        return chunk.load_state_dict(state, strict=strict)
    rest, written = {}, set()
    with torch.no_grad():
        for key, value in state.items():
            target = own.get(key)
            if target is None or not is_sharded(target):
                rest[key] = value
                continue
            shard = target._local_tensor
            if value is not shard:  # dist_checkpointing loads in place: usually the same
                shard.copy_(value)
            written.add(key)
    result = chunk.load_state_dict(rest, strict=False)
    result.missing_keys[:] = [k for k in result.missing_keys if k not in written]
    if strict and (result.missing_keys or result.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(chunk).__name__}: "
                           f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")  # fmt: skip
    return result


def _like(value, param):
    """``value`` (a plain tensor: this rank's shard, as a checkpoint gives it back) as a
    ``DTensor`` sharded as ``param`` is; anything else unchanged."""
    from torch.distributed.tensor import DTensor

    if (not is_sharded(param) or not isinstance(value, torch.Tensor) or is_sharded(value)
            or value.dim() == 0 or value.shape != param._local_tensor.shape):  # fmt: skip
        return value
    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())  # fmt: skip


def shard_loaded_main_params(optimizer, loaded: dict) -> None:
    """Before megatron-core's ``load_state_dict`` under FSDP2 with bf16: the checkpoint's
    fp32 main weights (``fp32_from_fp16_params``, this rank's shards as plain tensors) as
    ``DTensor`` like the main weights they are copied into (a plain tensor cannot be)."""
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    for inner, part in zip(inners, parts, strict=True):
        groups = getattr(inner, "fp32_from_float16_groups", None)
        key = next((k for k in ("fp32_from_fp16_params", "fp32_from_fp16") if k in part), None)
        if groups is None or key is None:
            continue
        # Paired by position, as megatron-core's load_state_dict pairs them; only FSDP2's
        # shards are touched (a DDP run's entries stay as they are).
        for group, saved_group in zip(groups, part[key], strict=False):
            for index, current in enumerate(group[: len(saved_group)]):
                if is_sharded(current):
                    saved_group[index] = _like(saved_group[index], current)


def reshard_optimizer_state(optimizer) -> None:
    """After a load, each FSDP2 parameter's optimizer state (Adam's moments) as a ``DTensor``
    like the parameter: torch's ``Optimizer.load_state_dict`` gives back the checkpoint's
    local shards as plain tensors, which an update of a ``DTensor`` cannot mix with."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param, state in inner.optimizer.state.items():
            for key, value in state.items():
                state[key] = _like(value, param)


def fsdp2_model_chunk(config, module: torch.nn.Module, reshard_after_forward: bool):
    """``module`` sharded over the data-parallel group by megatron-core's FSDP2 wrapper, with
    summed gradients and a working ``scale_gradients`` (see the module docstring)."""
    from megatron.core.distributed import TorchFullyShardedDataParallel
    from megatron.core.distributed.torch_fully_sharded_data_parallel_config import (
        TorchFullyShardedDataParallelConfig,
    )
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding,
    )
    from torch.distributed.fsdp import FSDPModule

    _forget_meshes_of_earlier_groups()
    for sub in module.modules():
        if sub is module or isinstance(sub, LanguageModelEmbedding):
            # Before fully_shard adds its hooks, so this runs first (see _copy_if_view).
            sub.register_forward_hook(_copy_if_view)

    class SummedGradientsFSDP2(TorchFullyShardedDataParallel):
        def __init__(self):
            fsdp_config = TorchFullyShardedDataParallelConfig(
                reshard_after_forward=reshard_after_forward
            )
            super().__init__(config=config, ddp_config=fsdp_config, module=module)
            for sub in self.module.modules():
                if isinstance(sub, FSDPModule):
                    # Summed (ReduceOp.SUM, no pre- or post-division; gloo has no
                    # PREMUL_SUM, and NCCL then needs none).
                    sub.set_gradient_divide_factor(1.0)
                    sub.set_force_sum_reduction_for_comms(True)

        def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
            # FSDP2 reduce-scattered each layer's gradients in its backward: nothing is left
            # to wait for. (megatron-core 0.16.1's finalize_model_grads passes
            # force_all_reduce, which its base class does not take.)
            pass

        def scale_gradients(self, scaling_factor: float) -> None:
            with torch.no_grad():
                for param in self.module.parameters():
                    if param.grad is not None:
                        param.grad.mul_(scaling_factor)

    return SummedGradientsFSDP2()
