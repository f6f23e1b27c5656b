"""Megatron-LM's legacy checkpoint format (``--ckpt-format torch``): its weights, read.

This is what Megatron-LM's checkpoint converter writes (``tools/checkpoint/convert.py
--saver core``: a Hugging Face Llama, Qwen or Mixtral as megatron-core GPT weights) and what
Megatron-LM trained into before ``torch_dist``. Its layout::

    latest_checkpointed_iteration.txt   an iteration, or "release"
    iter_0000001/ (or release/)
        mp_rank_TT/model_optim_rng.pt           pipeline size 1
        mp_rank_TT_PPP/model_optim_rng.pt       pipeline size > 1
        mp_rank_TT[_PPP]_EEE/model_optim_rng.pt with expert parallelism

one folder per tensor (TT), pipeline (PPP) and expert (EEE) parallel rank, each a pickled
dict: ``model`` (``model0``, ``model1``, ... with virtual pipeline stages), the rank's
megatron-core module ``state_dict()`` (its own shards, its stage's layers numbered from 0),
and ``iteration``, ``checkpoint_version``, ``args``, maybe ``optimizer``, ``rng_state`` and
the LR scheduler's state. Files are per rank, so the checkpoint loads at the tensor /
pipeline / expert-parallel sizes it was saved at (any data-parallel size), as in
Megatron-LM. The weights only are read here: iteration, optimizer, LR schedule and data
position start fresh (``--finetune``, ``--pretrained-checkpoint``, or a "release"
checkpoint, which Megatron-LM loads that way too).

Reading never runs code from the file: it is unpickled with torch's ``weights_only``
loader, every class or function the file names (Megatron-LM's arguments hold enums and
functions) read as an inert stand-in. A Transformer Engine checkpoint's fused layer norms
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``) load
into the local spec's separate norms and back, by megatron-core's own key map; TE's
``_extra_state`` (FP8 scaling history) is not read: it starts fresh.
"""

from __future__ import annotations

import os
import re

import torch
from torch.distributed.tensor import distribute_tensor

from tst.errors import RunError
from tst.fsdp import is_sharded

FILE = "model_optim_rng.pt"
RELEASE = "release"
_FOLDER = re.compile(r"mp_rank_\d{2}(_\d{3}){0,2}$")
_LAYER = re.compile(r"^(.*?layers\.\d+\.)(.*)$")
_EXTRA = "._extra_state"


class LegacyCheckpointError(RunError):
    """A legacy checkpoint that cannot be read into this model; names the cause and fix (a
    checkpoint error: tst.checkpointing re-raises it as its CheckpointError)."""


def is_legacy(path: str) -> bool:
    """Whether checkpoint directory ``path`` is in the legacy format (per-rank folders)."""
    return os.path.isdir(path) and any(_FOLDER.match(name) for name in os.listdir(path))


def rank_folders(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if _FOLDER.match(name))


def folder_name(tp_rank: int, pp_rank: int, ep_rank: int, pp_size: int, ep_size: int) -> str:
    """The folder of one model-parallel rank (Megatron-LM's naming)."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    if ep_size > 1:
        name += f"_{ep_rank:03d}"
    return name


def check_grid(path: str, tp: int, pp: int, ep: int) -> None:
    """Refuse, naming the sizes, a checkpoint saved at another model-parallel layout."""
    have = rank_folders(path)
    want = sorted(
        folder_name(t, p, e, pp, ep) for t in range(tp) for p in range(pp) for e in range(ep)
    )
    if have != want:
        shown = ", ".join(have[:4]) + (f", ... ({len(have)} in all)" if len(have) > 4 else "")
        raise LegacyCheckpointError(
            f"checkpoint {path} is in Megatron-LM's legacy format, one file per model-parallel "
            f"rank ({shown}), which loads only at the sizes it was saved at; this run is at "
            f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp} "
            f"--expert-model-parallel-size {ep} and would read {len(want)} of them "
            f"({', '.join(want[:4])}{', ...' if len(want) > 4 else ''}): give the saved "
            "sizes, or reshard it with Megatron-LM's tools/checkpoint/convert.py "
            "(--target-tensor-parallel-size / --target-pipeline-parallel-size)"
        )


class _Unread:
    """What a class or function named in a legacy file reads as: nothing runs, nothing is
    kept (the weights are plain tensors and need none). Constructing, calling, or setting
    the state of one gives another. torch's ``weights_only`` reader calls only what it was
    given as allowed (this class), found by ``==``: an instance equals the class, so a
    stand-in returned by a call may be called in turn (``getattr(Class, name)(...)``)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(_Unread)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return _Unread()

    def __eq__(self, other):
        return other is _Unread or isinstance(other, _Unread)

    __hash__ = object.__hash__


