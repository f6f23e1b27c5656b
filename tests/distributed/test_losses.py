"""Multi-hot cross-entropy against the plain reference (tests/helpers/reference.py).

Tolerances: fp32 losses agree to atol 2e-5 / rtol 1e-5 (one log-sum-exp against a loop of
CE calls); gradients for fp32 logits to atol 1e-6. bf16 logits are upcast inside, so the loss
matches the reference on the same (upcast) logits to the fp32 tolerance; the gradient comes
back in bf16 and matches to bf16 rounding (atol 2e-3 on values <= 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tst.losses import (
    power_law_slot_weights,
    slot_weights_for,
    vocab_parallel_multi_hot_cross_entropy,
    vocab_parallel_multi_hot_cross_entropy_alt,
)

import reference as ref

BAG_SIZES = (1, 2, 4, 6, 16)
LOSSES = {
    "mce": (vocab_parallel_multi_hot_cross_entropy, ref.multi_hot_ce),
    "mce-alt": (vocab_parallel_multi_hot_cross_entropy_alt, ref.multi_hot_ce_alt),
}
TOL = {
    torch.float32: dict(loss=dict(atol=2e-5, rtol=1e-5), grad=dict(atol=1e-6, rtol=1e-5)),
    torch.bfloat16: dict(loss=dict(atol=2e-5, rtol=1e-5), grad=dict(atol=2e-3, rtol=1e-2)),
}


def fresh_seed() -> int:
    """A new seed per test, reported in failures so a failing draw can be replayed."""
    return int(
        torch.randint(
            0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed() % 2**31)
        ).item()
    )


def make_case(seed, bag_size, vocab=96, shape=(3, 5), dtype=torch.float32):
    """Logits, targets with ignored slots and duplicates, a grad_output, all from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3).to(dtype)
    target = torch.randint(0, vocab, (*shape, bag_size), generator=gen)
    if bag_size > 1:
        target[0, 0, 1] = target[0, 0, 0]  # a duplicate id counts once per occurrence
        target[1, 1, -1] = -100  # one ignored slot
    target[2, 2, :] = -100  # a position with no valid slot
    grad_out = torch.rand(*shape, generator=gen)
    return logits, target, grad_out


