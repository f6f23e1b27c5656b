"""Multi-hot cross-entropy over tensor-parallel vocabulary shards.

In the superposition phase each position predicts a *bag* of ``bag_size`` tokens. The
loss (the paper's "MCE") is the weighted mean of ordinary cross-entropies against one
set of logits::

    loss = sum_j w_j * CE(z, y_j) / sum_j w_j   =   logsumexp(z) - sum_j wn_j * z[y_j]

with ``wn_j`` the weights normalised over the position's valid slots. It needs one
log-sum-exp per position, not one per slot, so it costs what single-target CE costs.

Two ways to average over a batch, where slots are empty at some positions:

* per position (the default; ``--tst-layout full``): each position's weighted mean over its
  valid slots, as above, then the mean over positions with a valid slot;
* per slot (the paper's; ``--tst-layout paper``): each slot's CE averaged over the positions
  where that slot is valid, then the weighted mean over slots,
  ``sum_k w_k S_k / C_k / sum_k w_k`` with ``S_k`` and ``C_k`` slot ``k``'s loss sum and valid
  count over the *global* batch. With ``normalise_slot_weights=False`` and the per-slot
  weights ``v_k = N w_k / (C_k sum_k w_k)`` of :func:`paper_form_slot_weights` (``N`` the
  positions with a valid slot), each position's loss is ``sum_k v_k CE(z, y_k)``; summed over
  the global batch and divided by ``N``, the trainer's one global normalisation, that is the
  per-slot form exactly, under any micro-batching and data parallelism. The counts come from
  the data before the forward (:func:`global_slot_counts`).

The two forms agree where every position has all its slots (``full`` layout).

Layout: logits ``[..., V/tp]`` are this rank's contiguous vocabulary shard in rank order
(megatron-core's ``ColumnParallelLinear`` output), targets ``[..., bag_size]`` hold global
token ids. Collectives per call, whatever ``bag_size`` is, all over ``tp_group``:

1. all-reduce MAX of the per-position logit maximum ``[...]``;
2. all-reduce SUM of the per-position sum of exponentials ``[...]``;
3. all-reduce SUM of the gathered target logits (``[...]`` for MCE, the weighted sum is
   formed locally first; ``[..., bag_size]`` for MCEAlt, which needs each one).

The backward needs no communication: the gradient is ``softmax(z) - target distribution``
restricted to the local shard. No tensor of shape ``[..., bag_size, V/tp]`` is created.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "vocab_parallel_multi_hot_cross_entropy",
    "vocab_parallel_multi_hot_cross_entropy_alt",
    "power_law_slot_weights",
    "slot_weights_for",
    "global_slot_counts",
    "paper_form_slot_weights",
]


def power_law_slot_weights(bag_size: int, exponent: float = 1.0) -> torch.Tensor:
    """The paper's power-law slot weights ``w_i = 1 / i**exponent`` for slots ``i = 1..bag_size``.

    Earlier tokens of the target bag weigh more; the paper found this better than uniform
    weights for ``bag_size >= 8``. Returned unnormalised, fp32, ``[bag_size]``.
    """
    if bag_size < 1:
        raise ValueError(f"bag_size must be >= 1, got {bag_size}")
    return 1.0 / torch.arange(1, bag_size + 1, dtype=torch.float32) ** exponent


def slot_weights_for(kind: str, bag_size: int) -> torch.Tensor | None:
    """Slot weights by name, as ``--tst-slot-weights`` spells them: ``uniform`` or ``power``."""
    if kind == "uniform":
        return None
    if kind == "power":
        return power_law_slot_weights(bag_size)
    raise ValueError(f"--tst-slot-weights must be 'uniform' or 'power', got {kind!r}")


def global_slot_counts(
    targets: Sequence[torch.Tensor],
    ignore_index: int = -100,
    group=None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """Valid slots per slot index and positions with a valid slot, over a global batch.

    ``targets``: this rank's micro-batches, each ``[..., bag_size]``. Returns ``([bag_size]``
    int64 counts ``C_k``, ``N``), summed over the micro-batches and over ``group``'s ranks
    (the data-parallel group: ranks that read different rows). Collective: one all-reduce
    SUM of ``bag_size + 1`` int64 over ``group``, in a buffer on ``device`` (NCCL reduces no
    CPU tensors).
    """
    if not targets:
        raise ValueError("global_slot_counts needs at least one micro-batch of targets")
    bag_size = targets[0].shape[-1]
    local = torch.zeros(bag_size + 1, dtype=torch.int64)
    for target in targets:
        valid = (target != ignore_index).reshape(-1, bag_size)
        local[:bag_size] += valid.sum(0).cpu()
        local[bag_size] += int(valid.any(-1).sum())
    local = local.to(device)
    if group is not None and dist.get_world_size(group=group) > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    local = local.cpu()
    return local[:bag_size], int(local[bag_size])


def paper_form_slot_weights(
    slot_counts: torch.Tensor, num_positions: int, slot_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-slot weights ``v_k = N w_k / (C_k sum_k w_k)`` for the paper's per-slot average.

    ``slot_counts [bag_size]`` (``C_k``) and ``num_positions`` (``N``) are the global
    batch's, from :func:`global_slot_counts`; ``slot_weights [bag_size]`` are the ``w_k``
    (uniform when None). A slot valid nowhere in the batch drops out of the mean over slots
    (weight 0). Pass the result with ``normalise_slot_weights=False``: the global sum of the
    per-position losses divided by ``N`` is then ``sum_k w_k S_k / C_k / sum_k w_k``.
    Returned fp32, ``[bag_size]``; computed in fp64.
    """
    counts = slot_counts.to(torch.float64)
    weights = torch.ones_like(counts) if slot_weights is None else slot_weights.to(torch.float64)
    if weights.shape != counts.shape:
        raise ValueError(
            f"slot_weights shape {tuple(weights.shape)} must match slot_counts "
            f"{tuple(counts.shape)}"
        )
    weights = torch.where(counts > 0, weights, 0.0)
    total = weights.sum()
    if total <= 0:  # no valid slot in the whole batch: every position's loss is 0 anyway
        return torch.zeros_like(counts, dtype=torch.float32)
    return (num_positions * weights / (counts.clamp_min(1) * total)).float()