def read(file: str) -> dict:
    """A legacy rank file's dict, unpickled without running any of its code (see the module's
    docstring); tensors are mapped from disk, not copied into memory."""
    import argparse

    if not os.path.isfile(file):
        raise LegacyCheckpointError(f"{file} is missing: restore it (the checkpoint is incomplete)")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception as error:
        raise LegacyCheckpointError(
            f"{file} is not a readable torch file ({type(error).__name__}: {error}): restore it"
        ) from None
    allowed = [(_Unread, name) for name in names if name != "argparse.Namespace"]
    # The context removes what it added on leaving: not what megatron-core registered.
    if argparse.Namespace not in torch.serialization.get_safe_globals():
        allowed.append(argparse.Namespace)
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        blocked = re.search(r"GLOBAL (\S+) whose module \S+ is blocked", str(error))
        if blocked:  # os, sys, subprocess, ...: no checkpoint names those
            raise LegacyCheckpointError(
                f"refused to read {file}: it would call {blocked.group(1)}, which no checkpoint "
                "needs (a tampered or foreign file?); nothing in it was run"
            ) from None
        raise LegacyCheckpointError(
            f"could not read {file} ({type(error).__name__}: {error}): restore it"
        ) from None
    if not isinstance(state, dict) or not any(k.startswith("model") for k in state):
        raise LegacyCheckpointError(
            f"{file} holds no model weights (no 'model' entry): it is not a Megatron-LM "
            "checkpoint file"
        )
    return state


def _layer_key_aliases() -> list[tuple[str, str]]:
    """(local spec prefix, Transformer Engine spec prefix) inside a transformer layer, from
    megatron-core's local GPT layer spec (the map its sharded state dict applies, which makes
    the two specs' torch_dist checkpoints interchangeable)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    return sorted(keys_map.items())


def _aliases(key: str, pairs: list[tuple[str, str]]) -> list[str]:
    """``key`` and the names the other layer spec gives the same tensor."""
    names = [key]
    match = _LAYER.match(key)
    if match:
        head, rest = match.groups()
        for local, te in pairs:
            if rest.startswith(local):
                names.append(head + te + rest[len(local) :])
            elif rest.startswith(te):
                names.append(head + local + rest[len(te) :])
    return names


def _listed(keys, most: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:most]) + (f", ... ({len(keys)} in all)" if len(keys) > most else "")


def load_chunk(chunk: torch.nn.Module, saved: dict, where: str) -> None:
    """Copy the weights of one legacy model entry ``saved`` into ``chunk`` (a megatron-core
    model chunk), every tensor checked by name and shape; ``where`` names the file and entry
    in errors."""
    pairs = _layer_key_aliases()
    own = chunk.state_dict()
    taken: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, wrong = [], []
    for key, value in own.items():
        if key.endswith(_EXTRA):
            continue  # TE's FP8 metadata, or None for megatron-core's own layers: not read
        name = next((n for n in _aliases(key, pairs) if n in saved), None)
        if name is None:
            missing.append(key)
            continue
        used.add(name)
        tensor = saved[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != value.shape:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            wrong.append(f"{name} {shape} (this model: {list(value.shape)})")
            continue
        taken[key] = tensor
    unused = [k for k in saved if k not in used and not k.endswith(_EXTRA)]
    problems = []
    if missing:
        problems.append(f"this model's {_listed(missing)} are not in it")
    if unused:
        problems.append(f"it holds {_listed(unused)}, which this model does not have")
    if wrong:
        problems.append(f"shapes differ: {_listed(wrong, 3)}")
    if problems:
        raise LegacyCheckpointError(
            f"{where} does not fit this model: " + "; ".join(problems) + ". Give the model "
            "flags it was saved with (layers, hidden and FFN sizes, heads and query groups, "
            "--swiglu, --normalization, --untie-embeddings-and-output-weights, the tokenizer "
            "and --padded-vocab-size or --make-vocab-size-divisible-by for the padded "
            "vocabulary, biases, MoE settings)"
        )
    with torch.no_grad():
        for key, tensor in taken.items():
            target = own[key]
            if is_sharded(target):  # --use-torch-fsdp2: this rank's rows of the TP shard
                tensor = distribute_tensor(
                    tensor, target.device_mesh, target.placements, src_data_rank=None
                )  # fmt: skip (every rank read it)
                target, tensor = target._local_tensor, tensor.to_local()
            target.copy_(tensor)


def load(path: str, chunks, tp_rank: int, tp: int, pp_rank: int, pp: int, ep_rank: int,
         ep: int) -> dict:  # fmt: skip
    """Load this rank's weights of legacy checkpoint directory ``path`` into ``chunks`` (its
    model chunks, one per virtual pipeline stage); return the file's iteration and what else
    it holds (``{"iteration", "checkpoint_version", "optimizer"}``)."""
    check_grid(path, tp, pp, ep)
    file = os.path.join(path, folder_name(tp_rank, pp_rank, ep_rank, pp, ep), FILE)
    state = read(file)
    version = state.get("checkpoint_version", 0)
    if not isinstance(version, (int, float)) or version < 3.0:
        raise LegacyCheckpointError(
            f"{file} is checkpoint version {version}: this trainer reads version 3.0 (Megatron-LM "
            "since 2020; older ones order the query/key/value weights differently): load and "
            "save it once with Megatron-LM to update it"
        )
    entries = sorted(k for k in state if re.fullmatch(r"model\d*", k))
    want = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    if entries != want:
        raise LegacyCheckpointError(
            f"{file} holds {', '.join(entries)}; this run's {len(chunks)} model chunk(s) per "
            f"stage read {', '.join(want)}: give the --num-layers-per-virtual-pipeline-stage "
            "(or --num-virtual-stages-per-pipeline-rank) it was saved with"
        )
    for name, chunk in zip(want, chunks, strict=True):
        load_chunk(chunk, state[name], f"checkpoint {file} ({name!r})")
    iteration = state.get("iteration", 0)
    return {
        "iteration": iteration if isinstance(iteration, int) else 0,
        "checkpoint_version": version,
        "optimizer": "optimizer" in state,
    }