def reference_loss_and_grad(ref_fn, logits, target, grad_out, slot_weights):
    z = logits.detach().float().requires_grad_()
    loss = ref_fn(z, target, slot_weights=slot_weights)
    (loss * grad_out).sum().backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("bag_size", BAG_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weights", ["uniform", "power"])
def test_single_process_matches_reference(name, bag_size, dtype, weights):
    seed = fresh_seed()
    fn, ref_fn = LOSSES[name]
    logits, target, grad_out = make_case(seed, bag_size, dtype=dtype)
    slot_weights = slot_weights_for(weights, bag_size)
    x = logits.clone().requires_grad_()
    loss = fn(x, target, slot_weights=slot_weights)
    (loss * grad_out).sum().backward()
    want_loss, want_grad = reference_loss_and_grad(ref_fn, logits, target, grad_out, slot_weights)
    assert loss.dtype == torch.float32 and loss.shape == target.shape[:-1]
    torch.testing.assert_close(loss, want_loss, **TOL[dtype]["loss"], msg=f"seed {seed}")
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), want_grad, **TOL[dtype]["grad"], msg=f"seed {seed}")
    assert loss[2, 2] == 0 and torch.all(x.grad[2, 2] == 0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainer_options_match_reference(name, dtype):
    """``overwrite_logits`` / ``check_targets=False`` (the trainer's settings) change no number.

    The logits come out of an op that autograd tracks (as the output layer's do), so an
    in-place use of them that broke the graph would fail the backward here.
    """
    seed = fresh_seed()
    fn, ref_fn = LOSSES[name]
    logits, target, grad_out = make_case(seed, 4, dtype=dtype)
    weights = power_law_slot_weights(4)
    scale = torch.ones((), dtype=dtype, requires_grad=True)
    produced = logits * scale  # a non-leaf, like the output layer's logits
    loss = fn(produced, target, slot_weights=weights, check_targets=False, overwrite_logits=True)
    (loss * grad_out).sum().backward()
    want_loss, want_grad = reference_loss_and_grad(ref_fn, logits, target, grad_out, weights)
    torch.testing.assert_close(loss, want_loss, **TOL[dtype]["loss"], msg=f"seed {seed}")
    # d(loss)/d(scale) = sum(dL/dlogits * logits): the gradient flowed through the product.
    want_scale = (want_grad * logits.float()).sum()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(scale.grad.float(), want_scale, **tol, msg=f"seed {seed}")
    # fp32 logits were the work buffer; lower precisions were copied and are untouched.
    assert torch.equal(produced.detach(), logits) == (dtype != torch.float32)
    # Without the check an id past the vocabulary is not caught (the caller vouched for it).
    bad = target.clone()
    bad[0, 0, 0] = logits.shape[-1]
    fn(logits.float(), bad, check_targets=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fn(logits.float(), bad)


def test_gradient_is_softmax_minus_weighted_multi_hot():
    seed = fresh_seed()
    logits, target, _ = make_case(seed, 4)
    weights = power_law_slot_weights(4)
    x = logits.clone().requires_grad_()
    vocab_parallel_multi_hot_cross_entropy(x, target, slot_weights=weights).sum().backward()
    valid = (target != -100).float() * weights
    norm = valid / valid.sum(-1, keepdim=True).clamp_min(1e-30)
    multi_hot = torch.zeros_like(logits).scatter_add_(-1, target.clamp_min(0), norm)
    has = (valid.sum(-1, keepdim=True) > 0).float()
    torch.testing.assert_close(
        x.grad, (torch.softmax(logits, -1) - multi_hot) * has, atol=1e-6, rtol=0
    )


def test_mce_floor_is_log_bag_size():
    """A model that spreads its mass evenly over the target bag reaches exactly log(bag)."""
    target = torch.tensor([[3, 5, 7, 9]])
    logits = torch.full((1, 16), -1e4)
    logits[0, target[0]] = 0.0
    loss = vocab_parallel_multi_hot_cross_entropy(logits, target)
    torch.testing.assert_close(loss, torch.log(torch.tensor([4.0])), atol=1e-6, rtol=0)
    alt = vocab_parallel_multi_hot_cross_entropy_alt(logits, target)
    torch.testing.assert_close(alt, torch.zeros(1), atol=1e-6, rtol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", sorted(LOSSES) + ["mce-unnormalised"])
def test_never_materialises_bag_times_vocab(name):
    fn = LOSSES[name][0] if name in LOSSES else vocab_parallel_multi_hot_cross_entropy
    extra = {"normalise_slot_weights": False} if name == "mce-unnormalised" else {}
    bag_size, vocab = 16, 512
    logits, target, _ = make_case(fresh_seed(), bag_size, vocab=vocab, shape=(4, 8))
    x = logits.clone().requires_grad_()
    with _LargestTensor() as mode:
        fn(x, target, **extra).sum().backward()
    assert mode.largest <= logits.numel(), (
        f"an op produced {mode.largest} elements; logits hold {logits.numel()}"
    )


def test_errors_name_the_cause():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_parallel_multi_hot_cross_entropy(logits, torch.full((2, 3, 2), 10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_parallel_multi_hot_cross_entropy_alt(logits, torch.full((2, 3, 2), -5))
    with pytest.raises(ValueError, match="non-negative"):
        vocab_parallel_multi_hot_cross_entropy(
            logits, torch.zeros(2, 3, 2, dtype=torch.long), slot_weights=torch.tensor([1.0, -1.0])
        )
    with pytest.raises(ValueError, match=r"shape \[bag_size\]"):
        vocab_parallel_multi_hot_cross_entropy(
            logits, torch.zeros(2, 3, 2, dtype=torch.long), slot_weights=torch.ones(3)
        )
    with pytest.raises(ValueError, match="trailing bag dimension"):
        vocab_parallel_multi_hot_cross_entropy(logits, torch.zeros(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="trailing bag dimension"):
        vocab_parallel_multi_hot_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        vocab_parallel_multi_hot_cross_entropy(logits, torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="uniform' or 'power"):
        slot_weights_for("linear", 4)


# ---------------------------------------------------------------------------------------
# Tensor parallelism: each rank holds a vocabulary shard; compare with the full reference.


def _tp_body(tp: int, seed: int) -> int:
    from megatron.core import tensor_parallel

    from tst.platform import initialize

    layout = initialize(tp=tp, seed=seed)
    group = layout.tp_group
    checked = 0
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return real_all_reduce(*args, **kwargs)

    for case, (bag_size, dtype, weights, name) in enumerate(
        (b, d, w, n)
        for b in BAG_SIZES
        for d in (torch.float32, torch.bfloat16)
        for w in ("uniform", "power")
        for n in sorted(LOSSES)
    ):
        fn, ref_fn = LOSSES[name]
        logits, target, grad_out = make_case(seed + case, bag_size, vocab=32 * tp, dtype=dtype)
        shard = logits.shape[-1] // tp
        local = logits[..., layout.tp_rank * shard : (layout.tp_rank + 1) * shard]
        x = local.clone().requires_grad_()
        slot_weights = slot_weights_for(weights, bag_size)
        dist.all_reduce = counting_all_reduce
        try:
            calls["n"] = 0
            loss = fn(x, target, tp_group=group, slot_weights=slot_weights)
            forward_calls = calls["n"]
            calls["n"] = 0
            (loss * grad_out).sum().backward()
            backward_calls = calls["n"]
        finally:
            dist.all_reduce = real_all_reduce
        want_loss, want_grad = reference_loss_and_grad(
            ref_fn, logits, target, grad_out, slot_weights
        )
        want_grad = want_grad[..., layout.tp_rank * shard : (layout.tp_rank + 1) * shard]
        msg = f"TP={tp} bag={bag_size} {dtype} {weights} {name} seed={seed + case}"
        torch.testing.assert_close(loss, want_loss, **TOL[dtype]["loss"], msg=msg)
        torch.testing.assert_close(x.grad.float(), want_grad, **TOL[dtype]["grad"], msg=msg)
        expected_calls = 3 if tp > 1 else 0
        assert forward_calls == expected_calls, f"{msg}: {forward_calls} all-reduces"
        assert backward_calls == 0, f"{msg}: backward communicated"

        if bag_size == 1 and name == "mce" and weights == "uniform":
            # Equal to megatron-core's own vocab-parallel cross-entropy on one target.
            y = x.detach().clone().requires_grad_()
            safe = target[..., 0].clamp_min(0)
            theirs = tensor_parallel.vocab_parallel_cross_entropy(y.float(), safe)
            theirs = torch.where(target[..., 0] == -100, 0.0, theirs)
            torch.testing.assert_close(loss, theirs, atol=1e-5, rtol=1e-5, msg=msg)
        checked += 1
    return checked


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_matches_reference(world4, tp):
    seed = fresh_seed()
    checked = world4.run(_tp_body, tp, seed)
    assert checked == [len(BAG_SIZES) * 2 * 2 * len(LOSSES)] * 4
