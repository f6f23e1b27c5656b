"""Megatron ``.bin/.idx`` token files: checked opening and all-or-nothing writing.

The format is megatron-core's (``megatron.core.datasets.indexed_dataset``), so files written
here are read by Megatron-LM and files written by Megatron-LM's ``tools/preprocess_data.py``
are read here. The ``.idx`` holds a 34-byte header (magic, version 1, dtype code, sequence
count ``n``, document count ``m``), then ``n`` int32 lengths, ``n`` int64 byte pointers and
``m`` int64 document boundaries (and ``n`` int8 modes for multimodal files); the ``.bin`` is
the tokens back to back.

megatron-core itself checks little at open (an ``assert`` on the magic; a truncated ``.bin``
surfaces as an mmap or ``frombuffer`` error deep in training). :func:`check_indexed_dataset`
checks sizes and structure first and raises :class:`IndexedDatasetError` naming the file and
the fix. :class:`AtomicIndexedWriter` writes through megatron-core's ``IndexedDatasetBuilder``
into temporary files and renames them into place only when complete, ``.idx`` last, so an
interrupted run never leaves a pair that looks valid.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
)

from tst.errors import InputError

__all__ = [
    "AtomicIndexedWriter",
    "IndexInfo",
    "IndexedDatasetError",
    "check_indexed_dataset",
    "check_dtype_holds_vocab",
    "open_indexed_dataset",
    "token_dtype_for",
]

_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype, n, m = 34
_REBUILD = "rebuild it with tools/preprocess_data.py"


class IndexedDatasetError(InputError):
    """A ``.bin/.idx`` pair is missing, truncated, corrupt or unusable for this model."""


@dataclass(frozen=True)
class IndexInfo:
    """What the ``.idx`` header and arrays say about a dataset."""

    prefix: str
    dtype: type  # numpy integer type of the tokens
    num_sequences: int
    num_documents: int
    num_tokens: int
    multimodal: bool

    @property
    def header_counts(self) -> tuple[int, int]:
        """(sequences, document boundaries) as the ``.idx`` header holds them: the values of
        Megatron-LM's ``--per-dataset-sequences-path`` file."""
        return self.num_sequences, self.num_documents + 1


def token_dtype_for(vocab_size: int) -> type:
    """The token dtype Megatron-LM's preprocessor picks for a vocabulary (uint16 or int32)."""
    return DType.optimal_dtype(vocab_size)


