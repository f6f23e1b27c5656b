"""Export a tst checkpoint to a Hugging Face ``transformers`` checkpoint.

Loading. A checkpoint saved under any TP / PP / VPP / EP layout is loaded into a
single-process TP=1 / PP=1 model: the model is rebuilt from the checkpoint's own config
(``common["config"]``) with megatron-core's local spec, and ``dist_checkpointing.load``
fills it from the global sharded tensors (it does the resharding; the optimizer is not
read). Checkpoints written with the Transformer Engine spec load too, since the local spec
maps its norm keys onto TE's (``sharded_state_dict_keys_map``) and TE's grouped experts
save in SequentialMLP's format.

Architectures. The model is an ordinary pre-norm RoPE / RMSNorm / SwiGLU GPT, so:

==========================  ===========================
tst model                   ``transformers`` class
==========================  ===========================
dense                       ``LlamaForCausalLM``
dense, ``--qk-layernorm``   ``Qwen3ForCausalLM``
MoE, ``--qk-layernorm``     ``Qwen3MoeForCausalLM``
MoE                         ``MixtralForCausalLM``
==========================  ===========================

Qwen3-MoE always normalises queries and keys, so an MoE model without ``--qk-layernorm``
goes to Mixtral, the same block without those norms. Routing matches megatron-core's: its
default (``moe_router_pre_softmax=False``, no top-k scaling) takes the top-k router logits
and a softmax over them, which equals a softmax over all experts renormalised over the
top-k (Mixtral; Qwen3-MoE with ``norm_topk_prob=true``). ``moe_router_pre_softmax=True``
(no renormalisation) is exported as Qwen3-MoE with ``norm_topk_prob=false``. What no
target class can express (learned positions, LayerNorm, biases, a non-gated MLP, shared
experts, ...) is refused with an :class:`ExportError` naming the flag.

Weight layouts (megatron-core, TP=1): ``linear_qkv.weight`` is ``[ng * (np/ng + 2) * hn, h]``
with, per query group, its ``np/ng`` query heads then one key head then one value head;
``linear_fc1.weight`` is ``[gate; up]`` (``[2 * ffn, h]``), the first half going through SiLU.
RoPE is the non-interleaved rotate-half form over the whole head, as in ``transformers``.

Vocabulary. The trainer pads the vocabulary to a multiple of 128 x TP. Padded ids never
occur as inputs or targets; their output rows only add to the softmax normaliser. The
export trims embedding and output rows back to the real vocabulary (``--vocab-size``, or
the tokenizer's size), so real-token logits are unchanged and sampling can never produce a
padded id; ``keep_padded_vocab=True`` keeps the training-time rows instead.

Besides the weights (``model.safetensors``, sharded above ``max_shard_bytes``) and
``config.json``, the folder gets the tokenizer files (copied as given) and
``tst_export.json``, which names the tokenizer type and files so that
``tools/generate.py`` rebuilds the tokenizer with :func:`tst.data.tokenizers.build_tokenizer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import typing
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tst import checkpointing
from tst.config import Config

__all__ = [
    "EXPORT_INFO",
    "ExportError",
    "ExportResult",
    "LoadedCheckpoint",
    "TokenizerSpec",
    "config_from_dict",
    "convert",
    "export_loaded",
    "hf_architecture",
    "hf_config",
    "hf_state_dict",
    "load_checkpoint",
    "resolve_checkpoint",
    "single_process_world",
    "tokenizer_spec",
]

EXPORT_INFO = "tst_export.json"
LLAMA, QWEN3, QWEN3_MOE, MIXTRAL = (
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)
_MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", QWEN3_MOE: "qwen3_moe", MIXTRAL: "mixtral"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked; the message names the flag or file."""


# ---------------------------------------------------------------- loading


