"""``--use-checkpoint-args``: the model flags a checkpoint was trained with, read back.

Megatron-LM 0.16.1's ``load_args_from_checkpoint``: with ``--use-checkpoint-args`` the
architecture comes from the checkpoint of ``--pretrained-checkpoint``, then of ``--load``
(the latter wins), so that an evaluation, a continued pretraining or a conversion script needs
only the checkpoint's path. Each field is taken either always ("forced": the attention and
MLP kinds, biases, norms, dropout, the MoE routing) or only where the command line does not
give it (the sizes, the sequence length, the vocabulary padding). With
``--use-mp-args-from-checkpoint-args`` the TP / PP / EP sizes come from it too, and the
tokenizer does unless ``--no-use-tokenizer-model-from-checkpoint-args``. A ``--load`` with no
checkpoint yet (a first launch) leaves the command line as it is, as Megatron-LM does.

This trainer's checkpoints hold the run's whole configuration in their common state
(``common["config"]``); Megatron-LM's (legacy or torch_dist) hold its arguments, read under
the same names. What is taken is printed, one line.
"""

from __future__ import annotations

import os

from tst.errors import ConfigError

__all__ = ["apply_checkpoint_args", "given_dests"]

# (section, field): taken always (True) or only where the command line does not give it.
MODEL_ARGS: dict[tuple[str, str], bool] = {
    ("model", "num_layers"): False,
    ("model", "hidden_size"): False,
    ("model", "ffn_hidden_size"): False,
    ("model", "seq_length"): False,
    ("model", "num_attention_heads"): False,
    ("model", "num_query_groups"): True,
    ("model", "group_query_attention"): True,
    ("model", "kv_channels"): False,
    ("model", "max_position_embeddings"): False,
    ("model", "position_embedding_type"): True,
    ("model", "add_position_embedding"): True,
    ("model", "rotary_base"): True,
    ("model", "rotary_percent"): True,
    ("model", "rotary_interleaved"): True,
    ("model", "add_bias_linear"): True,
    ("model", "add_qkv_bias"): True,
    ("model", "squared_relu"): True,
    ("model", "swiglu"): True,
    ("model", "untie_embeddings_and_output_weights"): True,
    ("model", "apply_layernorm_1p"): True,
    ("model", "normalization"): True,
    ("model", "apply_query_key_layer_scaling"): True,
    ("model", "attention_dropout"): True,
    ("model", "hidden_dropout"): True,
    ("model", "num_experts"): True,
    ("moe", "moe_layer_freq"): True,
    ("model", "moe_ffn_hidden_size"): True,
    ("model", "moe_router_topk"): True,
    ("model", "moe_token_dispatcher_type"): False,
    ("moe", "moe_router_pre_softmax"): True,
    ("model", "moe_grouped_gemm"): True,
    ("model", "moe_shared_expert_intermediate_size"): True,
    ("moe", "moe_router_score_function"): True,
    ("moe", "moe_router_enable_expert_bias"): True,
    ("moe", "moe_router_topk_scaling_factor"): True,
    ("model", "moe_latent_size"): True,
    # muP shapes the model's forward (its multipliers and attention scale): a muP checkpoint
    # continues as one (Megatron-LM 0.19 does not load these; its saved arguments hold them).
    ("mup", "use_mup"): True,
    ("mup", "mup_base_hidden_size"): True,
    ("mup", "mup_embedding_mult"): True,
    ("mup", "mup_output_mult"): True,
    ("mup", "mup_base_head_dim"): True,
    ("mup", "mup_attn_scale_power"): True,
    ("data", "tiktoken_pattern"): True,  # Megatron-LM takes it whatever the tokenizer flag
    # The padded vocabulary: given, or following from the next two (Megatron-LM's
    # checkpoints always hold it; this trainer's only where the run gave it).
    ("data", "padded_vocab_size"): False,
    ("data", "vocab_size"): False,
    ("data", "make_vocab_size_divisible_by"): False,
}
TOKENIZER_ARGS = {("data", "tokenizer_type"): True, ("data", "tokenizer_model"): True}
PARALLEL_ARGS = {
    ("parallel", "tensor_model_parallel_size"): True,
    ("parallel", "pipeline_model_parallel_size"): True,
    ("parallel", "num_layers_per_virtual_pipeline_stage"): False,
    ("parallel", "expert_model_parallel_size"): True,
}


def given_dests(parser, argv: list[str]) -> set[str]:
    """The ``section.field`` destinations the command line gives (abbreviations are off)."""
    tokens = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {a.dest for a in parser._actions if tokens & set(a.option_strings)}