# ---------------------------------------------------------------------------------------
# Pure helpers (no autograd, no communication unless a group is given)


def _group_info(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _all_reduce(tensor: torch.Tensor, op, tp_group) -> None:
    if tp_group is not None and dist.get_world_size(group=tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


def _check_inputs(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    slot_weights: torch.Tensor | None,
    check_values: bool = True,
) -> None:
    """Dtypes and shapes always; with ``check_values`` also the target ids' range and the
    slot weights' values (each a device-to-host sync on a GPU)."""
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if target.dim() != logits.dim() or target.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must be logits shape "
            f"{tuple(logits.shape[:-1])} plus a trailing bag dimension [..., bag_size]"
        )
    if target.shape[-1] < 1:
        raise ValueError("target has an empty bag dimension (bag_size must be >= 1)")
    if slot_weights is not None and (
        slot_weights.dim() != 1 or slot_weights.numel() != target.shape[-1]
    ):
        raise ValueError(
            f"slot_weights must have shape [bag_size] = [{target.shape[-1]}], "
            f"got {tuple(slot_weights.shape)}"
        )
    if not check_values:
        return
    valid = target != ignore_index
    if valid.any():
        ids = target[valid]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"target token id {bad} is outside the vocabulary [0, {vocab_size}) "
                f"(vocab shard size x tensor-parallel size); mark empty slots with "
                f"ignore_index={ignore_index} and check the tokenizer's vocabulary size"
            )
    if slot_weights is not None and (
        not torch.isfinite(slot_weights).all() or (slot_weights < 0).any()
    ):
        raise ValueError(
            f"slot_weights must be finite and non-negative, got {slot_weights.tolist()}"
        )


def _position_slot_weights(
    target: torch.Tensor, ignore_index: int, slot_weights: torch.Tensor | None, normalise: bool
) -> torch.Tensor:
    """``[..., bag_size]`` fp32 weights of the valid slots (0 elsewhere); with ``normalise``
    they sum to 1 over each position's valid slots (0 if none is valid)."""
    valid = (target != ignore_index).float()
    if slot_weights is not None:
        valid = valid * slot_weights.to(device=target.device, dtype=torch.float32)
    if not normalise:
        return valid
    total = valid.sum(dim=-1, keepdim=True)
    return valid / total.clamp_min(torch.finfo(torch.float32).tiny)