def config_from_dict(values: dict) -> Config:
    """The :class:`Config` saved in a checkpoint (``common["config"]``).

    Fields a newer or older version does not know are dropped; missing ones take defaults.
    """
    hints = typing.get_type_hints(Config)
    sections = {}
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        known = {g.name for g in dataclasses.fields(cls)}
        sections[f.name] = cls(**{k: v for k, v in values.get(f.name, {}).items() if k in known})
    return Config(**sections)


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
        expert_model_parallel_size=1,
        sequence_parallel=False,
        use_distributed_optimizer=False,
    )
    model = dataclasses.replace(cfg.model, transformer_impl="local")
    training = dataclasses.replace(cfg.training, fp8_format=None)
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

    from tst.config import validate
    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_gpt

    if not dist.is_initialized() or dist.get_world_size() != 1:
        raise ExportError("load_checkpoint needs a world of one: use single_process_world()")
    path, iteration = resolve_checkpoint(load, iteration)
    common = dist_checkpointing.load_common_state_dict(path)
    saved = common.get("common", common) if isinstance(common, dict) else None
    if not isinstance(saved, dict) or "config" not in saved:
        raise ExportError(f"{path} holds no saved config (common['config']): not a tst checkpoint")
    cfg = config_from_dict(saved["config"])
    local = single_process_config(cfg)
    # The padded vocabulary depends on the training TP: read the saved embedding's shape.
    metadata = dist_checkpointing.load_tensors_metadata(path)
    embedding = metadata.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ExportError(f"{path} has no embedding.word_embeddings.weight: not a GPT checkpoint")
    padded = int(embedding.global_shape[0])
    derived = validate(local, 1, padded)
    config = transformer_config(local, derived, layout)
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


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise ExportError(f"cannot export to Hugging Face: {message}")


def hf_architecture(cfg: Config, config) -> str:
    """The ``transformers`` class for this model; :class:`ExportError` if none fits.

    ``config`` is the model's megatron-core ``TransformerConfig`` (for settings that have
    no flag here but change the forward).
    """
    m = cfg.model
    _refuse(
        m.position_embedding_type != "rope",
        f"--position-embedding-type {m.position_embedding_type}: the targets use RoPE",
    )
    _refuse(m.normalization != "RMSNorm", f"--normalization {m.normalization}: need RMSNorm")
    _refuse(m.add_bias_linear, "--add-bias-linear: the targets have no linear biases")
    _refuse(not m.swiglu, "a GELU MLP: the targets need a gated SiLU MLP (--swiglu)")
    for name, ok in (
        ("rotary_interleaved", not config.rotary_interleaved),
        ("rotary_percent", getattr(config, "rotary_percent", 1.0) == 1.0),
        ("layernorm_zero_centered_gamma", not config.layernorm_zero_centered_gamma),
        (
            "apply_residual_connection_post_layernorm",
            not config.apply_residual_connection_post_layernorm,
        ),
        ("softmax_scale", config.softmax_scale is None),
        ("qk_l2_norm", not config.qk_l2_norm),
        ("attention_output_gate", not getattr(config, "attention_output_gate", False)),
        ("multi_latent_attention", not config.multi_latent_attention),
        ("glu_linear_offset", config.glu_linear_offset == 0.0),
        ("activation_func_clamp_value", config.activation_func_clamp_value is None),
    ):
        _refuse(not ok, f"megatron-core's {name}={getattr(config, name, None)!r}")
    if not m.num_experts:
        return QWEN3 if m.qk_layernorm else LLAMA
    _refuse(
        bool(m.moe_shared_expert_intermediate_size),
        "--moe-shared-expert-intermediate-size: Qwen3-MoE and Mixtral have no shared experts",
    )
    for name, ok in (
        ("moe_router_score_function", config.moe_router_score_function == "softmax"),
        ("moe_router_topk_scaling_factor", config.moe_router_topk_scaling_factor in (None, 1.0)),
        ("moe_router_num_groups", not config.moe_router_num_groups),
        ("moe_router_enable_expert_bias", not config.moe_router_enable_expert_bias),
        ("moe_expert_capacity_factor", config.moe_expert_capacity_factor is None),
        ("moe_input_jitter_eps", not config.moe_input_jitter_eps),
        ("moe_layer_freq", config.moe_layer_freq == 1),
        ("moe_router_load_balancing_type", config.moe_router_load_balancing_type != "sinkhorn"),
    ):
        _refuse(not ok, f"megatron-core's {name}={getattr(config, name)!r} (routing differs)")
    if m.qk_layernorm:
        return QWEN3_MOE
    # Mixtral renormalises over the top-k, which is megatron-core's default only.
    _refuse(
        config.moe_router_pre_softmax,
        "moe_router_pre_softmax without --qk-layernorm (Mixtral always renormalises; "
        "Qwen3-MoE, which does not have to, needs --qk-layernorm)",
    )
    return MIXTRAL


