"""megatron-core GPT / MoE models with the bag embedding wired in.

The model is a megatron-core ``GPTModel`` (:class:`TSTGPTModel`, which only adds scoring of
target bags) built from a layer spec (Transformer Engine's where TE is importable and asked
for, the local PyTorch spec elsewhere), whose embedding is upgraded in place to
:class:`tst.embedding.BagEmbedding`. Parameter names, weight tying and the pipeline embedding
group are megatron-core's, so checkpoints and an exported model are an ordinary GPT. Called
without labels it returns vocab-parallel logits ``[b, L, V/tp]``; with target bags
``[b, L, slots]`` the last stage returns the phase's per-position loss ``[b, L]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention

from tst import megatron_fixes
from tst.attention import ContextParallelAttention, SDPAttention, use_sdpa
from tst.embedding import BagEmbedding

__all__ = [
    "ModelShape",
    "TSTGPTModel",
    "apply_phase",
    "build_gpt",
    "build_model_chunks",
    "transformer_engine_available",
]


def megatron_softmax_kernels_available() -> bool:
    """Whether megatron-core's fused scale-mask-softmax CUDA extensions are built here.

    The local spec's attention imports them when --masked-softmax-fusion is on (the default);
    the megatron-core wheel does not ship them (they come with Megatron-LM's or apex's build)."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                     "scaled_softmax_cuda")
    )  # fmt: skip


def transformer_engine_available() -> bool:
    """Whether Transformer Engine can be imported here (never on a CPU-only machine)."""
    return importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class ModelShape:
    """What GPTModel needs beyond TransformerConfig."""

    vocab_size: int  # padded so that it divides by TP
    max_sequence_length: int
    position_embedding_type: str = "learned_absolute"  # | "rope" | "none"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rotary_seq_len_interpolation_factor: int | None = None
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    untie_embeddings_and_output_weights: bool = False
    qk_layernorm: bool = False
    qk_l2_norm: bool = False
    normalization: str = "LayerNorm"
    num_experts: int | None = None
    moe_grouped_gemm: bool = False  # TE spec only
    use_transformer_engine: bool = False
    sdpa_attention: bool = False  # local spec: tst.attention.SDPAttention as core attention
    # --reset-attention-mask under Transformer Engine: self-attention built with an
    # arbitrary mask type, since TE's causal attention ignores the mask it is given.
    arbitrary_attention_mask: bool = False
    # --context-parallel-size > 1 on the local spec: tst.attention.ContextParallelAttention.
    context_parallel: bool = False

    @classmethod
    def from_config(
        cls,
        model,
        vocab_size: int,
        use_transformer_engine: bool,
        on_gpu: bool = False,
        context_parallel: bool = False,
    ) -> ModelShape:
        """The shape a :class:`tst.config.ModelConfig` describes, for a (padded) vocabulary,
        on a GPU or not (``--attention-backend auto`` picks the local spec's attention), with
        context parallelism or not."""
        return cls(
            vocab_size=vocab_size,
            max_sequence_length=model.max_position_embeddings,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            rotary_percent=model.rotary_percent,
            rotary_seq_len_interpolation_factor=model.rotary_seq_len_interpolation_factor,
            rope_scaling=model.use_rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
            qk_layernorm=model.qk_layernorm,
            qk_l2_norm=model.qk_l2_norm,
            normalization=model.normalization,
            num_experts=model.num_experts,
            moe_grouped_gemm=model.moe_grouped_gemm and use_transformer_engine,
            use_transformer_engine=use_transformer_engine,
            sdpa_attention=use_sdpa(
                model.attention_backend, use_transformer_engine, on_gpu, model, warn=False
            ),
            context_parallel=context_parallel and not use_transformer_engine,
        )


