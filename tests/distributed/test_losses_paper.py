"""The paper's per-slot MCE (``--tst-layout paper``) against its plain reference.

The trainer forms it as per-position losses with the unnormalised per-slot weights of
``paper_form_slot_weights``, summed over micro-batches and data-parallel ranks and divided
once by the global count of positions. Here that is checked against
``reference.paper_multi_hot_ce`` (one ``F.cross_entropy`` per slot, then the mean over
slots) on the whole batch, split into micro-batches, over DP ranks and over TP vocabulary
shards. Tolerances: fp32 losses to atol 2e-6 / rtol 1e-6 (the same sums in another order),
gradients to atol 1e-7 (they are O(1 / positions)).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tst.data.batch import PAPER, make_tst_batch
from tst.losses import (
    global_slot_counts,
    paper_form_slot_weights,
    slot_weights_for,
    vocab_parallel_multi_hot_cross_entropy,
)

import reference as ref

LOSS_TOL = dict(atol=2e-6, rtol=1e-6)
GRAD_TOL = dict(atol=1e-7, rtol=1e-5)
ROWS, SEQ, VOCAB = 8, 8, 64


def paper_case(seed: int, bag_size: int, layout: str = "paper", vocab: int = VOCAB):
    """Logits ``[ROWS, SEQ, vocab]`` and the reference's targets for random chunks, with a few
    more ignored slots (as masked tokens would make) and one position without any."""
    gen = torch.Generator().manual_seed(seed)
    n = bag_size * SEQ + 1 if layout == "paper" else bag_size * (SEQ + 1)
    chunk = torch.randint(0, vocab, (ROWS, n), generator=gen)
    _, targets, mask = ref.tst_batch(chunk, bag_size, layout)
    if bag_size > 1:
        targets[0, 2, 1] = -100
        targets[3, 0, 0] = -100
    targets[5, 4, :] = -100
    mask = (targets != -100).any(-1).float()
    logits = torch.randn(ROWS, SEQ, vocab, generator=gen) * 3
    return logits, targets, mask


def paper_loss(logits, targets, mask, slot_weights, micro_batches: int, tp_group=None):
    """The trainer's way: global counts, per-slot weights, per-micro-batch sums, one division."""
    target_mbs, logit_mbs = targets.chunk(micro_batches), logits.chunk(micro_batches)
    counts, positions = global_slot_counts(list(target_mbs))
    assert positions == int(mask.sum())
    weights = paper_form_slot_weights(counts, positions, slot_weights)
    total = torch.zeros(())
    for z, y, m in zip(logit_mbs, target_mbs, mask.chunk(micro_batches), strict=True):
        loss = vocab_parallel_multi_hot_cross_entropy(
            z, y, tp_group, slot_weights=weights, normalise_slot_weights=False
        )
        total = total + (loss * m).sum()
    return total / positions


@pytest.mark.parametrize("bag_size", [1, 2, 4, 6])
@pytest.mark.parametrize("weights", ["uniform", "power"])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_paper_form_matches_reference(bag_size, weights, micro_batches):
    seed = 1000 * bag_size + micro_batches
    logits, targets, mask = paper_case(seed, bag_size)
    slot_weights = slot_weights_for(weights, bag_size)
    ours = logits.clone().requires_grad_()
    got = paper_loss(ours, targets, mask, slot_weights, micro_batches)
    got.backward()
    theirs = logits.clone().requires_grad_()
    want = ref.paper_multi_hot_ce(theirs, targets, slot_weights=slot_weights)
    want.backward()
    torch.testing.assert_close(got, want, **LOSS_TOL, msg=f"seed {seed}")
    torch.testing.assert_close(ours.grad, theirs.grad, **GRAD_TOL, msg=f"seed {seed}")


def _position_form(logits, targets, mask, slot_weights):
    loss = ref.multi_hot_ce(logits, targets, slot_weights=slot_weights)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("weights", ["uniform", "power"])
def test_the_forms_agree_where_every_slot_is_valid_and_differ_where_not(weights):
    """Full target bags: the per-slot and per-position averages are one number. The paper
    layout's last position has one valid slot: there the two differ."""
    bag_size = 4
    slot_weights = slot_weights_for(weights, bag_size)
    gen = torch.Generator().manual_seed(7)
    chunk = torch.randint(0, VOCAB, (ROWS, bag_size * (SEQ + 1)), generator=gen)
    _, targets, mask = ref.tst_batch(chunk, bag_size, "full")
    logits = torch.randn(ROWS, SEQ, VOCAB, generator=gen) * 3
    torch.testing.assert_close(
        ref.paper_multi_hot_ce(logits, targets, slot_weights=slot_weights),
        _position_form(logits, targets, mask, slot_weights),
        **LOSS_TOL,
    )
    torch.testing.assert_close(
        paper_loss(logits, targets, mask, slot_weights, 2),
        _position_form(logits, targets, mask, slot_weights),
        **LOSS_TOL,
    )
    logits, targets, mask = paper_case(7, bag_size)
    paper = ref.paper_multi_hot_ce(logits, targets, slot_weights=slot_weights)
    position = _position_form(logits, targets, mask, slot_weights)
    assert abs(paper - position) > 1e-3, (paper, position)


