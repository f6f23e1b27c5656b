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

Vocabulary. The trainer pads the vocabulary to a multiple of 128 x TP (the 128 is
``--make-vocab-size-divisible-by``). Padded ids never occur as inputs or targets; their
output rows only add to the softmax normaliser. The
export trims embedding and output rows back to the real vocabulary (``--vocab-size``, or
the tokenizer's size), so real-token logits are unchanged and sampling can never produce a
padded id; ``keep_padded_vocab=True`` keeps the training-time rows instead.

Besides the weights (``model.safetensors``, sharded above ``max_shard_bytes``) and
``config.json``, the folder gets the tokenizer files (copied as given) and
``tst_export.json``, which names the tokenizer type and files so that
``tools/generate.py`` rebuilds the tokenizer with :func:`tst.data.tokenizers.build_tokenizer`.

Memory and safety. The weights are written shard by shard from views of the loaded model,
so an export holds the model plus one shard. Everything is written to
``<output>.partial-<pid>`` and moved into ``<output>`` at the end: an export that dies
half-way leaves an earlier export in ``<output>`` intact.

Modules: :mod:`tst.export.loading` (checkpoint -> one TP=1 / PP=1 model),
:mod:`tst.export.mapping` (class, ``config.json``, weight names and layouts),
:mod:`tst.export.writer` (safetensors shards, tokenizer files, the export itself).
"""

from tst.export.common import EXPORT_INFO, ExportError
from tst.export.loading import (
    LoadedCheckpoint,
    config_from_dict,
    load_checkpoint,
    resolve_checkpoint,
    single_process_world,
)
from tst.export.mapping import hf_architecture, hf_config, hf_state_dict, hf_tensors
from tst.export.writer import (
    ExportResult,
    TokenizerSpec,
    convert,
    export_loaded,
    tokenizer_spec,
    write_safetensors,
)

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
    "hf_tensors",
    "load_checkpoint",
    "resolve_checkpoint",
    "single_process_world",
    "tokenizer_spec",
    "write_safetensors",
]