class TorchNorm:
    """megatron-core's torch-norm wrapper, also under sequence parallelism and with
    zero-centred weights.

    megatron-core's ``WrappedTorchNorm`` (the local spec's norm without apex) refuses
    ``sequence_parallel``, though nothing in a norm needs more than what megatron-core
    already does for its fused norms: each TP rank normalises its own slice of positions,
    and the weights, marked ``sequence_parallel``, get their partial gradients summed over
    TP by ``finalize_model_grads``. Same signature, same torch modules, same parameters.

    With ``--fp32-residual-connection`` the embedding output is fp32 while the weights are
    bf16 / fp16: the norm computes in fp32 and hands the next GEMM the weights' dtype, as the
    mixed-dtype fused norms of apex and Transformer Engine do (torch's refuse mixed dtypes).
    With ``--apply-layernorm-1p`` (``layernorm_zero_centered_gamma``) the weights start at 0
    and scale by ``1 + weight``, as apex's and Transformer Engine's norms do, so weight decay
    pulls the scale towards 1.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        kinds = {"LayerNorm": _LayerNorm, "RMSNorm": _RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"--normalization must be one of {sorted(kinds)}")
        norm = kinds[config.normalization](
            hidden_size, eps, config.layernorm_zero_centered_gamma, config.fp32_residual_connection
        )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _with_sequence_parallel_norms(spec, sdpa: bool = False, context_parallel: bool = False):
    """The local layer spec with megatron-core's torch norms replaced by :class:`TorchNorm`:
    the layer's two norms and MLA's latent norms (``q_layernorm`` / ``kv_layernorm``), which
    under sequence parallelism see only this rank's positions too, and the query / key norms
    (megatron-core's torch norm refuses sequence parallelism and zero-centred weights even
    where, as there, they change nothing of its parallel rules); MLA's local attention is
    :class:`LatentDotProductAttention`; with ``sdpa`` the other attention's core is
    :class:`tst.attention.SDPAttention`; with ``context_parallel`` either attention's core is
    :class:`tst.attention.ContextParallelAttention`."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def replaced(submodules, names):
        changes = {
            name: TorchNorm for name in names if getattr(submodules, name) is WrappedTorchNorm
        }
        return dataclasses.replace(submodules, **changes) if changes else submodules

    submodules = replaced(spec.submodules, ("input_layernorm", "pre_mlp_layernorm"))
    attention = submodules.self_attention
    if isinstance(attention.submodules, MLASelfAttentionSubmodules):
        mla = replaced(attention.submodules, ("q_layernorm", "kv_layernorm"))
        if context_parallel:
            mla = dataclasses.replace(mla, core_attention=ContextParallelAttention)
        elif mla.core_attention is DotProductAttention:
            mla = dataclasses.replace(mla, core_attention=LatentDotProductAttention)
        attention = dataclasses.replace(attention, submodules=mla)
        submodules = dataclasses.replace(submodules, self_attention=attention)
    else:
        # --qk-layernorm's norms (over each head's channels: megatron-core sums their
        # gradients over TP by name, sequence parallel or not).
        inner = replaced(attention.submodules, ("q_layernorm", "k_layernorm"))
        if context_parallel:
            inner = dataclasses.replace(inner, core_attention=ContextParallelAttention)
        elif sdpa and inner.core_attention is DotProductAttention:
            inner = dataclasses.replace(inner, core_attention=SDPAttention)
        attention = dataclasses.replace(attention, submodules=inner)
        submodules = dataclasses.replace(submodules, self_attention=attention)
    return dataclasses.replace(spec, submodules=submodules)


class LatentDotProductAttention(DotProductAttention):
    """megatron-core's local (unfused) attention, taking MLA's head sizes.

    ``MLASelfAttention`` builds its core attention with ``k_channels`` (query/key head size,
    ``qk_head_dim + qk_pos_emb_head_dim``) and ``v_channels`` (``v_head_dim``), which only
    Transformer Engine's attention accepts in megatron-core 0.16.1. The local forward
    already takes its sizes from the tensors; only the output width (heads x value head
    size) must follow ``v_channels``. MLA passes its own softmax scale (with YaRN's mscale).
    """

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            # [s, b, heads/tp x v_head_dim]: the context reshaped for the output projection.
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels


class _NormOptions:
    """The two options megatron-core's fused norms have and torch's lack: zero-centred
    weights (used as ``1 + weight``) and an fp32 input with weights of another dtype (the
    norm computes in fp32 and returns the weights' dtype)."""

    def _options(self, zero_centred: bool, fp32_input: bool) -> None:
        self.zero_centred, self.fp32_input = zero_centred, fp32_input
        if zero_centred:
            with torch.no_grad():
                self.weight.zero_()

    def _scale(self, dtype):
        weight = self.weight.to(dtype)
        return weight + 1 if self.zero_centred else weight

    def _compute_dtype(self, x):
        return torch.float32 if self.fp32_input else x.dtype


