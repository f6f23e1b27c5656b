"""``--save-wgrads-interval`` / ``--save-dgrads-interval``: gradient dumps for debugging,
in Megatron-LM 0.16.1's layout so that its users' analysis scripts read them.

Every N steps the step's weight gradients (each parameter's ``main_grad`` after the
data-parallel reduction, all-reduced even under the distributed optimizer so that every rank
holds them whole) or its data gradients (what flows into and out of each linear layer in the
backward pass, of the step's last micro-batch) are written with ``torch.save`` to
``SAVE/{wgrads,dgrads}/iter_NNNNNNN/mp_rank_TT[_PPP][_EEE].pth`` as
``{"model_chunk<i>": {name: tensor}}``, by the ranks of expert-data-parallel rank 0 (one
copy per model shard; the dense layers' gradients are repeated across expert-parallel ranks,
as in Megatron-LM).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

__all__ = ["DataGradRecorder", "save_grads", "weight_grads"]


def _linear_types() -> tuple[type, ...]:
    """The modules whose data gradients are recorded (Megatron-LM's list, and the replicated
    linear this trainer uses for the latent-MoE projections where TE is absent)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from tst.cpu_compat import DuplicatedLinear

    types = [torch.nn.Linear, torch.nn.Embedding, ColumnParallelLinear, RowParallelLinear,
             DuplicatedLinear]  # fmt: skip
    try:
        from megatron.core.extensions import transformer_engine as te
    except ImportError:
        return tuple(types)
    for name in ("TELinear", "TEColumnParallelLinear", "TERowParallelLinear",
                 "TELayerNormColumnParallelLinear", "TEGroupedLinear",
                 "TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear"):  # fmt: skip
        cls = getattr(te, name, None)
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


def save_grads(save_dir: str, grads: dict, iteration: int, label: str) -> str | None:
    """Write ``grads`` for ``iteration`` (1-based) under ``save_dir/label``; the path written,
    or None on ranks that do not write (expert-data-parallel rank > 0)."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_data_parallel_rank() != 0:
        return None
    folder = os.path.join(save_dir, label, f"iter_{iteration:07d}")
    os.makedirs(folder, exist_ok=True)
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    if ps.get_expert_model_parallel_world_size() > 1:
        name += f"_{ps.get_expert_model_parallel_rank():03d}"
    path = os.path.join(folder, f"{name}.pth")
    tmp = path + ".tmp"
    torch.save(dict(grads), tmp)
    os.replace(tmp, path)  # never a half-written file under the final name
    return path


def weight_grads(raw_chunks) -> dict:
    """Each parameter's reduced gradient (``main_grad``; under FSDP2 the sharded ``grad``
    gathered whole, collective over the data-parallel group), on the host, per model chunk."""
    from tst.fsdp import is_sharded

    grads = defaultdict(dict)
    for i, chunk in enumerate(raw_chunks):
        for name, param in chunk.named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None and param.grad is not None and is_sharded(param.grad):
                grad = param.grad.full_tensor()
            if grad is not None:
                grads[f"model_chunk{i}"][name] = grad.detach().cpu().clone()
    return grads


class DataGradRecorder:
    """Backward hooks on every linear layer recording the gradients of their inputs and
    outputs (``name/input<k>``, ``name/output<k>``); a later micro-batch overwrites an
    earlier one's, so the last one's are kept (Megatron-LM's rule)."""

    def __init__(self, raw_chunks):
        self.grads = defaultdict(dict)
        self._handles = []
        types = _linear_types()
        for i, chunk in enumerate(raw_chunks):
            for name, module in chunk.named_modules():
                if isinstance(module, types):
                    self._handles.append(
                        module.register_full_backward_hook(self._hook(f"model_chunk{i}", name))
                    )

    def _hook(self, chunk: str, name: str):
        def hook(module, grad_input, grad_output):
            for kind, grads in (("output", grad_output), ("input", grad_input)):
                for k, grad in enumerate(grads):
                    if grad is not None:
                        self.grads[chunk][f"{name}/{kind}{k}"] = grad.detach().cpu().clone()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
