"""Bag-aligned megatron-core datasets: sample shape and alignment, blends, mock data, errors.

The corpora here hold distinct token ids (each token's id is its global position), so the
expectations are computed from the documents alone, never from the datasets' own indices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_support import write_positional_dataset

from tst.data import datasets as ds_mod
from tst.data.datasets import (
    DataConfig,
    DatasetTooSmallError,
    TokenIdError,
    build_datasets,
    parse_blend,
)
from tst.data.indexed import IndexedDatasetError

EOD = 0
L = 7


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=60).tolist()
    prefix = str(tmp_path / "pos")
    docs = write_positional_dataset(prefix, lengths)
    return prefix, docs


def _cfg(prefix, bag_size, tmp_path, **kw) -> DataConfig:
    base = dict(
        data_path=[prefix],
        split="1,0,0",
        seq_length=L,
        bag_size=bag_size,
        seed=3,
        vocab_size=20_000,
        eod_id=EOD,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return DataConfig(**base)


def _doc_of(docs) -> dict[int, int]:
    return {t: i for i, d in enumerate(docs) for t in d}


@pytest.mark.parametrize("bag_size", [1, 4, 6])
def test_epoch_of_big_samples_reads_every_token_once(corpus, tmp_path, bag_size):
    prefix, docs = corpus
    total = sum(len(d) for d in docs)
    big = bag_size * (L + 1)
    n = total // big  # one epoch, partial last sample dropped
    train, valid, test = build_datasets(_cfg(prefix, bag_size, tmp_path), (n, 0, 0))
    assert valid is None and test is None
    assert len(train) == n
    seen = []
    doc_of = _doc_of(docs)
    for i in range(n):
        tokens = train[i]["tokens"]
        assert tokens.dtype == torch.int64 and tokens.shape == (big,)
        ids = tokens.tolist()
        seen += ids
        # Contiguous stretches of documents: where ids jump, one document ended and another
        # began at its first token.
        for a, b in zip(ids, ids[1:], strict=False):
            if b != a + 1:
                assert a == docs[doc_of[a]][-1] and b == docs[doc_of[b]][0]
    assert len(set(seen)) == len(seen) == n * big  # no token served twice in the epoch
    assert total - len(seen) < big  # only the epoch's tail is left over


@pytest.mark.parametrize("bag_size", [4, 6])
def test_pad_documents_to_bag_keeps_bags_inside_documents(corpus, tmp_path, bag_size):
    prefix, docs = corpus
    padded_total = sum(-(-len(d) // bag_size) * bag_size for d in docs)
    big = bag_size * (L + 1)
    n = padded_total // big
    doc_of = _doc_of(docs)

    def straddling_bags(dataset) -> int:
        count = 0
        for i in range(len(dataset)):
            for bag in dataset[i]["tokens"].view(-1, bag_size).tolist():
                real = [t for t in bag if t != EOD]
                if len({doc_of[t] for t in real}) > 1:
                    count += 1
                if real:
                    # EOD padding only after the document's last token, in the same bag.
                    k = bag.index(EOD) if EOD in bag else bag_size
                    assert all(t == EOD for t in bag[k:])
        return count

    padded, _, _ = build_datasets(
        _cfg(prefix, bag_size, tmp_path, pad_documents_to_bag=True), (n, 0, 0)
    )
    assert len(padded) == n
    assert straddling_bags(padded) == 0
    served = [t for i in range(n) for t in padded[i]["tokens"].tolist() if t != EOD]
    assert len(set(served)) == len(served)
    # The check can fail: without padding, bags do cross documents on this corpus.
    plain, _, _ = build_datasets(_cfg(prefix, bag_size, tmp_path), (n, 0, 0))
    assert straddling_bags(plain) > 0


def test_same_seed_same_samples_from_cache_other_seed_other_order(corpus, tmp_path):
    prefix, _ = corpus
    a, _, _ = build_datasets(_cfg(prefix, 4, tmp_path), (20, 0, 0))
    b, _, _ = build_datasets(_cfg(prefix, 4, tmp_path), (20, 0, 0))  # cached indices
    c, _, _ = build_datasets(_cfg(prefix, 4, tmp_path, seed=4), (20, 0, 0))
    first = [a[i]["tokens"] for i in range(20)]
    assert all(torch.equal(x, b[i]["tokens"]) for i, x in enumerate(first))
    assert not all(torch.equal(x, c[i]["tokens"]) for i, x in enumerate(first))


def test_more_samples_than_an_epoch_repeat_the_data(corpus, tmp_path):
    prefix, docs = corpus
    total = sum(len(d) for d in docs)
    n = 3 * (total // 32)
    train, _, _ = build_datasets(_cfg(prefix, 4, tmp_path), (n, 0, 0))
    assert len(train) >= n
    counts = np.bincount(torch.cat([train[i]["tokens"] for i in range(n)]).numpy())
    assert counts.max() <= 3


def test_train_valid_test_split_is_disjoint(corpus, tmp_path):
    prefix, docs = corpus
    train, valid, test = build_datasets(_cfg(prefix, 1, tmp_path, split="8,1,1"), (10, 5, 5))
    sets = [
        {t for i in range(len(d)) for t in d[i]["tokens"].tolist()} for d in (train, valid, test)
    ]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # megatron-core's split: documents [0, 48) train, [48, 54) valid, [54, 60) test
    assert max(sets[0]) <= docs[47][-1] < min(sets[1])


def test_weighted_blend(tmp_path):
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    write_positional_dataset(a, [50] * 40, first_id=1)
    write_positional_dataset(b, [50] * 40, first_id=10_001)
    cfg = _cfg(a, 2, tmp_path, data_path=["0.75", a, "0.25", b])
    train, _, _ = build_datasets(cfg, (200, 0, 0))
    from_b = sum(int(train[i]["tokens"][0] > 10_000) for i in range(len(train)))
    assert len(train) == 200
    assert 40 <= from_b <= 60  # 25% of 200
    assert {int(train[i]["dataset_id"]) for i in range(len(train))} == {0, 1}
    # Each part builds its share plus megatron-core's surplus (0.5% by default, rounded up):
    # ceil(ceil(200 x 0.75) x 1.005) = 151 and ceil(50 x 1.005) = 51; with 1.0, twice its share.
    assert [d.num_samples for d in train.datasets] == [151, 51]
    cfg = _cfg(a, 2, tmp_path, data_path=["0.75", a, "0.25", b], mid_level_dataset_surplus=1.0)
    train, _, _ = build_datasets(cfg, (200, 0, 0))
    assert [d.num_samples for d in train.datasets] == [300, 100] and len(train) == 200


def test_mock_data(tmp_path):
    cfg = DataConfig(mock=True, seq_length=L, bag_size=6, vocab_size=500, eod_id=3)
    train, valid, test = build_datasets(cfg, (16, 4, 0))
    assert test is None
    for d in (train, valid):
        tokens = d[0]["tokens"]
        assert tokens.shape == (6 * (L + 1),) and int(tokens.max()) < 500


def test_parse_blend():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    for bad in (["0.7", "a", "b"], ["0.7", "a", "0.3"], ["a", "0.3"], ["-1", "a"]):
        with pytest.raises(ValueError, match="--data-path"):
            parse_blend(bad)


def test_missing_prefix(tmp_path, corpus):
    prefix, _ = corpus
    with pytest.raises(IndexedDatasetError, match=r"no dataset at prefix .*nothing"):
        build_datasets(_cfg(str(tmp_path / "nothing"), 1, tmp_path), (1, 0, 0))
    with pytest.raises(IndexedDatasetError, match="give the prefix without '.bin'"):
        build_datasets(_cfg(prefix + ".bin", 1, tmp_path), (1, 0, 0))


def test_dataset_too_small_for_one_sample(tmp_path):
    prefix = str(tmp_path / "tiny")
    write_positional_dataset(prefix, [5, 5, 5])
    with pytest.raises(DatasetTooSmallError, match=r"train split of .*tiny holds 15 tokens.*32"):
        build_datasets(_cfg(prefix, 4, tmp_path), (1, 0, 0))


def test_empty_split_asked_for_samples_is_an_error_not_a_hang(corpus, tmp_path):
    prefix, _ = corpus
    # 60 documents, split 99.9/0.1/0: valid rounds to zero documents.
    with pytest.raises(DatasetTooSmallError, match="valid split .* 0 tokens in 0 documents"):
        build_datasets(_cfg(prefix, 1, tmp_path, split="999,1,0"), (4, 2, 0))


def test_token_id_at_or_above_vocab(corpus, tmp_path, monkeypatch):
    prefix, docs = corpus
    top = docs[-1][-1]
    with pytest.raises(TokenIdError, match=rf"pos.bin holds token id {top} >= vocab_size 1000"):
        build_datasets(_cfg(prefix, 1, tmp_path, vocab_size=1000), (4, 0, 0))
    # Files too large for the scan at open are checked sample by sample.
    monkeypatch.setattr(ds_mod, "_FULL_SCAN_MAX_TOKENS", 0)
    train, _, _ = build_datasets(_cfg(prefix, 1, tmp_path, vocab_size=1000), (200, 0, 0))
    with pytest.raises(TokenIdError, match="sample .* >= vocab_size 1000"):
        for i in range(len(train)):
            train[i]


def test_dtype_that_cannot_hold_the_vocabulary(corpus, tmp_path):
    prefix, _ = corpus  # small ids: written as uint16
    with pytest.raises(IndexedDatasetError, match=r"uint16 \(ids up to 65535\).*70000"):
        build_datasets(_cfg(prefix, 1, tmp_path, vocab_size=70_000), (4, 0, 0))


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--data-path is required"):
        DataConfig(seq_length=8, vocab_size=10, eod_id=0)
    with pytest.raises(ValueError, match="--bag-size"):
        DataConfig(data_path=["a"], seq_length=8, bag_size=0, vocab_size=10, eod_id=0)
    with pytest.raises(ValueError, match="--seq-length"):
        DataConfig(data_path=["a"], seq_length=0, vocab_size=10, eod_id=0)
