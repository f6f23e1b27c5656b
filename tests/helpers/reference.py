"""Plain single-process reference of the TST math, written from the paper's description.

The test oracle only: no tensor parallelism, no fused tricks, loops where the paper loops.
Nothing in ``tst/`` imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_hot_ce(logits, targets, ignore_index=-100, slot_weights=None):
    """The paper's MCE: weighted mean over valid slots of ``bag_size`` separate CE calls.

    logits ``[..., V]``, targets ``[..., bag_size]`` -> ``[...]`` fp32.
    """
    logits = logits.float()
    bag_size = targets.shape[-1]
    weights = torch.ones(bag_size) if slot_weights is None else slot_weights.float()
    total = torch.zeros(targets.shape[:-1])
    weight_sum = torch.zeros(targets.shape[:-1])
    for j in range(bag_size):
        y = targets[..., j]
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            y.reshape(-1),
            ignore_index=ignore_index,
            reduction="none",
        ).reshape(y.shape)
        valid = (y != ignore_index).float()
        total = total + weights[j] * ce * valid
        weight_sum = weight_sum + weights[j] * valid
    return torch.where(weight_sum > 0, total / weight_sum.clamp_min(1e-30), 0.0)


def paper_multi_hot_ce(logits, targets, ignore_index=-100, slot_weights=None):
    """The paper's MCE over a whole batch: one mean CE per slot, then the mean over slots.

    Written as the paper's listing computes it: for each slot ``k`` an ordinary
    ``F.cross_entropy`` of all positions' logits against that slot's labels, which averages
    over the positions where the slot is valid (``ignore_index`` elsewhere); then the
    ``slot_weights``-weighted mean (plain mean when None) of those ``bag_size`` values. A
    slot valid nowhere is left out (its ``F.cross_entropy`` would be 0 / 0).

    logits ``[..., V]``, targets ``[..., bag_size]`` -> a scalar fp32 loss.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    bag_size = targets.shape[-1]
    weights = torch.ones(bag_size) if slot_weights is None else slot_weights.float()
    total = torch.zeros(())
    weight_sum = torch.zeros(())
    for k in range(bag_size):
        y = targets[..., k].reshape(-1)
        if (y == ignore_index).all():
            continue
        total = total + weights[k] * F.cross_entropy(logits, y, ignore_index=ignore_index)
        weight_sum = weight_sum + weights[k]
    return total / weight_sum