class _LayerNorm(_NormOptions, torch.nn.LayerNorm):
    def __init__(self, hidden_size, eps, zero_centred=False, fp32_input=False):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self._options(zero_centred, fp32_input)

    def forward(self, x):
        if not (self.zero_centred or self.fp32_input):
            return super().forward(x)
        dtype = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = torch.nn.functional.layer_norm(
            x.to(dtype), self.normalized_shape, self._scale(dtype), bias, self.eps
        )
        return out.to(self.weight.dtype) if self.fp32_input else out


class _RMSNorm(_NormOptions, torch.nn.RMSNorm):
    def __init__(self, hidden_size, eps, zero_centred=False, fp32_input=False):
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self._options(zero_centred, fp32_input)

    def forward(self, x):
        if not (self.zero_centred or self.fp32_input):
            return super().forward(x)
        dtype = self._compute_dtype(x)
        out = torch.nn.functional.rms_norm(
            x.to(dtype), self.normalized_shape, self._scale(dtype), self.eps
        )
        return out.to(self.weight.dtype) if self.fp32_input else out


def _block_norm():
    """The final norm megatron-core's block would use, with :class:`TorchNorm` for torch's."""
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    norm = transformer_block.LayerNormImpl
    return TorchNorm if norm is WrappedTorchNorm else norm


class TSTGPTModel(GPTModel):
    """``GPTModel`` whose labels may be target bags ``[b, L, slots]``.

    megatron-core hands ``compute_language_model_loss`` the logits as the output layer made
    them, ``[L, b, V/tp]``; scoring bags there (with ``tst_loss``, set per phase by the
    trainer) spares the transposed copy of the logits that returning them would cost.
    Plain ``[b, L]`` labels keep megatron-core's own loss; no labels return the logits.
    """

    tst_loss = None  # callable(logits [L, b, V/tp], targets [L, b, slots]) -> [L, b]
    # Built with an arbitrary attention mask type (ModelShape.arbitrary_attention_mask): a
    # forward without a mask attends causally, as the model built with a causal type would.
    arbitrary_attention_mask = False

    def _mask_or_causal(self, input_ids, position_ids, attention_mask):
        if attention_mask is not None or not self.arbitrary_attention_mask:
            return attention_mask
        # The positions this stage attends over (bag positions: the input ids of a bag
        # phase hold bag_size tokens per position).
        ref = position_ids if position_ids is not None else input_ids
        length = ref.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ref.device).triu(1)
        return causal.view(1, 1, length, length)

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        mask = self._mask_or_causal(input_ids, position_ids, attention_mask)
        return super().forward(input_ids, position_ids, mask, *args, **kwargs)

    def build_schedule_plan(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        mask = self._mask_or_causal(input_ids, position_ids, attention_mask)
        return super().build_schedule_plan(input_ids, position_ids, mask, *args, **kwargs)

    def compute_language_model_loss(self, labels, logits):
        if labels.dim() == 2 or self.tst_loss is None:
            return super().compute_language_model_loss(labels, logits)
        return self.tst_loss(logits, labels.transpose(0, 1)).transpose(0, 1).contiguous()

    mtp_stats = None  # [D, 2]: per MTP depth, the last forward's loss sum and positions

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                     rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None,
                     **kwargs):  # fmt: skip
        """With ``--mtp-num-layers``: the MTP depths score their targets (:mod:`tst.mtp`:
        the bag ``k + 1`` positions ahead in the superposition phase, the token ``k + 1``
        ahead in the recovery phase) in training; evaluation and logits-only calls run the
        main head alone. Without MTP: megatron-core's own."""
        if not self.config.mtp_num_layers:
            return super()._postprocess(
                hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos,
                rotary_pos_sin, mtp_in_postprocess=mtp_in_postprocess, loss_mask=loss_mask,
                **kwargs,
            )  # fmt: skip
        from tst.mtp import add_mtp_losses

        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        gather = kwargs.get("runtime_gather_output")
        # In training the MTP depths run (where the block is) and are scored (on the last
        # stage): with the block on an earlier pipeline rank (a layout's standalone m) that
        # rank sends their states on, stacked after the main ones, and the last stage,
        # without the block, scores them. Evaluation runs neither, on every stage alike.
        training = labels is not None and self.training
        run_mtp = training and self.mtp_process
        score_mtp = training and (self.mtp_process or self.config.mtp_standalone)
        # megatron-core passes mtp_in_postprocess=self.mtp_process, except its combined 1F1B
        # schedule (--overlap-moe-expert-parallel-comm): that runs the MTP depths as schedule
        # nodes of their own and hands their output here, stacked after the main hidden
        # states, with mtp_in_postprocess=False. Either way the depths' states get scored.
        if run_mtp and mtp_in_postprocess:
            hidden_states = self.mtp(
                input_ids=input_ids, position_ids=position_ids, hidden_states=hidden_states,
                attention_mask=kwargs.get("attention_mask"), rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                packed_seq_params=kwargs.get("packed_seq_params"),
                sequence_len_offset=kwargs.get("sequence_len_offset"), embedding=self.embedding,
                **(kwargs.get("extra_block_kwargs") or {}),
            )  # fmt: skip
        if not self.post_process:
            return hidden_states
        if score_mtp:
            hidden_states = add_mtp_losses(self, hidden_states, labels, loss_mask, output_weight,
                                           gather)  # fmt: skip
        logits, _ = self.output_layer(
            hidden_states, weight=output_weight, runtime_gather_output=gather
        )
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, L, V/tp]
        return self.compute_language_model_loss(labels, logits)


