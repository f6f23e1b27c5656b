"""Bag-aligned GPT datasets for both TST phases, built on megatron-core's dataset machinery.

Every item is one *big sample*: exactly ``bag_size * (L + 1)`` consecutive tokens of the
(shuffled-by-document) corpus, as ``{"tokens": LongTensor[bag_size * (L + 1)]}``. The
superposition phase folds one big sample into ``L`` input bags plus one target bag (the
``full`` layout of :mod:`tst.data.batch`); the recovery phase reads the same big sample as
``bag_size`` ordinary ``L + 1``-token rows (:class:`tst.data.stream.SampleStream`), so the
same ``.bin/.idx`` files and the same sample index serve both phases.

megatron-core builds the samples: ``BlendedMegatronDatasetBuilder`` (weighted blends, the
train/valid/test split, seeded shuffling, cached indices) over :class:`TSTGPTDataset`, a
``GPTDataset`` subclass. It is asked for ``sequence_length = bag_size * (L + 1)`` with
``add_extra_token_to_sequence=False``: consecutive big samples then tile the token stream
without overlap (stock Megatron overlaps them by one token), so no raw token is served
twice in an epoch and, with ``pad_documents_to_bag``, every big sample starts at a multiple
of ``bag_size`` in the stream, which is what keeps bags inside documents.

``pad_documents_to_bag`` (off by default, as in the paper, where bags cross documents) pads
each document with EOD up to a multiple of ``bag_size`` when the samples are cut; the files
on disk are unchanged.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTLowLevelDataset,
)
from megatron.core.datasets.utils import Split

from tst.data.indexed import check_indexed_dataset, open_indexed_dataset
from tst.errors import InputError

__all__ = [
    "DataConfig",
    "DatasetTooSmallError",
    "MockDocuments",
    "TSTDatasetConfig",
    "TSTGPTDataset",
    "TokenIdError",
    "build_datasets",
    "parse_blend",
]

logger = logging.getLogger(__name__)

# Files up to this many tokens are scanned whole for out-of-vocabulary ids when opened (a
# numpy max over the memory map, well under a second); larger ones are checked per sample.
_FULL_SCAN_MAX_TOKENS = 1 << 27


class DatasetTooSmallError(InputError):
    """A split holds fewer tokens than one sample needs."""


class TokenIdError(InputError):
    """The data holds a token id at or above the model's vocabulary size."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the training data comes from and how it is cut (the ``--data-*`` flags)."""

    data_path: list[str] = field(default_factory=list)
    """--data-path: prefixes, optionally weighted: ["a"], ["a", "b"] or ["0.7", "a", "0.3", "b"]."""
    split: str | None = "969,30,1"
    """--split: train,valid,test weights over the documents of each prefix (not with
    blend_per_split)."""
    blend_per_split: tuple[list[str] | None, ...] | None = None
    """--train/valid/test-data-path (or --per-split-data-args-path): one blend per split, each
    read whole; a split without one is not built. Instead of data_path and split."""
    seq_length: int
    """--seq-length: L, the positions the transformer sees."""
    bag_size: int = 1
    """--bag-size: the superposition bag size (1 = plain next-token training)."""
    seed: int = 1234
    """--seed: document and sample shuffling."""
    mock: bool = False
    """--mock-data: synthetic documents instead of --data-path."""
    vocab_size: int
    """The model's vocabulary size: every token id must be below it."""
    eod_id: int
    """The tokenizer's end-of-document id (padding with pad_documents_to_bag; mock data)."""
    pad_documents_to_bag: bool = False
    """--pad-documents-to-bag: EOD-pad documents to a multiple of bag_size (bags never span
    two documents); off as in the paper."""
    cache_dir: str | None = None
    """--data-cache-path: where sample indices are cached (default: <first prefix dir>/index-cache)."""
    mmap_bin_files: bool = True
    """--no-mmap-bin-files turns it off: samples are read with file reads, not a memory map."""
    mid_level_dataset_surplus: float = 0.005
    """--mid-level-dataset-surplus: each dataset of a weighted blend builds this share more
    samples than the blend takes from it."""
    multiple_validation_sets: bool = False
    """--multiple-validation-sets: each prefix of the validation blend is its own dataset
    (read whole: its size must be None), the validation split a list of them."""
    fast_cache_load: bool = False
    """--dataloader-fast-cache-load: the sample indices are taken from the cache without
    reading the prefixes' document indices or the rank-0-first order (per-split blends only;
    every cache must be built: a run without the flag builds them)."""
    defer_index_mmap: bool = False
    """--dataloader-defer-npy-index-mmap: each dataset maps its cached indices at its first
    sample, not when it is built (every cache must be built)."""
    sequences_per_dataset: dict[str, tuple[int, int]] | None = None
    fim: Any = None
    """--fim-data: a :class:`tst.data.fim.FIMTransform` applied to every sample read."""
    """--per-dataset-sequences-path: each prefix's (sequences, document boundaries), as its
    ``.idx`` header holds them; every prefix read must be listed and agree."""

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        if self.bag_size < 1:
            raise ValueError(f"--bag-size must be >= 1, got {self.bag_size}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if not 0 <= self.eod_id < self.vocab_size:
            raise ValueError(f"eod_id {self.eod_id} must be in [0, vocab_size={self.vocab_size})")
        if self.blend_per_split is not None:
            if self.mock or self.data_path or len(self.blend_per_split) != 3:
                raise ValueError(
                    "blend_per_split takes three blends (train, valid, test), without "
                    "--data-path or --mock-data"
                )
            for blend, name in zip(self.blend_per_split, ("train", "valid", "test"), strict=True):
                if blend is not None:
                    parse_blend(blend, f"--{name}-data-path")
            self.split = None  # each split reads its blend whole, as in Megatron-LM
            return
        if self.fast_cache_load:
            raise ValueError(
                "--dataloader-fast-cache-load reads per-split blends (--train-data-path / "
                "--valid-data-path / --test-data-path or --per-split-data-args-path), as in "
                "Megatron-LM: not --data-path or --mock-data"
            )
        if self.mock and self.defer_index_mmap:
            raise ValueError("--dataloader-defer-npy-index-mmap maps cached indices: mock data "
                             "has none; drop it")  # fmt: skip
        if not self.mock and not self.data_path:
            raise ValueError("--data-path is required (or --mock-data for synthetic data)")
        if not self.mock:
            parse_blend(self.data_path)

    @property
    def sample_length(self) -> int:
        """Tokens per big sample: ``bag_size * (seq_length + 1)``."""
        return self.bag_size * (self.seq_length + 1)


def parse_blend(
    data_path: list[str], flag: str = "--data-path"
) -> tuple[list[str], list[float] | None]:
    """Megatron's blend list -> (prefixes, weights or None), with errors naming ``flag``."""
    if not data_path:
        raise ValueError(f"{flag} is empty")

    def number(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    numbers = [number(s) for s in data_path]
    if all(n is None for n in numbers):
        return [s.strip() for s in data_path], None
    weights, prefixes = numbers[0::2], data_path[1::2]
    if (
        len(data_path) % 2
        or any(w is None for w in weights)
        or any(number(p) is not None for p in prefixes)
    ):
        raise ValueError(
            f"{flag} {' '.join(data_path)}: give prefixes only, or weight/prefix pairs "
            "such as 0.7 a 0.3 b"
        )
    if any(not math.isfinite(w) for w in weights):
        raise ValueError(f"{flag} weights must be finite numbers, got {weights}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{flag} weights must be >= 0 with a positive sum, got {weights}")
    return [p.strip() for p in prefixes], [float(w) for w in weights]


class _DatasetTokenizer:
    """What megatron-core's dataset config needs of a tokenizer: vocab size, EOD, and an
    identity for the cache hash (it never tokenizes text here)."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": "TSTTokenIds", "vocab_size": vocab_size, "eod": eod}


@dataclass
class TSTDatasetConfig(GPTDatasetConfig):
    """``GPTDatasetConfig`` plus the bag settings; part of the sample-index cache key."""

    bag_size: int = 1
    pad_documents_to_bag: bool = False
    vocab_size: int = 0
    fim: Any = None  # a tst.data.fim.FIMTransform (--fim-data); rearranges what is read


class BagPaddedDocuments:
    """A low-level dataset whose documents are EOD-padded to a multiple of ``bag_size``.

    Presents megatron-core's low-level interface (``sequence_lengths``, ``get``,
    ``path_prefix``, ``len``) over an ``IndexedDataset`` or the mock one, padding on read.
    """

    def __init__(self, inner, bag_size: int, eod: int) -> None:
        self.inner = inner
        self.bag_size = bag_size
        self.eod = eod
        self.raw_lengths = np.asarray(inner.sequence_lengths, dtype=np.int32)
        # GPTDataset's C++ sample-index builder wants int32 lengths.
        self.sequence_lengths = (-(-self.raw_lengths // bag_size) * bag_size).astype(np.int32)
        self.path_prefix = getattr(inner, "path_prefix", None)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        padded = int(self.sequence_lengths[idx])
        if length is None:
            length = padded - offset
        raw = int(self.raw_lengths[idx])
        end = min(offset + length, raw)
        real = self.inner.get(idx, offset=offset, length=end - offset) if end > offset else []
        out = np.full(length, self.eod, dtype=np.int64)
        out[: len(real)] = real
        return out


class MockDocuments(MockGPTLowLevelDataset):
    """``--mock-data``'s documents: megatron-core's mock documents (lengths drawn from 1 to
    4,095 with seed 0, tokens counting up from 1, each ending in EOD), 8,192 of them rather
    than megatron-core's 100,000. Every split still holds documents, and a run that needs
    more samples repeats the epoch (as any small corpus does); but each rank no longer builds
    and shuffles the sample indices of 205M tokens per split (at sequence length 8, three
    arrays of 25M entries: over a second and hundreds of MB per rank at every start)."""

    size = 8192


class TSTGPTDataset(GPTDataset):
    """``GPTDataset`` serving whole big samples of ``bag_size * (L + 1)`` tokens.

    Adds, on top of the stock class: checked opening of the files (sizes, headers, dtype vs
    vocabulary), a clear error when a split is too small for one sample (stock megatron-core
    loops forever on an empty split), per-sample vocabulary checks, optional EOD padding of
    documents to the bag size, and mock data from the same class.
    """

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, split, config):
        # num_samples is None for the parts of an unweighted blend (each read whole, weighted
        # by its sample count): an empty one would meet megatron-core's bare weight assertion.
        if indexed_indices is not None and num_samples != 0:
            tokens = int(np.sum(indexed_dataset.sequence_lengths[indexed_indices], dtype=np.int64))
            need = config.sequence_length + int(config.add_extra_token_to_sequence)
            if tokens < need:
                raise DatasetTooSmallError(
                    f"the {split.name} split of {dataset_path or 'the mock data'} holds {tokens} "
                    f"tokens in {len(indexed_indices)} documents, fewer than one sample of "
                    f"{need} tokens (bag_size * (seq_length + 1)); use a smaller --seq-length or "
                    f"--bag-size, more data, or "
                    + (f"give this split more weight in --split ({config.split})" if config.split
                       else f"another prefix in --{split.name}-data-path")
                )  # fmt: skip
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, split, config)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [
            *GPTDataset._key_config_attributes(),
            "bag_size",
            "pad_documents_to_bag",
            "add_extra_token_to_sequence",
        ]

    @staticmethod
    def numel_low_level_dataset(low_level_dataset) -> int:
        return len(low_level_dataset.sequence_lengths)

    @staticmethod
    def build_low_level_dataset(dataset_path: str | None, config: TSTDatasetConfig):
        if dataset_path is None:  # --mock-data
            low = MockDocuments(config.tokenizer)
        else:
            low = open_indexed_dataset(dataset_path, config.vocab_size, config.mmap_bin_files)
            _scan_vocab(dataset_path, low, config.vocab_size)
        if config.pad_documents_to_bag and config.bag_size > 1:
            low = BagPaddedDocuments(low, config.bag_size, config.tokenizer.eod)
        return low

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        text, _ = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
        tokens = torch.from_numpy(np.asarray(text, dtype=np.int64))
        if tokens.numel() and int(tokens.max()) >= self.config.vocab_size:
            bad = int(tokens.max())
            raise TokenIdError(
                f"{self.dataset_path}: sample {idx} holds token id {bad} >= vocab_size "
                f"{self.config.vocab_size}: the data was tokenized with a larger vocabulary; "
                "re-run tools/preprocess_data.py with the model's tokenizer or raise --vocab-size"
            )
        # Stock GPTDataset pads a short final sample with -1; there is none when partial
        # samples are dropped (our setting), but never hand a negative id to an embedding.
        tokens[tokens < 0] = self.config.tokenizer.eod
        if self.config.fim is not None:
            split = self.index_split.value
            tokens = torch.from_numpy(self.config.fim(tokens.numpy(), split, int(idx or 0)))
        return {"tokens": tokens}


def _scan_vocab(prefix: str, low, vocab_size: int) -> None:
    info = check_indexed_dataset(prefix)
    if info.num_tokens == 0 or info.num_tokens > _FULL_SCAN_MAX_TOKENS:
        return
    tokens = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r")
    top = int(tokens.max())
    if top >= vocab_size:
        raise TokenIdError(
            f"{prefix}.bin holds token id {top} >= vocab_size {vocab_size}: the data was "
            "tokenized with a larger vocabulary; re-run tools/preprocess_data.py with the "
            "model's tokenizer or raise --vocab-size"
        )


class _Builder(BlendedMegatronDatasetBuilder):
    """The stock builder, usable without ``torch.distributed`` for weighted blends, and with
    an optional test split.

    megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` when its
    index cache misses, which raises in a single process (tools, tests); there the blend
    indices (cheap to rebuild) are simply not cached. The per-prefix sample indices still are.

    With ``optional_test``, a test split too small for one sample is None and the first
    :class:`DatasetTooSmallError` saying so is kept in ``test_too_small``. The error is caught
    inside the dataset's construction, so every rank still meets megatron-core's rank-0-first
    barriers. A blend with one such component has no test split at all: the other components
    are not blended without it.
    """

    def __init__(self, *args, optional_test: bool = False) -> None:
        super().__init__(*args)
        self.optional_test = optional_test
        self.test_too_small: DatasetTooSmallError | None = None

    def build_generic_dataset(self, cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset:
            if self.test_too_small is not None and None in args[0]:  # a component too small
                return None
            if not torch.distributed.is_initialized():
                *rest, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                args = (*rest, config)
        elif self.optional_test and args[-2] is Split.test:  # (..., num_samples, split, config)
            cls = functools.partial(self._test_split_or_none, cls)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )

    def _test_split_or_none(self, cls, *args) -> TSTGPTDataset | None:
        try:
            return cls(*args)
        except DatasetTooSmallError as error:
            if self.test_too_small is None:
                self.test_too_small = error
            return None


def build_datasets(
    cfg: DataConfig,
    num_samples: tuple[int, int, int],
    on_test_too_small: Callable[[DatasetTooSmallError], None] | None = None,
) -> tuple[TSTGPTDataset | None, ...]:
    """Build (train, valid, test) datasets of big samples; a split asked for 0 samples is None.

    ``num_samples`` counts big samples (``bag_size * (L + 1)`` tokens each) per split;
    megatron-core repeats epochs (reshuffled) to reach it; None asks for the whole split, once
    (one epoch, no weights in its blend). Call on every rank: each builds
    its own copy (rank 0 first when ``torch.distributed`` is up, the others then load the
    cached indices).

    A split too small for one sample raises :class:`DatasetTooSmallError`, except the test
    split when ``on_test_too_small`` is given: that split is then None and the error is
    passed to ``on_test_too_small`` (on every rank), so that a tiny test split, scored once
    at the end of a run, skips that score instead of stopping the run.
    """
    if len(num_samples) != 3 or any(n is not None and n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three counts >= 0 (or None), got {num_samples}")
    blend = per_split = None
    cache = None
    if cfg.blend_per_split is not None:
        # A split nobody reads is not built (a blend given for it is not even opened).
        per_split = [
            parse_blend(b, f"--{name}-data-path") if b is not None and n != 0 else None
            for b, n, name in zip(cfg.blend_per_split, num_samples, ("train", "valid", "test"),
                                  strict=True)
        ]  # fmt: skip
        prefixes = [p for b in per_split if b is not None for p in b[0]]
        if not prefixes:  # no split asked for has a blend: nothing to build
            return None, None, None
    elif not cfg.mock:
        blend = parse_blend(cfg.data_path)
        prefixes = blend[0]
    if blend is not None or per_split is not None:
        for prefix in prefixes:
            info = check_indexed_dataset(prefix)  # a missing or broken prefix fails here, by name
            if cfg.sequences_per_dataset is not None:
                _check_listed_counts(info, cfg.sequences_per_dataset)
        cache = cfg.cache_dir or os.path.join(
            os.path.dirname(os.path.abspath(prefixes[0])), "index-cache"
        )
    config = TSTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.sample_length,
        blend=blend,
        blend_per_split=per_split,
        split=cfg.split if blend is not None else None,
        path_to_cache=cache,
        tokenizer=_DatasetTokenizer(cfg.vocab_size, cfg.eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
        bag_size=cfg.bag_size,
        pad_documents_to_bag=cfg.pad_documents_to_bag,
        vocab_size=cfg.vocab_size,
        mmap_bin_files=cfg.mmap_bin_files,
        mid_level_dataset_surplus=cfg.mid_level_dataset_surplus,
        multiple_validation_sets=cfg.multiple_validation_sets,
        full_validation=cfg.multiple_validation_sets and num_samples[1] is None,
        fast_cache_load=cfg.fast_cache_load,
        defer_npy_index_mmap=cfg.defer_index_mmap,
        fim=cfg.fim,
    )
    # A split nobody reads is not built: stock megatron-core would otherwise try to build it
    # and, when the split holds no document, loop forever.
    if per_split is None:
        for split in Split:
            if num_samples[split.value] == 0:
                config.split_matrix[split.value] = None
    logger.info(
        "building datasets: %s, big samples of %d tokens (bag_size %d x (L %d + 1)), "
        "samples per split %s",
        "mock data" if cfg.mock else f"blend {blend}" if blend else f"blends {per_split}",
        cfg.sample_length,
        cfg.bag_size,
        cfg.seq_length,
        num_samples,
    )
    builder = _Builder(
        TSTGPTDataset,
        list(num_samples),
        lambda: True,
        config,
        optional_test=on_test_too_small is not None,
    )
    cached_only = [flag for flag, on in (("--dataloader-fast-cache-load", cfg.fast_cache_load),
                   ("--dataloader-defer-npy-index-mmap", cfg.defer_index_mmap)) if on]  # fmt: skip
    try:
        train, valid, test = builder.build()
        if cached_only:  # mapped at the first sample otherwise: in a loader worker, mid-run
            for dataset in (train, valid, test):
                _check_cached(dataset)
    except Exception as error:  # megatron-core wraps the missing file in a bare Exception
        missing = _missing_file(error)
        if not cached_only or missing is None:
            raise
        raise InputError(
            f"{' and '.join(cached_only)} read(s) the sample indices from the cache, but "
            f"{missing} is not there: run once without the flag (it builds them in "
            f"{cache}), with the same data, --seq-length, --split and --seed"
        ) from error
    if builder.test_too_small is not None:
        on_test_too_small(builder.test_too_small)
    return train, valid, test


def _check_listed_counts(info, listed: dict[str, tuple[int, int]]) -> None:
    """A prefix's header counts against --per-dataset-sequences-path's (Megatron-LM takes the
    file's without reading the header: a stale file there reads the wrong spans)."""
    fix = ("rebuild the file with tools/build_sequences_per_dataset.py from the same data "
           "flags")  # fmt: skip
    if info.prefix not in listed:
        raise InputError(
            f"--per-dataset-sequences-path does not list {info.prefix} (a prefix the data flags "
            f"name, spelled as they spell it); {fix}"
        )
    header = info.header_counts
    if tuple(listed[info.prefix]) != header:
        raise InputError(
            f"--per-dataset-sequences-path lists {info.prefix} with {list(listed[info.prefix])} "
            f"[sequences, document boundaries], but its .idx holds {list(header)}: the file is "
            f"stale (the dataset was rebuilt since); {fix}"
        )


def _missing_file(error: BaseException | None) -> str | None:
    """The file a FileNotFoundError in ``error``'s chain names (None: no such error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, FileNotFoundError):
            return error.filename
        error = error.__cause__ or error.__context__
    return None


def _check_cached(dataset) -> None:
    """Every cached index a deferred dataset (or a blend's parts) will map, present now."""
    if dataset is None:
        return
    if isinstance(dataset, list | tuple):
        for part in dataset:
            _check_cached(part)
        return
    for part in getattr(dataset, "datasets", None) or []:
        _check_cached(part)
    for name in ("path_to_shuffle_index", "path_to_sample_index", "path_to_document_index"):
        path = getattr(dataset, name, None)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(2, "not found", path)
