"""Multi-token prediction (megatron-core's MTP block) under TST.

megatron-core's MTP block (DeepSeek-V3's sequential modules) runs after the decoder on the
last stage: depth ``k`` (1..D) combines position ``i``'s hidden state from depth ``k - 1``
with the input embedding of position ``i + k`` (``eh_proj`` of the two normed vectors), runs
one transformer layer and scores the shared output head. What it predicts, per phase:

- **Recovery phase** (``bag_size == 1``): the ordinary MTP target. The main head at position
  ``i`` predicts token ``i + 1``; depth ``k`` predicts token ``i + 1 + k``, with the input
  ids rolled ``k`` tokens (megatron-core's own rule).
- **Superposition phase** (``bag_size > 1``): the main head at position ``i`` predicts bag
  ``i + 1``; depth ``k`` predicts **bag** ``i + 1 + k``, scored with the phase's multi-hot
  loss (``--tst-loss``, the same slot weights), and its input embedding is the bag embedding
  (the mean of ``bag_size`` token embeddings) of the inputs rolled ``k`` **bags**.

In both phases the targets of depth ``k`` are the main targets ``[b, L, slots]`` rolled ``k``
positions, so position ``i`` of depth ``k`` carries position ``i + k``'s targets and loss mask;
the last ``k`` positions have no target ``k`` ahead and are masked. The rule is positional, so
it holds for every ``--tst-mode`` (input-only: bag inputs, one-token targets; output-only:
token inputs, bag targets) and every stage of a ``--tst-schedule``; with ``--tst-layout
paper`` the depths reuse the step's slot weights, counted on the main targets. Each depth's per-position
loss ``[b, L]`` (masked) joins the main loss through megatron-core's ``MTPLossAutoScaler``
with weight ``--mtp-loss-scaling-factor / D``; with per-token normalisation (always on here)
the step's objective is ``(sum main + factor / D * sum_k sum mtp_k) / (main positions)``, as
megatron-core defines it. The MTP depths are training heads: evaluation and generation run
the main head only. Under pipeline parallelism the block sits on the last stage, or on the
rank a --pipeline-model-parallel-layout puts its m's on (megatron-core's standalone MTP: that
rank sends the main and depth states on, stacked, and the last stage scores them), with its
own copy of the (bag) embedding, kept equal to the first stage's through the embedding group
(:func:`tst.plan.embedding_stages`); learned absolute positions are refused there (their
copy is not kept in step). Under context parallelism every roll crosses the CP ranks' chunk
boundaries (``roll_tensor`` with the CP group).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MultiTokenPredictionLayer,
    roll_tensor,
)
from megatron.core.utils import make_viewless_tensor

__all__ = [
    "BagMultiTokenPredictionLayer",
    "add_mtp_losses",
    "mtp_block_spec",
    "roll_positions",
    "take_mtp_stats",
]


def roll_positions(tensor: torch.Tensor, cp_group=None) -> torch.Tensor:
    """``[b, L, ...]`` -> the same with position ``i`` holding position ``i + 1``'s values and
    the last position zeroed (megatron-core's ``roll_tensor`` along the position dim)."""
    rolled, _ = roll_tensor(tensor, shifts=-1, dims=1, cp_group=cp_group)
    return rolled


class BagMultiTokenPredictionLayer(MultiTokenPredictionLayer):
    """megatron-core's MTP layer whose input ids roll by one **bag** when the embedding
    averages bags: ``input_ids [b, L * bag_size]`` shift ``bag_size`` tokens, so position
    ``i`` embeds bag ``i + 1`` (the last bag is zero ids: masked, it has no target). The
    position ids ``[b, L]`` roll one position in either phase, as upstream rolls them."""

    def _get_embeddings(self, input_ids, position_ids, embedding, hidden_states,
                        packed_seq_params=None):  # fmt: skip
        bag_size = getattr(embedding, "bag_size", 1)
        if bag_size == 1:
            return super()._get_embeddings(
                input_ids, position_ids, embedding, hidden_states, packed_seq_params
            )
        if packed_seq_params is not None:
            raise ValueError("multi-token prediction with bags does not take packed sequences")
        batch = input_ids.shape[0]
        bags = roll_positions(input_ids.view(batch, -1, bag_size), self.cp_group)
        input_ids = bags.view(batch, -1)
        position_ids = roll_positions(position_ids, self.cp_group)
        decoder_input = embedding(input_ids=input_ids, position_ids=position_ids)
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        return input_ids, position_ids, decoder_input, hidden_states


def mtp_block_spec(config, block, use_transformer_engine: bool, norm, vp_stage=None):
    """megatron-core's MTP block spec for this stage (None where it builds no MTP layer),
    with :class:`BagMultiTokenPredictionLayer` layers; ``block`` is the decoder's
    ``TransformerBlockSubmodules`` (the MTP layers copy its last layer's spec) and ``norm``
    replaces the local spec's torch norm (see :class:`tst.model.TorchNorm`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine, vp_stage=vp_stage)
    if spec is None:
        return None
    layers = []
    for layer in spec.layer_specs:
        sub = layer.submodules
        norms = {
            name: norm
            for name in ("enorm", "hnorm", "layer_norm")
            if getattr(sub, name) is WrappedTorchNorm
        }
        sub = dataclasses.replace(sub, **norms)
        layers.append(
            dataclasses.replace(layer, module=BagMultiTokenPredictionLayer, submodules=sub)
        )
    return dataclasses.replace(spec, layer_specs=layers)


def add_mtp_losses(model, hidden_states, labels, loss_mask, output_weight, runtime_gather_output):
    """Score the MTP depths and attach their losses; returns the main hidden states.

    ``hidden_states`` is the MTP block's output ``[(1 + D) * L, b, h]`` (main, then each
    depth; ``L / tp`` rows each under sequence parallelism); ``labels`` the main targets
    ``[b, L]`` or ``[b, L, slots]``; ``loss_mask [b, L]`` (None: all ones). Each depth's
    masked per-position loss is attached to the main hidden states with
    ``MTPLossAutoScaler`` (its gradient flows in the main loss's backward). Sets
    ``model.mtp_stats``: ``[D, 2]`` fp64, per depth the (unscaled) loss sum and the number
    of scored positions, detached, for logging.
    """
    config = model.config
    depths = config.mtp_num_layers
    chunks = torch.chunk(hidden_states, 1 + depths, dim=0)
    hidden_states = chunks[0]
    if loss_mask is None:
        loss_mask = torch.ones(labels.shape[:2], device=labels.device)
    scale = config.mtp_loss_scaling_factor / depths
    stats = torch.zeros(depths, 2, dtype=torch.float64, device=labels.device)
    for k in range(depths):
        logits, _ = model.output_layer(
            chunks[k + 1], weight=output_weight, runtime_gather_output=runtime_gather_output
        )
        labels = roll_positions(labels, model.cp_group)
        loss_mask = roll_positions(loss_mask, model.cp_group)
        loss = model.compute_language_model_loss(labels, logits) * loss_mask  # [b, L]
        count = loss_mask.sum()
        stats[k, 0], stats[k, 1] = loss.detach().sum(), count.detach()
        if not config.calculate_per_token_loss:
            loss = loss / count.clamp(min=1)
        hidden_states = MTPLossAutoScaler.apply(hidden_states, scale * loss)
    model.mtp_stats = stats
    return hidden_states


def take_mtp_stats(model) -> torch.Tensor | None:
    """The ``[D, 2]`` MTP statistics of ``model``'s last training forward (through DDP /
    Float16Module wrappers), cleared; None where none ran (another stage, evaluation)."""
    while not hasattr(model, "mtp_stats") and hasattr(model, "module"):
        model = model.module
    stats = getattr(model, "mtp_stats", None)
    if stats is not None:
        model.mtp_stats = None
    return stats