def layer_spec(shape: ModelShape, multi_latent_attention: bool = False):
    """The transformer-layer spec: TE's where asked for (and present), else the local one;
    with ``multi_latent_attention`` megatron-core's MLA attention in either."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if shape.use_transformer_engine:
        if not transformer_engine_available():
            raise RuntimeError(
                "Transformer Engine is not installed: drop --transformer-impl "
                "transformer_engine (and FP8 flags) or install transformer-engine on a GPU host"
            )
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=shape.num_experts,
            moe_grouped_gemm=shape.moe_grouped_gemm,
            qk_layernorm=shape.qk_layernorm,
            qk_l2_norm=shape.qk_l2_norm,
            multi_latent_attention=multi_latent_attention,
        )
    else:
        local = specs.get_gpt_layer_local_spec(
            num_experts=shape.num_experts,
            moe_grouped_gemm=False,
            qk_layernorm=shape.qk_layernorm,
            qk_l2_norm=shape.qk_l2_norm,
            multi_latent_attention=multi_latent_attention,
            normalization=shape.normalization,
        )
        spec = _with_sequence_parallel_norms(local, shape.sdpa_attention, shape.context_parallel)
    return _with_arbitrary_mask(spec) if shape.arbitrary_attention_mask else spec


def _with_arbitrary_mask(spec):
    """The layer spec whose self-attention takes the attention mask it is given as it is
    (``AttnMaskType.arbitrary``): a causal mask type lets Transformer Engine's attention and
    megatron-core's fused causal softmax ignore it. :class:`TSTGPTModel` then hands every
    forward a mask (the causal one where none is given)."""
    from megatron.core.transformer.enums import AttnMaskType

    attention = spec.submodules.self_attention
    params = {**attention.params, "attn_mask_type": AttnMaskType.arbitrary}
    attention = dataclasses.replace(attention, params=params)
    submodules = dataclasses.replace(spec.submodules, self_attention=attention)
    return dataclasses.replace(spec, submodules=submodules)


def build_gpt(
    config,
    shape: ModelShape,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
) -> torch.nn.Module:
    """One pipeline stage (or virtual stage) of a GPT model with a bag embedding.

    ``config`` is a megatron-core ``TransformerConfig``. The stage holds the embedding when
    ``pre_process`` and the output layer when ``post_process``.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    moe_layers = moe_layer_pattern(config)
    mla = bool(getattr(config, "multi_latent_attention", False))
    moe_spec = layer_spec(shape, mla)
    dense_spec = (
        layer_spec(dataclasses.replace(shape, num_experts=None), mla) if moe_layers else None
    )
    block = TransformerBlockSubmodules(
        layer_specs=[
            moe_spec if not moe_layers or moe_layers[offset + i] else dense_spec
            for i in range(count)
        ],
        layer_norm=_block_norm(),
    )
    model = TSTGPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
        position_embedding_type=shape.position_embedding_type,
        rotary_base=shape.rotary_base,
        rotary_percent=shape.rotary_percent,
        seq_len_interpolation_factor=shape.rotary_seq_len_interpolation_factor,
        rope_scaling=shape.rope_scaling,
        rope_scaling_factor=shape.rope_scaling_factor,
        vp_stage=vp_stage,
        mtp_block_spec=_mtp_spec(config, block if count else moe_spec, shape, vp_stage),
    )
    model.arbitrary_attention_mask = shape.arbitrary_attention_mask
    if pre_process or model.mtp_process:  # the MTP depths embed (bags of) their inputs too
        BagEmbedding.upgrade(model.embedding)
    if getattr(config, "use_mup", False):
        _apply_mup(model)
    megatron_fixes.mark_attention_sinks([model])  # split by head, as its checkpoint is
    return model