def multi_hot_ce_alt(logits, targets, ignore_index=-100, slot_weights=None):
    """MCEAlt: ``-log sum_j w_j p(y_j)`` over valid slots, 0 where none is valid."""
    probs = torch.softmax(logits.float(), dim=-1)
    bag_size = targets.shape[-1]
    weights = torch.ones(bag_size) if slot_weights is None else slot_weights.float()
    mass = torch.zeros(targets.shape[:-1])
    any_valid = torch.zeros(targets.shape[:-1], dtype=torch.bool)
    for j in range(bag_size):
        y = targets[..., j]
        valid = y != ignore_index
        p = torch.gather(probs, -1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        mass = mass + weights[j] * p * valid
        any_valid = any_valid | (valid & (weights[j] > 0))
    return torch.where(any_valid, -torch.log(mass.clamp_min(1e-45)), 0.0)


def bag_embedding(table, input_ids, bag_size):
    """Mean of each bag's token embeddings: ids ``[b, L*bag_size]`` -> ``[L, b, h]``."""
    batch, n = input_ids.shape
    rows = table[input_ids].float()  # [b, n, h]
    out = torch.stack(
        [rows[:, j * bag_size : (j + 1) * bag_size].mean(dim=1) for j in range(n // bag_size)],
        dim=1,
    )  # [b, L, h]
    return out.transpose(0, 1).to(table.dtype)


def tst_batch(chunk, bag_size, layout="full", ignore_index=-100):
    """Inputs, targets and loss mask built per position, the paper's way.

    ``paper``: next-token labels shifted left by ``bag_size - 1``, padded with ignore_index.
    ``full``:  the chunk holds ``bag_size * (L + 1)`` tokens; bag j's targets are bag j+1.
    """
    batch, n = chunk.shape
    if layout == "paper":
        num_bags = (n - 1) // bag_size
        labels = chunk[:, 1:]  # ordinary next-token labels, length n - 1 = L * bag_size
        shifted = torch.full_like(labels, ignore_index)
        shifted[:, : labels.shape[1] - (bag_size - 1)] = labels[:, bag_size - 1 :]
    else:
        num_bags = n // bag_size - 1
        shifted = chunk[:, bag_size:]
    inputs = chunk[:, : num_bags * bag_size]
    targets = torch.full((batch, num_bags, bag_size), ignore_index, dtype=torch.long)
    for b in range(batch):
        for j in range(num_bags):
            for k in range(bag_size):
                targets[b, j, k] = shifted[b, j * bag_size + k]
    loss_mask = (targets != ignore_index).any(-1).float()
    return inputs, targets, loss_mask


def input_only_batch(chunk, bag_size, layout="full", ignore_index=-100):
    """Input-only superposition: bag inputs as in :func:`tst_batch`, and each position
    predicts one token, the first of the next bag (raw token ``(j + 1) * bag_size``)."""
    inputs, targets, _ = tst_batch(chunk, bag_size, layout, ignore_index)
    batch, num_bags = targets.shape[:2]
    next_token = torch.full((batch, num_bags, 1), ignore_index, dtype=torch.long)
    for b in range(batch):
        for j in range(num_bags):
            next_token[b, j, 0] = chunk[b, (j + 1) * bag_size]
    return inputs, next_token, (next_token != ignore_index).any(-1).float()


def output_only_batch(chunk, bag_size, ignore_index=-100):
    """Output-only superposition: ordinary inputs ``chunk[:, :L]`` (chunk ``[b, L + 1]``);
    position ``t`` predicts the next ``bag_size`` tokens ``chunk[t + 1 .. t + bag_size]``,
    ``ignore_index`` for those past the chunk's end."""
    batch, n = chunk.shape
    num_positions = n - 1
    targets = torch.full((batch, num_positions, bag_size), ignore_index, dtype=torch.long)
    for b in range(batch):
        for t in range(num_positions):
            for k in range(bag_size):
                if t + 1 + k < n:
                    targets[b, t, k] = chunk[b, t + 1 + k]
    return chunk[:, :num_positions], targets, (targets != ignore_index).any(-1).float()


def roll_ahead(tensor, k):
    """Position ``i`` gets position ``i + k``'s entry (along dim 1); the last ``k`` zeroed."""
    out = torch.zeros_like(tensor)
    length = tensor.shape[1]
    if k < length:
        out[:, : length - k] = tensor[:, k:]
    return out


def mtp_losses_by_hand(model, input_ids, targets, loss_mask, bag_size, slot_weights=None,
                       positions=None, attention_mask=None):  # fmt: skip
    """Main and MTP per-position losses of a tiny GPT with an MTP block, from its modules.

    Written from the definition (tst.mtp), with learned absolute positions and tied output
    weights: the input of position ``i`` is the mean embedding of bag ``i`` (a token when
    ``bag_size == 1``); the main head's targets are ``targets [b, L, slots]``; MTP depth
    ``k`` at position ``i`` combines depth ``k - 1``'s hidden state with the embedding of
    position ``i + k``'s input and is scored against position ``i + k``'s targets, masked
    where ``i + k >= L``. Returns ``(main [b, L], [depth 1 [b, L], ...], [mask_k [b, L]])``,
    the losses unmasked. ``positions [b, L]`` (default 0..L-1) and ``attention_mask`` (megatron's
    ``[b, 1, L, L]``, True masks out; default causal) go to every layer, the MTP depths' too.
    """
    table = model.embedding.word_embeddings.weight
    positions_table = model.embedding.position_embeddings.weight
    batch, length = targets.shape[:2]
    if positions is None:
        positions = torch.arange(length).expand(batch, -1)

    def embed(ids_BLS, pos_BL):
        bags = bag_embedding(table, ids_BLS.reshape(batch, -1), bag_size)  # [L, b, h]
        return bags + positions_table[pos_BL].transpose(0, 1)

    def score(hidden_LBH, targets_BLS):
        logits = (hidden_LBH @ table.t()).transpose(0, 1)  # [b, L, V]
        return multi_hot_ce(logits, targets_BLS, slot_weights=slot_weights)

    ids = input_ids.view(batch, length, bag_size)
    hidden = model.decoder(hidden_states=embed(ids, positions), attention_mask=attention_mask)
    main = score(hidden, targets)
    losses, masks = [], []
    for k, layer in enumerate(model.mtp.layers, start=1):
        e = layer.enorm(embed(roll_ahead(ids, k), roll_ahead(positions, k)))
        x = torch.cat([e, layer.hnorm(hidden)], dim=-1) @ layer.eh_proj.weight.t()
        x, _ = layer.transformer_layer(hidden_states=x, attention_mask=attention_mask)
        hidden = layer.final_layernorm(x)
        losses.append(score(hidden, roll_ahead(targets, k)))
        masks.append(roll_ahead(loss_mask, k))
    return main, losses, masks
