"""Checked opening of .bin/.idx pairs: every broken file is named with the fix; files written
the way Megatron-LM's own preprocessor writes them are read."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from data_support import write_positional_dataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from tst.data.indexed import (
    AtomicIndexedWriter,
    IndexedDatasetError,
    check_indexed_dataset,
    open_indexed_dataset,
)


@pytest.fixture
def pair(tmp_path) -> str:
    prefix = str(tmp_path / "d")
    write_positional_dataset(prefix, [5, 3, 8])
    return prefix


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_good_pair(pair):
    info = check_indexed_dataset(pair)
    assert (info.num_sequences, info.num_documents, info.num_tokens) == (3, 3, 16)
    ds = open_indexed_dataset(pair)
    assert np.array(ds[1]).tolist() == [6, 7, 8]


def test_megatron_lm_style_files_are_read(tmp_path):
    # What Megatron-LM's tools/preprocess_data.py does: the builder with torch tensors.
    prefix = str(tmp_path / "mlm")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in ([1, 2, 3], [70000, 5]):
        builder.add_document(torch.IntTensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    info = check_indexed_dataset(prefix)
    assert info.dtype == np.int32 and info.num_tokens == 5
    ds = open_indexed_dataset(prefix, vocab_size=80000)  # kept alive: its arrays view an mmap
    assert np.array(ds[1]).tolist() == [70000, 5]


def test_truncated_bin(pair):
    _truncate(pair + ".bin", 10)
    with pytest.raises(IndexedDatasetError, match=rf"{pair}.bin is truncated.*preprocess_data"):
        check_indexed_dataset(pair)


def test_bin_longer_than_index(pair):
    with open(pair + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(IndexedDatasetError, match=rf"{pair}.bin is longer than its index"):
        check_indexed_dataset(pair)


@pytest.mark.parametrize("size", [0, 20, 60])
def test_truncated_idx(pair, size):
    _truncate(pair + ".idx", size)
    with pytest.raises(IndexedDatasetError, match=rf"{pair}.idx is truncated"):
        check_indexed_dataset(pair)


def test_bad_magic_version_dtype(pair):
    path = pair + ".idx"
    good = Path(path).read_bytes()
    for offset, value, message in (
        (0, b"XXXX", "not a Megatron index file"),
        (9, struct.pack("<Q", 7), "index version 7"),
        (17, bytes([42]), "unknown token dtype code 42"),
        (17, bytes([7]), "float32, not an integer type"),
    ):
        with open(path, "wb") as f:
            f.write(good[:offset] + value + good[offset + len(value) :])
        with pytest.raises(IndexedDatasetError, match=rf"{path} .*{message}"):
            check_indexed_dataset(pair)


def test_corrupt_document_boundaries(pair):
    path = pair + ".idx"
    data = bytearray(Path(path).read_bytes())
    data[-8:] = struct.pack("<q", 99)  # last boundary must equal the sequence count
    Path(path).write_bytes(bytes(data))
    with pytest.raises(IndexedDatasetError, match="document boundaries"):
        check_indexed_dataset(pair)


def test_missing_files(pair, tmp_path):
    os.remove(pair + ".idx")
    with pytest.raises(IndexedDatasetError, match=rf"{pair}.idx is missing \(its partner exists\)"):
        check_indexed_dataset(pair)
    with pytest.raises(IndexedDatasetError, match=r"no dataset at prefix .*/other"):
        check_indexed_dataset(str(tmp_path / "other"))
    write_positional_dataset(str(tmp_path / "corpus_text_document"), [3])
    with pytest.raises(IndexedDatasetError, match="did you mean .*corpus_text_document"):
        check_indexed_dataset(str(tmp_path / "corpus"))


def test_atomic_writer_abort_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError), AtomicIndexedWriter(prefix, np.uint16) as w:
        w.add_document(np.arange(10))
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_ids_its_dtype_cannot_hold(tmp_path):
    with AtomicIndexedWriter(str(tmp_path / "x"), np.uint16) as w:
        with pytest.raises(IndexedDatasetError, match="70000 does not fit the uint16"):
            w.add_document(np.array([1, 70000]))
        w.abort()
