"""Bag embedding against the reference mean of token embeddings, at TP = 1, 2, 4, SP on/off.

Tolerances: fp32 outputs and gradients agree to atol 1e-6 (the mean is summed in a different
order when a bag spans vocabulary shards). With bag_size 1 the module must be bit-identical
to megatron-core's stock LanguageModelEmbedding, outputs and gradients.
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from test_losses import fresh_seed

VOCAB, HIDDEN = 64, 16
TOL = dict(atol=1e-6, rtol=1e-5)


def _config(tp: int, sp: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
    )


def _embedding(cls, tp, sp, position_type, **kwargs):
    return cls(
        config=_config(tp, sp),
        vocab_size=VOCAB,
        max_sequence_length=32,
        position_embedding_type=position_type,
        **kwargs,
    )


def _load_full_table(module, table, positions, tp_rank, tp):
    shard = VOCAB // tp
    with torch.no_grad():
        module.word_embeddings.weight.copy_(table[tp_rank * shard : (tp_rank + 1) * shard])
        if hasattr(module, "position_embeddings"):
            module.position_embeddings.weight.copy_(positions)


def _embedding_body(tp: int, sp: bool, seed: int) -> int:
    from tst.embedding import BagEmbedding
    from tst.platform import initialize

    layout = initialize(tp=tp, seed=seed)
    checked = 0
    for case, (bag_size, position_type) in enumerate(
        (b, p) for b in (1, 2, 4, 6) for p in ("rope", "learned_absolute")
    ):
        gen = torch.Generator().manual_seed(seed + case)
        table = torch.randn(VOCAB, HIDDEN, generator=gen)
        positions = torch.randn(32, HIDDEN, generator=gen)
        batch, num_bags = 3, 4 * tp
        ids = torch.randint(0, VOCAB, (batch, num_bags * bag_size), generator=gen)
        position_ids = torch.arange(num_bags).expand(batch, -1)
        grad_full = torch.randn(num_bags, batch, HIDDEN, generator=gen)

        module = _embedding(BagEmbedding, tp, sp, position_type, bag_size=bag_size)
        _load_full_table(module, table, positions, layout.tp_rank, tp)
        out = module(ids, position_ids)
        chunk = num_bags // tp if sp else num_bags
        rows = slice(layout.tp_rank * chunk, (layout.tp_rank + 1) * chunk) if sp else slice(None)
        out.backward(grad_full[rows])

        ref_table = table.clone().requires_grad_()
        ref_positions = positions.clone().requires_grad_()
        want = ref.bag_embedding(ref_table, ids, bag_size)
        if position_type == "learned_absolute":
            want = want + ref_positions[position_ids].transpose(0, 1)
        want.backward(grad_full)
        msg = f"TP={tp} SP={sp} bag={bag_size} {position_type} seed={seed + case}"
        torch.testing.assert_close(out, want.detach()[rows], **TOL, msg=msg)
        shard = VOCAB // tp
        want_grad = ref_table.grad[layout.tp_rank * shard : (layout.tp_rank + 1) * shard]
        torch.testing.assert_close(module.word_embeddings.weight.grad, want_grad, **TOL, msg=msg)
        if position_type == "learned_absolute":
            torch.testing.assert_close(
                module.position_embeddings.weight.grad, ref_positions.grad, **TOL, msg=msg
            )

        if bag_size == 1:
            _check_bit_identical_to_stock(
                module, ids, position_ids, grad_full[rows], tp, sp, position_type, msg
            )
        checked += 1
    return checked


def _check_bit_identical_to_stock(module, ids, position_ids, grad, tp, sp, position_type, msg):
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding,
    )

    stock = _embedding(LanguageModelEmbedding, tp, sp, position_type)
    stock.load_state_dict(module.state_dict())
    assert list(dict(stock.named_parameters())) == list(dict(module.named_parameters()))
    mine = module(ids, position_ids)
    theirs = stock(ids, position_ids)
    assert torch.equal(mine, theirs), msg
    module.zero_grad()
    mine.backward(grad)
    theirs.backward(grad)
    for (name, a), (_, b) in zip(module.named_parameters(), stock.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), f"{msg}: {name}"


@pytest.mark.parametrize(
    "tp,sp", [(1, False), (2, False), (2, True), (4, False), (4, True)], ids=str
)
def test_bag_embedding_matches_reference(world4, tp, sp):
    assert world4.run(_embedding_body, tp, sp, fresh_seed()) == [8] * 4


def test_bad_input_is_refused():
    from tst.platform import initialize, shutdown

    initialize(tp=1)
    try:
        from tst.embedding import BagEmbedding

        module = _embedding(BagEmbedding, 1, False, "rope", bag_size=4)
        with pytest.raises(ValueError, match="not a multiple of bag_size=4"):
            module(torch.zeros(2, 10, dtype=torch.long), None)
        with pytest.raises(ValueError, match="position ids count bags"):
            module(torch.zeros(2, 8, dtype=torch.long), torch.arange(8).expand(2, -1))
        with pytest.raises(ValueError, match=r"\[batch, L \* bag_size\]"):
            module(torch.zeros(8, dtype=torch.long), None)
        with pytest.raises(ValueError, match="positive integer"):
            module.bag_size = 0
    finally:
        shutdown()