def test_unnormalised_weights_give_the_weighted_sum_and_its_gradient():
    """``normalise_slot_weights=False``: ``sum_j w_j CE(z, y_j)`` over valid slots; gradient
    ``(sum_j w_j) softmax(z) - sum_j w_j onehot(y_j)``."""
    logits, targets, _ = paper_case(3, 4)
    weights = torch.tensor([2.0, 0.5, 1.0, 0.25])
    x = logits.clone().requires_grad_()
    loss = vocab_parallel_multi_hot_cross_entropy(
        x, targets, slot_weights=weights, normalise_slot_weights=False
    )
    z = logits.clone().requires_grad_()
    want = torch.zeros(targets.shape[:-1])
    for k in range(4):
        ce = F.cross_entropy(z.transpose(1, 2), targets[..., k], reduction="none")
        want = want + weights[k] * ce  # ignored slots give 0
    grad_out = torch.rand(want.shape, generator=torch.Generator().manual_seed(4))
    (loss * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x.grad, z.grad, atol=1e-6, rtol=1e-5)
    assert loss[5, 4] == 0 and not x.grad[5, 4].any()


def test_paper_form_slot_weights():
    counts = torch.tensor([10, 8, 0, 5])
    uniform = paper_form_slot_weights(counts, 10)
    # N / (bag' * C_k) over the three slots valid somewhere; the empty slot drops out.
    torch.testing.assert_close(uniform, torch.tensor([10 / 30, 10 / 24, 0.0, 10 / 15]))
    power = paper_form_slot_weights(counts, 10, torch.tensor([1.0, 0.5, 1 / 3, 0.25]))
    total = 1.0 + 0.5 + 0.25
    torch.testing.assert_close(
        power, torch.tensor([10 / (10 * total), 5 / (8 * total), 0.0, 2.5 / (5 * total)])
    )
    assert not paper_form_slot_weights(torch.zeros(3, dtype=torch.long), 0).any()
    with pytest.raises(ValueError, match="must match slot_counts"):
        paper_form_slot_weights(counts, 10, torch.ones(3))


def test_global_slot_counts_match_make_tst_batch():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, VOCAB, (2, 3 * SEQ + 1), generator=gen) for _ in range(3)]
    batches = [make_tst_batch(c, 3, PAPER) for c in chunks]
    counts, positions = global_slot_counts([b.targets for b in batches])
    # Every position has slot 0; slots 1 and 2 are empty at each row's last position.
    rows = 2 * 3
    assert counts.tolist() == [rows * SEQ, rows * (SEQ - 1), rows * (SEQ - 1)]
    assert positions == sum(int(b.loss_mask.sum()) for b in batches) == rows * SEQ
    with pytest.raises(ValueError, match="at least one micro-batch"):
        global_slot_counts([])


# ---------------------------------------------------------------------------------------
# Data parallelism (rows split over ranks, counts all-reduced) and tensor parallelism.


def _parallel_body(tp: int, weights: str) -> int:
    from tst.platform import initialize

    layout = initialize(tp=tp, seed=0)
    bag_size = 4
    slot_weights = slot_weights_for(weights, bag_size)
    logits, targets, mask = paper_case(11, bag_size, vocab=VOCAB * tp)
    want_x = logits.clone().requires_grad_()
    want = ref.paper_multi_hot_ce(want_x, targets, slot_weights=slot_weights)
    want.backward()

    rows = slice(layout.dp_rank * ROWS // layout.dp, (layout.dp_rank + 1) * ROWS // layout.dp)
    shard = slice(layout.tp_rank * VOCAB, (layout.tp_rank + 1) * VOCAB)
    x = logits[rows, :, shard].clone().requires_grad_()
    micro = [targets[rows][:1], targets[rows][1:]]  # two uneven micro-batches
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(kwargs.get("group"))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        counts, positions = global_slot_counts(micro, group=layout.dp_group)
    finally:
        dist.all_reduce = real_all_reduce
    assert calls == ([layout.dp_group] if layout.dp > 1 else [])
    assert positions == int(mask.sum())
    v = paper_form_slot_weights(counts, positions, slot_weights)
    loss = vocab_parallel_multi_hot_cross_entropy(
        x, targets[rows], layout.tp_group, slot_weights=v, normalise_slot_weights=False
    )
    local = (loss * mask[rows]).sum()
    (local / positions).backward()  # megatron-core's per-token scaling by the global count
    total = local.detach().clone()
    dist.all_reduce(total, group=layout.dp_group)  # as the gradient all-reduce sums them
    msg = f"TP={tp} DP={layout.dp} {weights}"
    torch.testing.assert_close(total / positions, want.detach(), **LOSS_TOL, msg=msg)
    torch.testing.assert_close(x.grad, want_x.grad[rows, :, shard], **GRAD_TOL, msg=msg)
    return layout.dp


@pytest.mark.parametrize("tp", [1, 2])
def test_paper_form_under_data_and_tensor_parallelism(world2, tp):
    for weights in ("uniform", "power"):
        assert world2.run(_parallel_body, tp, weights) == [2 // tp] * 2
