"""The local spec's fused core attention (``tst.attention.SDPAttention``) against megatron-core's
unfused ``DotProductAttention`` and a plain softmax-attention reference written here.

Which attention a model gets: ``--attention-backend flash`` / ``fused`` the fused one,
``unfused`` / ``local`` megatron-core's, ``auto`` the fused one on CUDA only. Both have no
parameters, so one state dict loads into either. Tolerances (fp32, the same products in
another order): outputs and gradients rel 1e-5 / abs 1e-6 against megatron-core,
rel 1e-4 / abs 1e-5 against the plain reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from flags import one_rank_gpt

from gpt_helpers import gpt_from_flags
from reference import tst_batch

VOCAB, L, BATCH = 64, 8, 2
FLAGS = one_rank_gpt(VOCAB, L, BATCH, layers=2)
GQA = ["--group-query-attention", "--num-query-groups", "2"]


def _build(layout, flags, on_gpu=False):
    return gpt_from_flags(layout, flags, VOCAB, on_gpu).train()


def _core(model):
    return [layer.self_attention.core_attention for layer in model.decoder.layers]


def _plain_attention(q, k, v, scale):
    """softmax(q k^T * scale + causal) v per head, [s, b, n, d] in and [s, b, n * d] out;
    key/value groups repeated over consecutive query heads."""
    s, b, n, d = q.shape
    groups = n // k.size(2)
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * scale
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, n * v.size(-1))


def test_the_backend_flag_picks_the_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tst.attention import SDPAttention
    from tst.export.loading import single_process_world

    with single_process_world() as layout:
        for backend, on_gpu, want in [
            ("flash", False, SDPAttention), ("fused", False, SDPAttention),
            ("unfused", False, DotProductAttention), ("local", False, DotProductAttention),
            ("auto", False, DotProductAttention), ("auto", True, SDPAttention),
            ("unfused", True, DotProductAttention),
        ]:  # fmt: skip
            cores = _core(_build(layout, [*FLAGS, "--attention-backend", backend], on_gpu))
            assert all(type(c) is want for c in cores), (backend, on_gpu)
        # The default is auto: megatron-core's attention on CPU.
        assert all(type(c) is DotProductAttention for c in _core(_build(layout, FLAGS)))
        # No parameters of its own: the state dicts are the same, key for key.
        fused = _build(layout, [*FLAGS, "--attention-backend", "flash"]).state_dict()
        plain = _build(layout, [*FLAGS, "--attention-backend", "unfused"]).state_dict()
        assert fused.keys() == plain.keys()


@pytest.mark.parametrize("extra", [[], GQA], ids=["mha", "gqa"])
def test_core_attention_matches_megatron_and_the_plain_reference(extra):
    from megatron.core.transformer.enums import AttnMaskType

    from tst.export.loading import single_process_world

    gen = torch.Generator().manual_seed(3)
    with single_process_world() as layout:
        fused = _core(_build(layout, [*FLAGS, *extra, "--attention-backend", "flash"]))[0]
        plain = _core(_build(layout, [*FLAGS, *extra, "--attention-backend", "unfused"]))[0]
        heads, groups = 4, 2 if extra else 4
        q = torch.randn(L, BATCH, heads, 8, generator=gen, requires_grad=True)
        k = torch.randn(L, BATCH, groups, 8, generator=gen, requires_grad=True)
        v = torch.randn(L, BATCH, groups, 8, generator=gen, requires_grad=True)
        upstream = torch.randn(L, BATCH, heads * 8, generator=gen)
        causal = torch.ones(L, L, dtype=torch.bool).triu(1).view(1, 1, L, L)  # True: masked

        def run(module, mask, mask_type=None):
            out = module(q, k, v, mask, attn_mask_type=mask_type)
            grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
            return out.detach(), grads

        want, want_grads = run(plain, None)
        reference = _plain_attention(q.detach(), k.detach(), v.detach(), 1 / math.sqrt(8))
        torch.testing.assert_close(want, reference, rtol=1e-4, atol=1e-5)
        for mask in (None, causal):  # the causal kernel, and megatron-core's explicit mask
            got, got_grads = run(fused, mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for g, w in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        # No mask at all: every position sees every other (the reference without `future`).
        got, _ = run(fused, None, AttnMaskType.no_mask)
        assert not torch.allclose(got, want, atol=1e-3)
        assert torch.allclose(got[-1], want[-1], rtol=1e-5, atol=1e-6)  # the last row agrees


@pytest.mark.parametrize("bag_size", [3, 1], ids=["superposition", "recovery"])
def test_model_loss_and_gradients_match_megatrons_attention(bag_size):
    """The whole model in each TST phase, the same weights, either attention: the loss and
    every parameter's gradient agree."""
    from tst.export.loading import single_process_world
    from tst.losses import vocab_parallel_multi_hot_cross_entropy

    gen = torch.Generator().manual_seed(7)
    chunk = torch.randint(0, VOCAB, (BATCH, bag_size * (L + 1)), generator=gen)
    inputs, targets, mask = tst_batch(chunk, bag_size)
    positions = torch.arange(L).expand(BATCH, -1)
    results = []
    with single_process_world() as layout:
        weights = None
        for backend in ("unfused", "flash"):
            model = _build(layout, [*FLAGS, *GQA, "--attention-backend", backend])
            if weights is None:
                weights = model.state_dict()
            model.load_state_dict(weights)
            model.embedding.bag_size = bag_size
            model.tst_loss = vocab_parallel_multi_hot_cross_entropy
            loss = model(inputs, positions, attention_mask=None, labels=targets, loss_mask=mask)
            (loss * mask).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results.append((loss.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_attention_dropout_applies_in_training_only():
    from tst.export.loading import single_process_world

    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(L, BATCH, 4, 8, generator=gen) for _ in range(3))
    with single_process_world() as layout:
        flags = [*FLAGS, "--attention-backend", "flash"]
        flags[flags.index("--attention-dropout") + 1] = "0.5"
        core = _core(_build(layout, flags))[0]
        clean = _core(_build(layout, [*FLAGS, "--attention-backend", "flash"]))[0]
        want = clean(q, k, v, None)
        core.eval()
        torch.testing.assert_close(core(q, k, v, None), want)
        core.train()
        dropped = core(q, k, v, None)
        assert not torch.allclose(dropped, want, atol=1e-3)
        # Inverted dropout keeps the expectation: the mean over many draws nears the clean output.
        mean = torch.stack([core(q, k, v, None) for _ in range(400)]).mean(0)
        assert (mean - want).abs().mean() < 0.05 * want.abs().mean()