def _scale_logits(output_layer, args, output):
    """muP's logit multiplier on the output layer's ``(logits, bias)``: every head (the main
    one, the MTP depths', logits returned without labels) and every loss sees it."""
    logits, bias = output
    return logits * output_layer.config.mup_output_mult, bias


def _apply_mup(model) -> None:
    """Megatron-LM 0.19's muP marks: the embeddings and the output layer are
    ``is_embedding_parameter`` (base learning rate and eps, :mod:`tst.config_mup`), the
    logits are scaled by ``mup_output_mult``; the bag embedding scales its own output."""
    if hasattr(model, "embedding"):
        for param in model.embedding.parameters():
            param.is_embedding_parameter = True
    output_layer = getattr(model, "output_layer", None) if model.post_process else None
    if output_layer is None:
        return
    if output_layer.weight is not None:
        output_layer.weight.is_embedding_parameter = True
    if model.config.mup_output_mult != 1.0:
        output_layer.register_forward_hook(_scale_logits)


def _mtp_spec(config, block, shape: ModelShape, vp_stage):
    """The MTP block's spec on the stage that holds it (``--mtp-num-layers``), else None.

    Its layers copy the last decoder layer's spec (``block``, the stage's decoder block).
    A stage that holds the MTP block and no decoder layer (a pipeline layout's ``...|mL``)
    passes the model's layer spec instead (an MoE layer's where the model has experts), as
    Megatron-LM's model builder does: megatron-core reads the empty block's last layer and
    failed (IndexError)."""
    if not config.mtp_num_layers:
        return None
    from tst.mtp import mtp_block_spec

    return mtp_block_spec(config, block, shape.use_transformer_engine, _block_norm(), vp_stage)


def moe_layer_pattern(config) -> list[int] | None:
    """Per global layer, 1 where it is an MoE layer (``--moe-layer-freq``); None: all are.

    An int N makes every N-th layer MoE, starting with the first (Megatron-LM's rule).
    """
    from tst.config_moe import moe_layers

    if not config.num_moe_experts:
        return None
    pattern = moe_layers(config.moe_layer_freq, config.num_layers)
    return None if all(pattern) else pattern


def build_model_chunks(config, shape: ModelShape, vpp: int | None, device,
                       meta: bool = False) -> list:  # fmt: skip
    """This rank's model chunks: one per virtual pipeline stage (one when ``vpp`` is None).

    ``meta`` (``--init-model-with-meta-device``): the parameters are created on the meta
    device (megatron-core's initialisation then does nothing) and allocated on ``device``
    *uninitialised*: the caller must write every one (``initialize_layout_independent``).
    Tensors a module places explicitly (RoPE frequencies, router buffers, Transformer
    Engine's parameters) are built as usual and moved.
    """
    from megatron.core import parallel_state as ps

    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        with torch.device("meta") if meta else contextlib.nullcontext():
            chunk = build_gpt(
                config,
                shape,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
        chunks.append(chunk._apply(lambda t: (
            torch.empty_like(t, device=device) if t.is_meta else t.to(device))))  # fmt: skip
    megatron_fixes.mark_expert_parameters(chunks, config)  # before init and DDP read it
    megatron_fixes.defer_output_wgrad_only(chunks)
    megatron_fixes.drop_unused_mtp_output_weight(chunks)
    return chunks


def _unwrap(chunk):
    """The GPT model inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, TSTGPTModel) and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def apply_phase(model_chunks, phase, target_loss=None) -> None:
    """Put every chunk in ``phase``'s state: the first stage's embedding averages bags of
    ``phase.input_bag`` tokens; the last stage scores target bags with ``target_loss``
    (``callable(logits [L, b, V/tp], targets [L, b, slots]) -> [L, b]``, see
    :class:`TSTGPTModel`; None returns logits). The one place a phase reaches the model:
    every training step and every evaluation call it."""
    for chunk in model_chunks:
        model = _unwrap(chunk)
        embedding = getattr(model, "embedding", None)
        if isinstance(embedding, BagEmbedding):
            embedding.bag_size = phase.input_bag
        model.tst_loss = target_loss