def hf_config(
    ckpt: LoadedCheckpoint,
    architecture: str,
    vocab_size: int,
    dtype: torch.dtype,
    eos_token_id: int | None,
) -> dict:
    """``config.json`` for ``architecture``; RoPE written both ways (v4 and v5 readers)."""
    m, c = ckpt.cfg.model, ckpt.transformer_config
    dtype_name = next(k for k, v in _DTYPES.items() if v == dtype)
    out = {
        "architectures": [architecture],
        "model_type": _MODEL_TYPES[architecture],
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.resolved_ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": c.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": c.layernorm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if architecture == LLAMA:
        out.update(mlp_bias=False, pretraining_tp=1)
    if architecture in (QWEN3, QWEN3_MOE):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    if architecture == QWEN3_MOE:
        out.update(
            num_experts=m.num_experts,
            num_experts_per_tok=m.moe_router_topk,
            moe_intermediate_size=c.moe_ffn_hidden_size,
            norm_topk_prob=not c.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            router_aux_loss_coef=m.moe_aux_loss_coeff,
        )
    if architecture == MIXTRAL:
        out.update(
            intermediate_size=c.moe_ffn_hidden_size,
            num_local_experts=m.num_experts,
            num_experts_per_tok=m.moe_router_topk,
            router_jitter_noise=0.0,
            sliding_window=None,
            output_router_logits=False,
            router_aux_loss_coef=m.moe_aux_loss_coeff,
        )
    return out


# ---------------------------------------------------------------- weights


def split_qkv(weight: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron-core ``linear_qkv.weight`` -> (q ``[np * hn, h]``, k, v ``[ng * hn, h]``).

    Rows come per query group: its ``np/ng`` query heads, one key head, one value head.
    Query head ``g * np/ng + j`` uses key/value head ``g``, as ``transformers``' GQA does.
    """
    per_group = heads // groups
    w = weight.view(groups, per_group + 2, head_dim, -1)  # [ng, np/ng + 2, hn, h]
    q = w[:, :per_group].reshape(heads * head_dim, -1)
    k = w[:, per_group].reshape(groups * head_dim, -1)
    v = w[:, per_group + 1].reshape(groups * head_dim, -1)
    return q, k, v


def split_gate_up(weight: torch.Tensor):
    """megatron-core SwiGLU ``linear_fc1.weight [2 * ffn, h]`` -> (gate, up), each ``[ffn, h]``."""
    gate, up = torch.chunk(weight, 2, dim=0)
    return gate, up


def _moe_weights(mlp, prefix: str, architecture: str) -> dict:
    from megatron.core.transformer.moe.experts import SequentialMLP

    if not isinstance(mlp.experts, SequentialMLP):
        raise ExportError(f"expected SequentialMLP experts, got {type(mlp.experts).__name__}")
    if architecture == MIXTRAL:
        block, names = "block_sparse_moe", ("w1", "w3", "w2")
    else:
        block, names = "mlp", ("gate_proj", "up_proj", "down_proj")
    out = {f"{prefix}{block}.gate.weight": mlp.router.weight}
    for e, expert in enumerate(mlp.experts.local_experts):
        gate, up = split_gate_up(expert.linear_fc1.weight)
        base = f"{prefix}{block}.experts.{e}."
        out[base + names[0] + ".weight"] = gate
        out[base + names[1] + ".weight"] = up
        out[base + names[2] + ".weight"] = expert.linear_fc2.weight
    return out


def hf_state_dict(
    ckpt: LoadedCheckpoint, architecture: str, vocab_size: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The ``transformers`` weights (hub key names), on CPU in ``dtype``, each its own storage.

    Experts use the per-expert hub names, which ``transformers`` >= 5 fuses on load.
    """
    model, m = ckpt.model, ckpt.cfg.model
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    head_dim = ckpt.transformer_config.kv_channels
    out = {"model.embed_tokens.weight": model.embedding.word_embeddings.weight[:vocab_size]}
    for i, layer in enumerate(model.decoder.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attention
        q, k, v = split_qkv(attn.linear_qkv.weight, heads, groups, head_dim)
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "self_attn.q_proj.weight"] = q
        out[p + "self_attn.k_proj.weight"] = k
        out[p + "self_attn.v_proj.weight"] = v
        out[p + "self_attn.o_proj.weight"] = attn.linear_proj.weight
        if m.qk_layernorm:
            out[p + "self_attn.q_norm.weight"] = attn.q_layernorm.weight
            out[p + "self_attn.k_norm.weight"] = attn.k_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.pre_mlp_layernorm.weight
        if m.num_experts:
            out.update(_moe_weights(layer.mlp, p, architecture))
        else:
            gate, up = split_gate_up(layer.mlp.linear_fc1.weight)
            out[p + "mlp.gate_proj.weight"] = gate
            out[p + "mlp.up_proj.weight"] = up
            out[p + "mlp.down_proj.weight"] = layer.mlp.linear_fc2.weight
    out["model.norm.weight"] = model.decoder.final_layernorm.weight
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = model.output_layer.weight[:vocab_size]
    # clone(): safetensors refuses tensors that share storage (q/k/v are views of one).
    return {k: v.detach().to("cpu", dtype).clone().contiguous() for k, v in out.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], output: str, max_shard_bytes: int) -> list:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(output, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(output, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return [*names, "model.safetensors.index.json"]


# ---------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """What :func:`tst.data.tokenizers.build_tokenizer` needs, with the files resolved."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None  # --vocab-size as trained (NullTokenizer's floor)

    def build(self):
        from tst.data.tokenizers import build_tokenizer

        return build_tokenizer(
            self.tokenizer_type,
            self.tokenizer_model,
            self.vocab_file,
            self.merge_file,
            self.vocab_size,
        )


def tokenizer_spec(
    cfg: Config,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
) -> TokenizerSpec:
    """The run's tokenizer, with files given here replacing the paths saved at training."""
    d = cfg.data
    return TokenizerSpec(
        d.tokenizer_type,
        tokenizer_model or d.tokenizer_model,
        vocab_file or d.vocab_file,
        merge_file or d.merge_file,
        d.vocab_size,
    )


def _copy_tokenizer(spec: TokenizerSpec, tokenizer, output: str, max_length: int) -> dict:
    """Copy the tokenizer files into ``output``; returns their names in ``output``."""
    kind = spec.tokenizer_type
    files: dict[str, str] = {}
    hf: dict = {
        "model_max_length": max_length,
        "add_bos_token": False,  # the trainer sees no BOS: documents are split by EOD only
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode(encode(text)) == text, as ours
    }
    if kind == "SentencePieceTokenizer":
        import sentencepiece as spm

        files["tokenizer_model"] = "tokenizer.model"
        shutil.copyfile(spec.tokenizer_model, os.path.join(output, "tokenizer.model"))
        sp = spm.SentencePieceProcessor(model_file=spec.tokenizer_model)
        # legacy=False: no extra dummy prefix after special tokens; transformers then encodes
        # as SentencePiece does, except runs of spaces at the very start of a text.
        hf.update(
            tokenizer_class="LlamaTokenizer", legacy=False, eos_token=sp.IdToPiece(tokenizer.eod)
        )
    elif kind in ("HuggingFaceTokenizer", "GPT2BPETokenizer"):
        if kind == "HuggingFaceTokenizer":
            source = spec.tokenizer_model or spec.vocab_file
            if os.path.isdir(source):
                source = os.path.join(source, "tokenizer.json")
            files["tokenizer_model"] = "tokenizer.json"
            shutil.copyfile(source, os.path.join(output, "tokenizer.json"))
        else:
            files.update(vocab_file="vocab.json", merge_file="merges.txt")
            shutil.copyfile(spec.vocab_file, os.path.join(output, "vocab.json"))
            shutil.copyfile(spec.merge_file, os.path.join(output, "merges.txt"))
        eos = _token_string(spec, tokenizer.eod)
        cls = "PreTrainedTokenizerFast" if kind == "HuggingFaceTokenizer" else "GPT2Tokenizer"
        hf.update(tokenizer_class=cls, eos_token=eos)
    else:  # NullTokenizer: UTF-8 bytes, no file; tst_export.json names it.
        return files
    with open(os.path.join(output, "tokenizer_config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return files


def _token_string(spec: TokenizerSpec, token_id: int) -> str:
    """The text of ``token_id`` in a tokenizer.json or GPT-2 vocab.json."""
    if spec.tokenizer_type == "GPT2BPETokenizer":
        with open(spec.vocab_file, encoding="utf-8") as f:
            return {v: k for k, v in json.load(f).items()}[token_id]
    from tokenizers import Tokenizer

    path = spec.tokenizer_model or spec.vocab_file
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path).id_to_token(token_id)


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    output: str
    architecture: str
    vocab_size: int  # rows written
    padded_vocab_size: int  # rows in the checkpoint
    files: tuple[str, ...]


def export_loaded(
    ckpt: LoadedCheckpoint,
    output: str,
    tokenizer: TokenizerSpec | None = None,
    keep_padded_vocab: bool = False,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> ExportResult:
    """Write ``ckpt`` to ``output`` as a ``transformers`` checkpoint (see the module doc).

    ``tokenizer`` defaults to the run's own (:func:`tokenizer_spec`); ``dtype`` (float32,
    bfloat16, float16) to the checkpoint's parameter dtype.
    """
    architecture = hf_architecture(ckpt.cfg, ckpt.transformer_config)
    spec = tokenizer or tokenizer_spec(ckpt.cfg)
    try:
        tok = spec.build()
    except (OSError, ValueError) as error:
        raise ExportError(
            f"the run's tokenizer could not be built ({error}): pass --tokenizer-model "
            "(and --vocab-file / --merge-file for GPT2BPETokenizer) with the files it was "
            "trained with"
        ) from error
    vocab = spec.vocab_size or tok.vocab_size  # what the trainer used (pretrain_tst.py's rule)
    if vocab > ckpt.padded_vocab_size:
        raise ExportError(
            f"the tokenizer has {vocab} ids but the checkpoint only {ckpt.padded_vocab_size} "
            "embedding rows: wrong --tokenizer-model for this checkpoint"
        )
    rows = ckpt.padded_vocab_size if keep_padded_vocab else vocab
    if dtype is None:
        torch_dtype = ckpt.model.embedding.word_embeddings.weight.dtype
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise ExportError(f"--dtype {dtype} is not one of {sorted(_DTYPES)}")
    os.makedirs(output, exist_ok=True)
    for name in os.listdir(output):  # shards of an earlier export would be read with ours
        if name.startswith("model") and ".safetensors" in name:
            os.remove(os.path.join(output, name))
    tensors = hf_state_dict(ckpt, architecture, rows, torch_dtype)
    files = write_safetensors(tensors, output, max_shard_bytes)
    config = hf_config(ckpt, architecture, rows, torch_dtype, tok.eod)
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer_files = _copy_tokenizer(spec, tok, output, ckpt.cfg.model.max_position_embeddings)
    info = {
        "architecture": architecture,
        "tokenizer_type": spec.tokenizer_type,
        "tokenizer_files": tokenizer_files,
        "vocab_size": vocab,
        "rows": rows,
        "padded_vocab_size": ckpt.padded_vocab_size,
        "seq_length": ckpt.cfg.model.seq_length,
        "source": {"checkpoint": os.path.abspath(ckpt.path), "iteration": ckpt.iteration},
        "config": ckpt.cfg.to_dict(),
    }
    with open(os.path.join(output, EXPORT_INFO), "w") as f:
        json.dump(info, f, indent=2, default=str)
    names = [*files, "config.json", *tokenizer_files.values(), EXPORT_INFO]
    if tokenizer_files:
        names.append("tokenizer_config.json")
    return ExportResult(output, architecture, rows, ckpt.padded_vocab_size, tuple(names))


def convert(
    load: str,
    output: str,
    iteration: int | None = None,
    tokenizer: TokenizerSpec | None = None,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    keep_padded_vocab: bool = False,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> ExportResult:
    """Load ``load`` (any layout) in a world of one and export it to ``output``."""
    with single_process_world() as layout:
        ckpt = load_checkpoint(load, layout, iteration)
        spec = tokenizer or tokenizer_spec(ckpt.cfg, tokenizer_model, vocab_file, merge_file)
        return export_loaded(ckpt, output, spec, keep_padded_vocab, dtype, max_shard_bytes)
