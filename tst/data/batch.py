"""Raw token chunks -> TST batches: bag inputs, bag targets and a loss mask.

A superposition sample of ``L`` positions reads ``bag_size * L`` input tokens, folded into
``L`` contiguous bags; bag ``j`` predicts the tokens of bag ``j + 1``. Two chunk layouts:

``full`` (the default, :data:`FULL_BAG`)
    A chunk of ``bag_size * (L + 1)`` tokens. Every position, the last included, has a full
    target bag, so every position's loss has the same form and the same ``log(bag_size)``
    floor. It costs ``bag_size - 1`` extra raw tokens per sample, and megatron-core's
    ``GPTDataset`` serves it when asked for sequence length ``bag_size * (L + 1) - 1``.
``paper`` (:data:`PAPER`)
    A chunk of ``bag_size * L + 1`` tokens, as the paper builds it: the ordinary next-token
    labels shifted left by ``bag_size - 1`` and padded with ``ignore_index``, so the last
    position has a single valid target slot.

With ``bag_size == 1`` both layouts are ordinary next-token training on ``L + 1`` tokens,
which is also what the recovery phase uses. Shapes: chunk ``[b, n]`` -> input ids
``[b, L * bag_size]``, targets ``[b, L, bag_size]``, loss mask ``[b, L]``.

:func:`batch_for_phase` is what a training step calls: the rows the data stream serves for a
phase (:class:`tst.phases.Phase`) -> that phase's batch, for every mode and layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from tst.phases import Phase

__all__ = [
    "FULL_BAG",
    "PAPER",
    "TSTBatch",
    "batch_for_phase",
    "chunk_length",
    "document_positions_and_mask",
    "make_output_only_batch",
    "make_tst_batch",
]

FULL_BAG = "full"
PAPER = "paper"
_LAYOUTS = (FULL_BAG, PAPER)


class TSTBatch(NamedTuple):
    input_ids: torch.Tensor  # [b, L * bag_size] int64
    targets: torch.Tensor  # [b, L, bag_size] int64, ignore_index in empty slots
    loss_mask: torch.Tensor  # [b, L] float, 1 where a position has a valid slot


def chunk_length(seq_length: int, bag_size: int, layout: str = FULL_BAG) -> int:
    """Raw tokens a sample of ``seq_length`` positions reads: ``bag_size * (L + 1)`` or
    ``bag_size * L + 1``."""
    _check_layout(layout)
    if seq_length < 1 or bag_size < 1:
        raise ValueError(f"seq_length and bag_size must be >= 1, got {seq_length}, {bag_size}")
    if layout == FULL_BAG:
        return bag_size * (seq_length + 1)
    return bag_size * seq_length + 1


def make_tst_batch(
    chunk: torch.Tensor,
    bag_size: int,
    layout: str = FULL_BAG,
    ignore_index: int = -100,
    token_loss_mask: torch.Tensor | None = None,
) -> TSTBatch:
    """Fold raw token chunks ``[b, n]`` into a TST batch of ``L`` bag positions.

    ``n`` must be :func:`chunk_length` of some ``L`` for the layout. ``token_loss_mask``
    (optional, ``[b, n]``, 1 = keep) marks raw tokens that must not be predicted (for
    example EOD when a dataset masks it); their target slots become ``ignore_index``.
    """
    _check_layout(layout)
    if bag_size < 1:
        raise ValueError(f"bag_size must be >= 1, got {bag_size}")
    if chunk.dim() != 2:
        raise ValueError(f"chunk must be [batch, tokens], got shape {tuple(chunk.shape)}")
    batch, n = chunk.shape
    extra = bag_size if layout == FULL_BAG else 1
    if n <= extra or (n - extra) % bag_size != 0:
        raise ValueError(
            f"a chunk of {n} tokens does not fit bag_size={bag_size} in the {layout!r} layout: "
            f"it must be {'bag_size * (L + 1)' if layout == FULL_BAG else 'bag_size * L + 1'} "
            f"tokens for some L >= 1"
        )
    num_bags = (n - extra) // bag_size
    chunk = chunk.long()
    input_ids = chunk[:, : num_bags * bag_size]

    # Raw token t + bag_size is slot (t mod bag_size) of bag (t // bag_size)'s target:
    # bag j predicts tokens (j + 1) * bag_size .. (j + 2) * bag_size - 1.
    labels = chunk[:, bag_size:]
    if token_loss_mask is not None:
        if token_loss_mask.shape != chunk.shape:
            raise ValueError(
                f"token_loss_mask shape {tuple(token_loss_mask.shape)} must equal the chunk's "
                f"{tuple(chunk.shape)}"
            )
        labels = labels.masked_fill(token_loss_mask[:, bag_size:] == 0, ignore_index)
    if layout == PAPER:
        # Only one token follows the last bag: pad its other bag_size - 1 slots.
        pad = labels.new_full((batch, bag_size - 1), ignore_index)
        labels = torch.cat([labels, pad], dim=1)
    targets = labels.reshape(batch, num_bags, bag_size)
    loss_mask = (targets != ignore_index).any(dim=-1).float()
    return TSTBatch(input_ids, targets, loss_mask)


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")


def make_output_only_batch(
    chunk: torch.Tensor,
    bag_size: int,
    ignore_index: int = -100,
    token_loss_mask: torch.Tensor | None = None,
) -> TSTBatch:
    """Output-only superposition: ordinary inputs, each position predicts the next
    ``bag_size`` tokens.

    ``chunk [b, L + 1]`` (an ordinary next-token sample, so this mode reads no extra data)
    -> input ids ``[b, L]``, targets ``[b, L, bag_size]`` with ``targets[t, k] = chunk[t+1+k]``
    where that token exists in the chunk and ``ignore_index`` beyond its end (and where
    ``token_loss_mask``, as in :func:`make_tst_batch`, is 0).
    """
    if chunk.dim() != 2 or chunk.shape[1] < 2:
        raise ValueError(f"chunk must be [batch, L + 1] with L >= 1, got {tuple(chunk.shape)}")
    chunk = chunk.long()
    batch, n = chunk.shape
    num_positions = n - 1
    labels = chunk if token_loss_mask is None else chunk.masked_fill(token_loss_mask == 0,
                                                                       ignore_index)  # fmt: skip
    padded = torch.cat([labels, chunk.new_full((batch, bag_size - 1), ignore_index)], dim=1)
    # [b, L, bag]: window k of position t is padded[t + 1 + k].
    targets = padded[:, 1:].unfold(1, bag_size, 1)[:, :num_positions]
    loss_mask = (targets != ignore_index).any(dim=-1).float()
    return TSTBatch(chunk[:, :num_positions], targets.contiguous(), loss_mask)


def after_eod(chunk: torch.Tensor, eod: int) -> torch.Tensor:
    """``--eod-mask-loss``'s token mask ``[b, n]``: 0 for each token that follows an
    end-of-document token in the row (the first token of the next document), 1 elsewhere.
    A row is consecutive tokens of the corpus, so the token before each is its predecessor."""
    keep = torch.ones_like(chunk, dtype=torch.long)
    keep[:, 1:] = (chunk[:, :-1] != eod).long()
    return keep


def document_positions_and_mask(input_ids: torch.Tensor, bag_size: int, eod: int,
                                reset_position_ids: bool, reset_attention_mask: bool
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``--reset-position-ids`` / ``--reset-attention-mask`` (Megatron-LM's rule, per bag).

    ``input_ids [b, L * bag_size]`` (``L`` input positions of ``bag_size`` tokens each) ->
    position ids ``[b, L]`` and the attention mask ``[b, 1, L, L]`` (megatron-core's
    convention: ``True`` masks out; None without ``reset_attention_mask``). A new document
    starts at the position after each one whose tokens hold an end-of-document token: its
    positions count from 0 again, and it attends to no earlier position. With ``bag_size``
    1 this is Megatron-LM's ``_get_ltor_masks_and_position_ids`` (the EOD belongs to the
    document it ends); a bag that holds an EOD belongs to the document that EOD ends, so
    the tokens after it in the same bag are still read with that document.
    """
    b, n = input_ids.shape
    if bag_size < 1 or n % bag_size:
        raise ValueError(f"input ids of {n} tokens do not fold into bags of {bag_size}")
    length = n // bag_size
    ends = (input_ids.view(b, length, bag_size) == eod).any(dim=-1)  # [b, L]
    # Document index of each position: the EODs strictly before it.
    doc = torch.zeros(b, length, dtype=torch.long, device=input_ids.device)
    doc[:, 1:] = ends[:, :-1].long().cumsum(dim=1)
    index = torch.arange(length, device=input_ids.device).expand(b, -1)
    positions = index
    if reset_position_ids:
        # Each position's distance from its document's first position.
        starts = torch.zeros_like(doc, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        positions = index - first
    mask = None
    if reset_attention_mask:
        later = index.unsqueeze(-1) < index.unsqueeze(-2)  # [b, L(q), L(k)]: key after query
        other = doc.unsqueeze(-1) != doc.unsqueeze(-2)
        mask = (later | other).unsqueeze(1)
    return positions.contiguous(), mask


def batch_for_phase(chunk: torch.Tensor, phase: Phase, ignore_index: int = -100,
                    eod: int | None = None) -> TSTBatch:  # fmt: skip
    """Rows from the data stream -> the batch a step of ``phase`` trains on.

    ``chunk [b, units_per_row * (L + 1)]``: a row of ``phase.units_per_row`` stream units of
    ``L + 1`` tokens (:class:`tst.data.stream.SampleStream` serves these). By the phase's
    input and target bag sizes:

    - ``1, 1`` (recovery, or a run without bags): ordinary next-token training, ``[b, L + 1]``.
    - ``1, bag`` (output-only): ordinary inputs, each position predicts the next ``bag``
      tokens (:func:`make_output_only_batch`); reads no more than a recovery row.
    - ``bag, bag`` (full): :func:`make_tst_batch` in ``phase.layout``; the ``paper`` layout
      uses the row's first ``bag * L + 1`` tokens.
    - ``bag, 1`` (input-only): the same bag inputs; each position predicts one token, the first
      of the next bag.

    ``eod`` (``--eod-mask-loss``, Megatron-LM's rule): the token after each end-of-document
    token is no target (Megatron-LM masks the loss where the input is EOD, which is the
    same for next-token training); in a bag target only that token's slot goes.
    """
    if chunk.dim() != 2 or chunk.shape[1] % phase.units_per_row:
        raise ValueError(
            f"chunk must be [batch, units_per_row * (L + 1)] with units_per_row = "
            f"{phase.units_per_row} for the {phase.name} phase, got {tuple(chunk.shape)}"
        )

    def mask(rows):
        return None if eod is None else after_eod(rows, eod)

    if phase.input_bag == 1 and phase.target_bag == 1:
        return make_tst_batch(chunk, 1, ignore_index=ignore_index, token_loss_mask=mask(chunk))
    if phase.input_bag == 1:
        return make_output_only_batch(chunk, phase.target_bag, ignore_index, mask(chunk))
    bag_size = phase.input_bag
    if phase.layout == PAPER:
        seq_length = chunk.shape[1] // phase.units_per_row - 1
        chunk = chunk[:, : chunk_length(seq_length, bag_size, PAPER)]
    batch = make_tst_batch(chunk, bag_size, phase.layout, ignore_index, mask(chunk))
    if phase.target_bag == 1:
        targets = batch.targets[..., :1]
        return batch._replace(targets=targets, loss_mask=(targets != ignore_index).any(-1).float())
    return batch