def _local_targets(
    target: torch.Tensor, ignore_index: int, vocab_start: int, vocab_end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard-local target indices (0 where off-shard) and the on-shard mask, ``[..., bag]``."""
    on_shard = (target >= vocab_start) & (target < vocab_end) & (target != ignore_index)
    local = torch.where(on_shard, target - vocab_start, torch.zeros_like(target))
    return local, on_shard


def _shifted_logits(logits: torch.Tensor, tp_group, overwrite: bool) -> torch.Tensor:
    """An fp32 tensor ``z - max(z)`` with the max taken over the whole vocabulary.

    A fresh tensor unless ``overwrite`` and ``logits`` are fp32: then ``logits`` itself.
    """
    logits_fp32 = logits.float()
    logits_max = logits_fp32.max(dim=-1).values
    _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)  # collective 1
    if logits_fp32 is logits and not overwrite:
        return logits_fp32 - logits_max.unsqueeze(-1)
    # `.float()` already made a copy (or the caller gave the logits up): shift in place.
    return logits_fp32.sub_(logits_max.unsqueeze(-1))


def _exp_and_sum(shifted: torch.Tensor, tp_group) -> torch.Tensor:
    """Exponentiate ``shifted`` in place; return the global sum of exponentials ``[...]``."""
    sum_exp = shifted.exp_().sum(dim=-1)
    _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group)  # collective 2
    return sum_exp


def _softmax_minus_target(softmax, local, target_mass, grad_loss) -> torch.Tensor:
    """``(softmax - target distribution) * grad_loss``, in place of the saved softmax.

    ``target_mass [..., bag]`` is this shard's share of the target distribution at the
    shard-local ids ``local``; the forward's softmax is not needed again, so it is reused.
    """
    grad = softmax
    grad.scatter_add_(-1, local, -target_mass)
    return grad.mul_(grad_loss.unsqueeze(-1))


def _checked_apply(
    function, logits, target, tp_group, ignore_index, slot_weights, check_targets, overwrite,
    *extra,
):  # fmt: skip
    """Validate the inputs against the global vocabulary, then apply the autograd function."""
    _, tp = _group_info(tp_group)
    _check_inputs(logits, target, logits.shape[-1] * tp, ignore_index, slot_weights, check_targets)
    return function.apply(
        logits, target.long(), tp_group, ignore_index, slot_weights, overwrite, *extra
    )


class _VocabParallelMultiHotCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, ignore_index, slot_weights, overwrite, normalise):
        rank, _ = _group_info(tp_group)
        shard = logits.shape[-1]
        vocab_start, vocab_end = rank * shard, (rank + 1) * shard

        shifted = _shifted_logits(logits, tp_group, overwrite)
        weights = _position_slot_weights(target, ignore_index, slot_weights, normalise)
        local, on_shard = _local_targets(target, ignore_index, vocab_start, vocab_end)
        local_weights = weights * on_shard  # this shard's part of the target distribution
        # sum_j w_j * (z[y_j] - max), this shard's part; one value per position.
        target_logit = (torch.gather(shifted, -1, local) * local_weights).sum(-1)
        sum_exp = _exp_and_sum(shifted, tp_group)
        _all_reduce(target_logit, dist.ReduceOp.SUM, tp_group)  # collective 3

        total_weight = weights.sum(-1)  # [...]: 1 (normalised) or sum_j w_j, 0 without slots
        has_target = total_weight > 0
        # sum_j w_j CE(z, y_j) = (sum_j w_j) logsumexp(z) - sum_j w_j z[y_j]; normalised
        # weights keep the plain form (no rounding of a factor of 1).
        mass = has_target.float() if normalise else total_weight
        log_sum_exp = torch.log(sum_exp)
        loss = torch.where(
            has_target, (log_sum_exp if normalise else log_sum_exp * mass) - target_logit, 0.0
        )

        # Keep (sum_j w_j) softmax(z) in place of the shifted logits: the backward needs
        # nothing else.
        softmax = shifted.div_(sum_exp.unsqueeze(-1))
        softmax.mul_(mass.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, local_weights)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = _softmax_minus_target(*ctx.saved_tensors, grad_loss)
        return grad, None, None, None, None, None, None


def vocab_parallel_multi_hot_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    ignore_index: int = -100,
    slot_weights: torch.Tensor | None = None,
    *,
    normalise_slot_weights: bool = True,
    check_targets: bool = True,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """Weighted mean of cross-entropies of one set of logits against a bag of targets.

    Args:
        vocab_parallel_logits: ``[..., V/tp]`` this rank's contiguous vocabulary shard (any
            float dtype; computed in fp32).
        target: ``[..., bag_size]`` int64 global token ids; ``ignore_index`` marks empty slots.
        tp_group: tensor-parallel process group over which the vocabulary is split; None
            means no tensor parallelism.
        ignore_index: the id of an empty slot.
        slot_weights: optional ``[bag_size]`` non-negative weights; uniform when None.
        normalise_slot_weights: divide by the position's total valid weight (the default,
            a weighted mean). False gives the weighted sum ``sum_j w_j CE(z, y_j)``, which
            with :func:`paper_form_slot_weights` makes the paper's per-slot average.
        check_targets: check that every valid target id lies in the vocabulary and that the
            slot weights are finite and non-negative (a device sync on a GPU). Callers whose
            targets were checked on the host (the trainer's datasets do) turn it off; an
            unchecked out-of-range id would silently count as a logit of 0.
        overwrite_logits: the caller does not need ``vocab_parallel_logits`` again: fp32
            logits are used as the work buffer (as megatron-core's cross-entropy does),
            sparing a copy of the size of the logits. Lower precisions are copied anyway.

    Returns:
        ``[...]`` fp32 loss: ``sum_j w_j CE(z, y_j) / sum_j w_j`` over valid slots ``j``
        (without the division when ``normalise_slot_weights`` is False), and 0 where a
        position has no valid slot. Duplicate ids in a bag count once per occurrence.
        Gradient wrt the logits: ``softmax(z) - weighted multi-hot(y)`` (normalised), or
        ``(sum_j w_j) softmax(z) - sum_j w_j onehot(y_j)``.

    Collectives (over ``tp_group``): all-reduce MAX ``[...]``, all-reduce SUM ``[...]``
    (sum of exponentials), all-reduce SUM ``[...]`` (weighted target logits).
    """
    return _checked_apply(
        _VocabParallelMultiHotCE, vocab_parallel_logits, target, tp_group, ignore_index,
        slot_weights, check_targets, overwrite_logits, normalise_slot_weights,
    )  # fmt: skip


class _VocabParallelMultiHotCEAlt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, ignore_index, slot_weights, overwrite):
        rank, _ = _group_info(tp_group)
        shard = logits.shape[-1]
        vocab_start, vocab_end = rank * shard, (rank + 1) * shard

        shifted = _shifted_logits(logits, tp_group, overwrite)
        local, on_shard = _local_targets(target, ignore_index, vocab_start, vocab_end)
        # Each slot's logit lives on exactly one shard: gather locally, sum across shards.
        slot_logit = torch.gather(shifted, -1, local) * on_shard  # [..., bag]
        sum_exp = _exp_and_sum(shifted, tp_group)
        _all_reduce(slot_logit, dist.ReduceOp.SUM, tp_group)  # collective 3

        weights = (target != ignore_index).float()
        if slot_weights is not None:
            weights = weights * slot_weights.to(device=target.device, dtype=torch.float32)
        has_target = (weights > 0).any(-1)
        # log sum_j w_j exp(z_j - max), stably; slots of weight 0 drop out as -inf.
        log_w = torch.where(weights > 0, weights.log(), float("-inf"))
        log_mass = torch.logsumexp(slot_logit + log_w, dim=-1)
        loss = torch.where(has_target, torch.log(sum_exp) - log_mass, 0.0)

        # Posterior over slots: q_j = w_j p(y_j) / sum_k w_k p(y_k), this shard's part.
        posterior = torch.exp(slot_logit + log_w - log_mass.unsqueeze(-1))
        posterior = torch.where(has_target.unsqueeze(-1), posterior, 0.0) * on_shard
        softmax = shifted.div_(sum_exp.unsqueeze(-1))
        softmax.mul_(has_target.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, posterior)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _softmax_minus_target(*ctx.saved_tensors, grad_loss), None, None, None, None, None


def vocab_parallel_multi_hot_cross_entropy_alt(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    ignore_index: int = -100,
    slot_weights: torch.Tensor | None = None,
    *,
    check_targets: bool = True,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """The paper's "MCEAlt": ``-log sum_j w_j p(y_j)`` over valid slots (``w_j = 1`` if None).

    Same layout, arguments and errors as :func:`vocab_parallel_multi_hot_cross_entropy`.
    Unweighted it is exactly ``-log sum_j p(y_j)``, whose floor is 0 rather than
    ``log(bag_size)``. 0 where a position has no valid slot. Gradient wrt the logits:
    ``softmax(z) - q`` with ``q_j = w_j p(y_j) / sum_k w_k p(y_k)`` placed at ``y_j``.

    Collectives (over ``tp_group``): all-reduce MAX ``[...]``, all-reduce SUM ``[...]``
    (sum of exponentials), all-reduce SUM ``[..., bag_size]`` (each slot's logit).
    """
    return _checked_apply(
        _VocabParallelMultiHotCEAlt, vocab_parallel_logits, target, tp_group, ignore_index,
        slot_weights, check_targets, overwrite_logits,
    )  # fmt: skip
