"""Debugging dumps in Megatron-LM's layouts, so that its users' analysis scripts read them:
``--save-wgrads-interval`` / ``--save-dgrads-interval`` (0.16.1) and
``--save-params-interval`` / ``--save-activations-interval`` /
``--save-tokens-per-expert-interval`` (0.19).

Every N steps (counted from 1) the step's weight gradients (each parameter's ``main_grad``
after the data-parallel reduction, all-reduced even under the distributed optimizer so that
every rank holds them whole), its data gradients (what flows into and out of each linear
layer in the backward pass), its activations (each linear layer's and router's inputs,
keyword arguments and outputs in the forward pass), both of the step's last micro-batch, or
the weights after its optimizer step are written with ``torch.save`` to
``SAVE/{wgrads,dgrads,activations,params}/iter_NNNNNNN/mp_rank_TT[_PPP][_EEE].pth`` as
``{"model_chunk<i>": {name: tensor}}``, by the ranks of expert-data-parallel rank 0 (one
copy per model shard; the dense layers' tensors are repeated across expert-parallel ranks,
as in Megatron-LM). The tokens each MoE layer's local experts received, per micro-batch, are
appended as JSON lines to ``SAVE/tokens_per_expert/rank<R>.jsonl``:
``{"iter", "block": "decoder", "layer", "tpe": [[...], ...]}`` (``"block": "mtp"`` with
``"mtp_idx"`` for an MTP depth's layer); ``layer`` is the layer's index in its model chunk,
as Megatron-LM names it. Forwards that activation recomputation repeats in the backward
pass are not recorded again.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch

__all__ = ["ActivationRecorder", "DataGradRecorder", "TokensPerExpertRecorder", "parameters",
           "save_grads", "weight_grads"]  # fmt: skip


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


def _host(value):
    """A tensor's own copy on the host (a CPU tensor's ``.cpu()`` is itself); else as is."""
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


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
                grads[f"model_chunk{i}"][name] = _host(grad)
    return grads


class _Hooks:
    def __init__(self):
        self._handles = []

    def _attach(self, raw_chunks, types: tuple[type, ...], register) -> None:
        """``register(module, hook)`` on every module of ``types``, with this recorder's
        ``_hook("model_chunk<i>", module name)``."""
        for i, chunk in enumerate(raw_chunks):
            for name, module in chunk.named_modules():
                if isinstance(module, types):
                    self._handles.append(register(module, self._hook(f"model_chunk{i}", name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class DataGradRecorder(_Hooks):
    """Backward hooks on every linear layer recording the gradients of their inputs and
    outputs (``name/input<k>``, ``name/output<k>``); a later micro-batch overwrites an
    earlier one's, so the last one's are kept (Megatron-LM's rule)."""

    def __init__(self, raw_chunks):
        super().__init__()
        self.grads = defaultdict(dict)
        self._attach(raw_chunks, _linear_types(),
                     lambda module, hook: module.register_full_backward_hook(hook))  # fmt: skip

    def _hook(self, chunk: str, name: str):
        def hook(module, grad_input, grad_output):
            for kind, grads in (("output", grad_output), ("input", grad_input)):
                for k, grad in enumerate(grads):
                    if grad is not None:
                        self.grads[chunk][f"{name}/{kind}{k}"] = _host(grad)

        return hook


def parameters(raw_chunks) -> dict:
    """Each parameter's value on the host, per model chunk (--save-params-interval); under
    FSDP2 the sharded weight gathered whole (collective over the data-parallel group)."""
    from tst.fsdp import is_sharded

    params = defaultdict(dict)
    for i, chunk in enumerate(raw_chunks):
        for name, param in chunk.named_parameters():
            value = param.full_tensor() if is_sharded(param) else param
            params[f"model_chunk{i}"][name] = _host(value)
    return params


def _in_backward() -> bool:
    """Whether autograd's engine is running (a recomputed forward inside the backward)."""
    return torch._C._current_graph_task_id() != -1


class ActivationRecorder(_Hooks):
    """Forward hooks on every linear layer and router recording their inputs
    (``name/input<k>``), keyword arguments (``name/<key>``) and outputs
    (``name/output<k>``) as the layer computed them (before any other hook changes the
    output); a later micro-batch overwrites an earlier one's (Megatron-LM's rule)."""

    def __init__(self, raw_chunks):
        from megatron.core.transformer.moe.router import Router

        super().__init__()
        self.activations = defaultdict(dict)
        self._attach(raw_chunks, (*_linear_types(), Router),
                     lambda module, hook: module.register_forward_hook(
                         hook, with_kwargs=True, prepend=True))  # fmt: skip

    def _hook(self, chunk: str, name: str):
        def hook(module, args, kwargs, output):
            if _in_backward():
                return
            record = self.activations[chunk]
            for k, value in enumerate(args if isinstance(args, tuple) else (args,)):
                if value is not None:
                    record[f"{name}/input{k}"] = _host(value)
            for k, value in enumerate(output if isinstance(output, tuple) else (output,)):
                if isinstance(value, torch.Tensor):
                    record[f"{name}/output{k}"] = _host(value)
            for key, value in kwargs.items():
                record[f"{name}/{key}"] = _host(value)

        return hook


_DECODER_EXPERTS = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts")
_MTP_EXPERTS = re.compile(r"mtp\.layers\.(\d+)\.transformer_layer\.mlp\.experts")


class TokensPerExpertRecorder(_Hooks):
    """Forward hooks on each MoE layer's experts recording, per micro-batch, how many tokens
    each of this rank's experts received (the experts' ``tokens_per_expert`` argument)."""

    def __init__(self, raw_chunks):
        super().__init__()
        self.records: dict[tuple, list[list[int]]] = defaultdict(list)
        for chunk in raw_chunks:
            for name, module in chunk.named_modules():
                decoder, mtp = _DECODER_EXPERTS.fullmatch(name), _MTP_EXPERTS.fullmatch(name)
                if decoder or mtp:
                    key = ("decoder", None, int(decoder.group(1))) if decoder else (
                        "mtp", int(mtp.group(1)), 0)  # fmt: skip
                    self._handles.append(module.register_forward_hook(self._hook(key),
                                                                      with_kwargs=True))  # fmt: skip

    def _hook(self, key: tuple):
        def hook(module, args, kwargs, output):
            if _in_backward():
                return
            counts = args[1] if len(args) > 1 else kwargs["tokens_per_expert"]
            self.records[key].append([int(c) for c in counts])

        return hook

    def save(self, save_dir: str, iteration: int) -> str | None:
        """Append the records as JSON lines to ``save_dir/tokens_per_expert/rank<R>.jsonl``
        (Megatron-LM's file and fields); the path, or None when nothing was recorded."""
        if not self.records:
            return None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        folder = os.path.join(save_dir, "tokens_per_expert")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{rank}.jsonl")
        lines = []
        # (block, MTP depth or None, layer): a block's keys all have an MTP depth or none.
        for (block, mtp_idx, layer), counts in sorted(self.records.items()):
            entry = {"iter": iteration, "block": block}
            if block == "mtp":
                entry["mtp_idx"] = mtp_idx
            lines.append(json.dumps({**entry, "layer": layer, "tpe": counts}) + "\n")
        with open(path, "a") as f:
            f.writelines(lines)
        return path
