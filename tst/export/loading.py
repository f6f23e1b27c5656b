"""Load a checkpoint of any TP / PP / VPP / EP layout into one TP=1 / PP=1 model."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tst import checkpointing
from tst.config import Config
from tst.export.common import ExportError
from tst.optim import NO_OFFLOAD


def config_from_dict(values: dict) -> Config:
    """The :class:`Config` saved in a checkpoint (``common["config"]``).

    Fields a newer or older version does not know are dropped; missing ones take defaults.
    """
    hints = typing.get_type_hints(Config)
    values = _upgrade(values)
    sections = {}
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        if not dataclasses.is_dataclass(cls):
            continue
        known = {g.name for g in dataclasses.fields(cls)}
        sections[f.name] = cls(**{k: v for k, v in values.get(f.name, {}).items() if k in known})
    return Config(**sections)


def _upgrade(values: dict) -> dict:
    """A config saved before the flags took Megatron-LM's meaning, read as it was trained.

    Such checkpoints used --num-query-groups without --group-query-attention (None: one
    group per head) and kept the logging flags in the run section.
    """
    model = dict(values.get("model", {}))
    if "group_query_attention" not in model:
        groups = model.get("num_query_groups")
        model["group_query_attention"] = groups is not None
        model["num_query_groups"] = groups or 1
    for key in ("add_position_embedding", "hidden_dropout", "attention_dropout"):
        if key not in model:  # older runs had no dropout and always a position embedding
            model[key] = {"add_position_embedding": True}.get(key, 0.0)
    data = dict(values.get("data", {}))
    if data.get("mock_data"):
        data["split"] = None  # older runs stored the default split with synthetic data
    log = dict(values.get("log", {}))
    for key, value in values.get("run", {}).items():
        log.setdefault(key, value)  # unknown keys are dropped by the section's filter
    return {**values, "model": model, "data": data, "log": log}


def resolve_checkpoint(load: str, iteration: int | None = None) -> tuple[str, int | None]:
    """``(directory, iteration)`` of the checkpoint to read.

    ``load`` is a ``--save`` root (its latest complete checkpoint, or ``iteration``) or one
    ``iter_XXXXXXX`` directory itself.
    """
    if os.path.isfile(os.path.join(load, "metadata.json")):
        if iteration is not None:
            raise ExportError(f"--load {load} is one checkpoint directory: drop --iteration")
        name = os.path.basename(os.path.normpath(load))
        digits = name.removeprefix("iter_")
        return load, int(digits) if digits.isdigit() else None
    if iteration is None:
        iteration = checkpointing.latest_iteration(load)
    path = checkpointing.checkpoint_dir(load, iteration)
    if checkpointing.legacy_checkpoint.is_legacy(path):
        raise ExportError(
            f"--load {load}: {path} is a Megatron-LM legacy checkpoint (mp_rank_* folders): the "
            "exporter reads this trainer's checkpoints; start a run from it (pretrain_tst.py "
            "--finetune) and export that, or convert it with Megatron-LM's tools"
        )
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ExportError(f"--iteration {iteration}: {path} is missing or incomplete")
    return path, iteration


def single_process_config(cfg: Config) -> Config:
    """``cfg`` laid out for one CPU/GPU process: TP = PP = EP = 1, local spec, no FP8."""
    parallel = dataclasses.replace(
        cfg.parallel,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None,
        num_virtual_stages_per_pipeline_rank=None,
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        pipeline_model_parallel_layout=None,
        account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=None,
        context_parallel_size=1,
        sequence_parallel=False,
        use_distributed_optimizer=False,
        overlap_param_gather=False,
        tp_comm_overlap=False,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
    )
    model = dataclasses.replace(cfg.model, transformer_impl="local")
    training = dataclasses.replace(
        cfg.training, fp8_format=None, fp8_param_gather=False, global_batch_size=None,
        rampup_batch_size=None, use_precision_aware_optimizer=False, **NO_OFFLOAD,
    )  # fmt: skip
    return dataclasses.replace(cfg, parallel=parallel, model=model, training=training)


@contextlib.contextmanager
def single_process_world(seed: int = 1234) -> Iterator:
    """A world of one process with megatron-core parallel state (TP = PP = 1).

    Yields the :class:`tst.platform.Layout`; tears the state (and a process group it
    created) down on exit, so megatron models built inside are only usable inside.
    """
    from tst.platform import initialize, shutdown

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise ExportError(
            f"WORLD_SIZE={world}: export and generation run as one process "
            "(python tools/..., not torchrun); the checkpoint is resharded on load"
        )
    layout = initialize(tp=1, pp=1, seed=seed)
    try:
        yield layout
    finally:
        shutdown(layout)


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into one TP=1 / PP=1 megatron-core ``GPTModel`` (eval mode)."""

    model: torch.nn.Module  # returns logits [b, L, padded_vocab_size]
    cfg: Config  # as saved (the training layout)
    transformer_config: typing.Any  # megatron-core TransformerConfig of ``model``
    path: str
    iteration: int | None
    padded_vocab_size: int


def load_checkpoint(load: str, layout, iteration: int | None = None) -> LoadedCheckpoint:
    """Rebuild the saved model at TP=1 / PP=1 and load its weights (not the optimizer).

    Needs megatron-core's parallel state for one process: call inside
    :func:`single_process_world`, passing the ``layout`` it yields.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_gpt
    from tst.plan import validate

    if not dist.is_initialized() or dist.get_world_size() != 1:
        raise ExportError("load_checkpoint needs a world of one: use single_process_world()")
    path, iteration = resolve_checkpoint(load, iteration)
    saved = checkpointing.saved_common_state(path)
    if "config" not in saved:
        raise ExportError(f"{path} holds no saved config (common['config']): not a tst checkpoint")
    cfg = config_from_dict(saved["config"])
    local = single_process_config(cfg)
    # The padded vocabulary depends on the training TP: read the saved embedding's shape.
    metadata = dist_checkpointing.load_tensors_metadata(path)
    embedding = metadata.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ExportError(f"{path} has no embedding.word_embeddings.weight: not a GPT checkpoint")
    padded = int(embedding.global_shape[0])
    plan = validate(local, 1, padded)
    config = transformer_config(local, plan, layout)
    m = local.model
    shape = ModelShape.from_config(m, padded, False)
    model = build_gpt(config, shape).to(layout.device)
    try:
        state = dist_checkpointing.load({"model0": model.sharded_state_dict()}, path)
    except Exception as error:  # name the checkpoint, then the cause
        raise ExportError(f"could not load the model from {path}: {error}") from error
    model.load_state_dict(state["model0"])
    model.eval()
    return LoadedCheckpoint(model, cfg, config, path, iteration, padded)


# ---------------------------------------------------------------- architecture and config