def _saved_config(root: str, step: int | None, flag: str):
    """The Config saved in ``root``'s checkpoint (iteration ``step``, else the latest), or
    None while ``root`` holds no checkpoint."""
    from tst import checkpointing

    iteration = step if step is not None else checkpointing.find_checkpoint(root, flag)
    if iteration is None:
        return None, None
    path = checkpointing.checkpoint_dir(root, iteration)
    if checkpointing.legacy_checkpoint.is_legacy(path):
        return _megatron_args(path), path
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise ConfigError(f"--use-checkpoint-args: {path} is missing or incomplete")
    from tst.export.loading import config_from_dict

    saved = checkpointing.saved_common_state(path)
    if "config" not in saved and hasattr(saved.get("args"), "num_layers"):
        return _SavedArgs(saved["args"]), path  # saved by Megatron-LM: its arguments
    if "config" not in saved:
        raise ConfigError(
            f"--use-checkpoint-args: {path} holds no saved flags (common['config']), so it was "
            "not saved by this trainer: drop --use-checkpoint-args and give the model flags"
        )
    return config_from_dict(saved["config"]), path


class _SavedArgs:
    """Megatron-LM's saved arguments (an ``argparse.Namespace``) seen as this trainer's saved
    Config: every section reads the same flat namespace (the fields here carry Megatron-LM's
    names); an argument it lacks, or one that is not plain data, reads as not given."""

    _PLAIN = (bool, int, float, str, list, tuple, type(None))

    def __init__(self, args):
        self._args = args
        self.model = self.moe = self.data = self.parallel = self.mup = self

    def __getattr__(self, name):  # only for names not set above
        value = getattr(self._args, name, None)
        return value if isinstance(value, self._PLAIN) else None


def _megatron_args(path: str) -> _SavedArgs:
    """The arguments a Megatron-LM legacy checkpoint was saved with (its first rank file's
    ``args``)."""
    from tst import legacy_checkpoint

    folder = legacy_checkpoint.rank_folders(path)[0]
    file = os.path.join(path, folder, legacy_checkpoint.FILE)
    try:
        args = legacy_checkpoint.read(file).get("args")
    except legacy_checkpoint.LegacyCheckpointError as error:
        raise ConfigError(f"--use-checkpoint-args: {error}") from None
    if args is None or not hasattr(args, "num_layers"):
        raise ConfigError(
            f"--use-checkpoint-args: {file} holds no saved arguments: drop "
            "--use-checkpoint-args and give the model flags"
        )
    return _SavedArgs(args)


def apply_checkpoint_args(values: dict[str, dict], given: set[str]) -> None:
    """Overwrite ``values`` (section -> field -> value, as parsed) with the checkpoint's
    model flags, Megatron-LM's way (see the module's docstring)."""
    from tst import checkpointing

    run = values["run"]
    # The checkpoint the run resumes from, a newer non-persistent one too (Megatron-LM reads
    # the arguments through the same choice).
    load, _ = checkpointing.load_dir(run.get("load"), run.get("non_persistent_ckpt_type"),
                                     run.get("non_persistent_global_ckpt_dir"),
                                     run.get("ckpt_step"))  # fmt: skip
    roots = [("--pretrained-checkpoint", run.get("pretrained_checkpoint"), None),
             ("--load", load, run.get("ckpt_step"))]  # fmt: skip
    if not any(root for _, root, _ in roots):
        raise ConfigError(
            "--use-checkpoint-args reads the model flags from a checkpoint: give --load (or "
            "--pretrained-checkpoint)"
        )
    fields = dict(MODEL_ARGS)
    if run.get("use_tokenizer_model_from_checkpoint_args", True):
        fields.update(TOKENIZER_ARGS)
    if run.get("use_mp_args_from_checkpoint_args"):
        fields.update(PARALLEL_ARGS)
    taken = set(given)  # a field set from --pretrained-checkpoint counts as given for --load
    report = int(os.environ.get("RANK", "0")) == 0
    for flag, root, step in roots:
        if not root:
            continue
        saved, path = _saved_config(root, step, flag)
        if saved is None:
            if report:
                print(f"--use-checkpoint-args: no checkpoint in {flag} {root} yet: the "
                      "command line's model flags are used", flush=True)  # fmt: skip
            continue
        changed = []
        for (section, name), force in fields.items():
            dest = f"{section}.{name}"
            if not force and dest in taken:
                continue
            value = getattr(getattr(saved, section), name)
            if name == "moe_ffn_hidden_size" and saved.model.num_experts is None:
                value = None  # Megatron-LM clears it for a dense checkpoint
            elif value is None:
                continue  # the checkpoint does not give it: the command line's stays
            if values[section][name] != value:
                changed.append(f"{name}={value}")
            values[section][name] = value
            taken.add(dest)
        if report:
            what = ", ".join(changed) if changed else "the command line's values agree"
            print(f"--use-checkpoint-args: model flags from {path}: {what}", flush=True)