def check_indexed_dataset(prefix: str) -> IndexInfo:
    """Check that ``prefix.bin`` / ``prefix.idx`` exist and agree; return the index summary.

    Reads the ``.idx`` fully (its arrays are small next to the ``.bin``) and only the size of
    the ``.bin``, so it is cheap enough to run at every open.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    _check_exists(prefix, idx_path, bin_path)

    idx_size = os.path.getsize(idx_path)
    if idx_size < _HEADER_BYTES:
        raise IndexedDatasetError(
            f"{idx_path} is truncated: {idx_size} bytes, shorter than the {_HEADER_BYTES}-byte "
            f"header; {_REBUILD}"
        )
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    magic = header[: len(_INDEX_HEADER)]
    if magic != _INDEX_HEADER:
        raise IndexedDatasetError(
            f"{idx_path} is not a Megatron index file (magic {magic!r}, expected "
            f"{_INDEX_HEADER!r}); {_REBUILD}"
        )
    version, code, n, m = struct.unpack("<QBQQ", header[len(_INDEX_HEADER) :])
    if version != 1:
        raise IndexedDatasetError(f"{idx_path} has index version {version}, expected 1; {_REBUILD}")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise IndexedDatasetError(
            f"{idx_path} names an unknown token dtype code {code}; the file is corrupt, {_REBUILD}"
        ) from None
    if not np.issubdtype(dtype, np.integer):
        raise IndexedDatasetError(
            f"{idx_path} stores tokens as {dtype.__name__}, not an integer type: it is not a "
            f"token dataset; {_REBUILD}"
        )

    expected = _HEADER_BYTES + n * (4 + 8) + m * 8
    if idx_size == expected:
        multimodal = False
    elif idx_size == expected + n:  # one int8 mode per sequence
        multimodal = True
    else:
        state = "truncated" if idx_size < expected else "corrupt (longer than its header says)"
        raise IndexedDatasetError(
            f"{idx_path} is {state}: {idx_size} bytes, but its header ({n} sequences, {m} "
            f"document boundaries) needs {expected}; {_REBUILD}"
        )

    arrays = np.memmap(idx_path, mode="r", dtype=np.uint8)
    off = _HEADER_BYTES
    lengths = np.frombuffer(arrays, dtype=np.int32, count=n, offset=off)
    pointers = np.frombuffer(arrays, dtype=np.int64, count=n, offset=off + 4 * n)
    docs = np.frombuffer(arrays, dtype=np.int64, count=m, offset=off + 12 * n)
    itemsize = np.dtype(dtype).itemsize
    if m == 0 or docs[0] != 0 or docs[-1] != n or np.any(np.diff(docs) < 0):
        raise IndexedDatasetError(
            f"{idx_path} is corrupt: its document boundaries must rise from 0 to the sequence "
            f"count {n}; {_REBUILD}"
        )
    if n and (np.any(lengths < 0) or pointers[0] != 0):
        raise IndexedDatasetError(f"{idx_path} is corrupt: bad sequence lengths; {_REBUILD}")
    if n > 1 and np.any(np.diff(pointers) != lengths[:-1].astype(np.int64) * itemsize):
        raise IndexedDatasetError(
            f"{idx_path} is corrupt: sequence pointers do not follow the lengths; {_REBUILD}"
        )
    num_tokens = int(lengths.sum(dtype=np.int64))
    del arrays, lengths, pointers, docs
    if num_tokens == 0:
        # megatron-core would fail later with "cannot mmap an empty file", naming nothing.
        held = "no documents" if n == 0 else f"{n} document(s) of 0 tokens"
        raise IndexedDatasetError(
            f"{prefix}.bin / .idx is an empty dataset ({held}): nothing to train on; rebuild it "
            "with tools/preprocess_data.py from input that holds text (it now refuses empty "
            "input), or drop the prefix from --data-path"
        )

    bin_size = os.path.getsize(bin_path)
    if bin_size != num_tokens * itemsize:
        state = "truncated" if bin_size < num_tokens * itemsize else "longer than its index says"
        raise IndexedDatasetError(
            f"{bin_path} is {state}: {bin_size} bytes, but {idx_path} describes {num_tokens} "
            f"{dtype.__name__} tokens = {num_tokens * itemsize} bytes (the pair may come from "
            f"different runs); {_REBUILD}"
        )
    return IndexInfo(prefix, dtype, n, m - 1, num_tokens, multimodal)


def check_dtype_holds_vocab(info: IndexInfo, vocab_size: int) -> None:
    """Raise if the file's token dtype cannot represent ids below ``vocab_size``.

    The preprocessor sizes the dtype from its tokenizer's vocabulary, so a dtype too small for
    the model's vocabulary means the data was made with a different, smaller tokenizer (or
    wrapped around on write).
    """
    top = int(np.iinfo(info.dtype).max)
    if vocab_size - 1 > top:
        raise IndexedDatasetError(
            f"{info.prefix}.bin stores tokens as {info.dtype.__name__} (ids up to {top}) but the "
            f"vocabulary has {vocab_size} ids: the data was tokenized with a different tokenizer; "
            "re-run tools/preprocess_data.py with the model's tokenizer"
        )


def open_indexed_dataset(
    prefix: str, vocab_size: int | None = None, mmap: bool = True
) -> IndexedDataset:
    """Check ``prefix`` (and, given ``vocab_size``, its dtype), then open it with megatron-core.

    The arrays it returns view a memory map that megatron-core closes when the dataset object
    is collected: keep the dataset referenced while using them (or copy them).
    """
    info = check_indexed_dataset(prefix)
    if vocab_size is not None:
        check_dtype_holds_vocab(info, vocab_size)
    # mmap=False (--no-mmap-bin-files) reads samples with file reads instead of a memory map.
    return IndexedDataset(prefix, multimodal=info.multimodal, mmap=mmap)


def _check_exists(prefix: str, idx_path: str, bin_path: str) -> None:
    has_idx, has_bin = os.path.isfile(idx_path), os.path.isfile(bin_path)
    if has_idx and has_bin:
        return
    if has_idx != has_bin:
        missing = bin_path if has_idx else idx_path
        raise IndexedDatasetError(
            f"{missing} is missing (its partner exists): the pair is incomplete; {_REBUILD}"
        )
    hint = ""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            hint = f"; give the prefix without {suffix!r}: {prefix[: -len(suffix)]}"
    if not hint:
        near = sorted(glob.glob(glob.escape(prefix) + "*.idx"))[:3]
        if near:
            hint = "; did you mean " + " or ".join(p[:-4] for p in near) + " ?"
            hint += " (preprocess_data.py appends _<json-key>_document to --output-prefix)"
    raise IndexedDatasetError(
        f"no dataset at prefix {prefix}: {bin_path} and {idx_path} do not exist{hint}"
    )


class AtomicIndexedWriter:
    """megatron-core's ``IndexedDatasetBuilder`` writing to temporary files.

    :meth:`commit` finalizes the index and renames both files into place, the ``.idx`` last
    (after removing any old ``.idx`` first), so at no moment does a new ``.bin`` sit beside an
    old ``.idx``; :meth:`abort` (also on leaving a ``with`` block by an exception) removes the
    temporaries.
    """

    def __init__(self, prefix: str, dtype: type) -> None:
        self.prefix = prefix
        self.dtype = dtype
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = prefix + ".bin" + tag
        self._tmp_idx = prefix + ".idx" + tag
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=dtype)
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (one sequence) of token ids."""
        arr = np.asarray(tokens)
        if arr.size and (arr.max() > np.iinfo(self.dtype).max or arr.min() < 0):
            raise IndexedDatasetError(
                f"token id {int(arr.max())} does not fit the {self.dtype.__name__} tokens of "
                f"{self.prefix}.bin"
            )
        # The builder copies through numpy.array, so a numpy array serves as well as a tensor.
        self._builder.add_document(arr.astype(self.dtype, copy=False), [arr.size])
        self.num_documents += 1
        self.num_tokens += int(arr.size)

    def add_dataset(self, info: IndexInfo) -> None:
        """Append a whole checked dataset (:func:`check_indexed_dataset`'s ``info``): its
        documents after those already written, its ``.bin`` copied as it is."""
        if info.multimodal:
            raise IndexedDatasetError(
                f"{info.prefix}.idx is a multimodal index: only token datasets are merged here"
            )
        if info.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{info.prefix} stores tokens as {info.dtype.__name__}, the datasets before it as "
                f"{self.dtype.__name__}: they were tokenized with different vocabularies (a "
                "merged file has one token type); merge only datasets of one tokenizer"
            )
        self._builder.add_index(info.prefix)
        self.num_documents += info.num_sequences
        self.num_tokens += info.num_tokens

    def commit(self) -> tuple[str, str]:
        """Write the index and move both files into place; returns (bin path, idx path)."""
        self._builder.finalize(self._tmp_idx)
        bin_path, idx_path = self.prefix + ".bin", self.prefix + ".idx"
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(self._tmp_bin, bin_path)
        os.replace(self._tmp_idx, idx_path)
        self._done = True
        return bin_path, idx_path

    def abort(self) -> None:
        """Drop the temporary files (idempotent)."""
        if self._done:
            return
        self._builder.data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> AtomicIndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
