"""Where each split's data comes from: Megatron-LM's data-path flags, read as Megatron-LM does.

Exactly one source (``DataArgs`` refuses two):

- ``--data-path BLEND`` or ``--data-args-path FILE`` (the file holds that blend, words
  separated by any whitespace): one blend, cut into train / valid / test by ``--split``;
- ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path`` (each a blend) or
  ``--per-split-data-args-path FILE`` (JSON ``{"train": ..., "valid": ..., "test": ...}``, each
  value a list of words, a string of them, or null): each split reads *whole* prefixes of
  its own blend, so ``--split`` does not apply; a split without a blend is not built (no
  validation data: no evaluation).

A blend is a prefix, prefixes, or weight / prefix pairs (``0.7 a 0.3 b``), as Megatron-LM's
``get_blend_from_list``; :func:`tst.data.datasets.parse_blend` checks it. This mirrors
``megatron.training.utils.get_blend_and_blend_per_split`` (same files, same precedence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tst.errors import InputError

__all__ = [
    "DataBlends",
    "SPLITS",
    "blend_prefixes",
    "data_blends",
    "read_sequences_per_dataset",
]

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataBlends:
    """``blend`` (one blend split by ``--split``) or ``per_split`` (train, valid, test; each a
    blend or None), never both; both None for mock data. ``sequences_per_dataset``: the
    ``--per-dataset-sequences-path`` file's counts, when given."""

    blend: list[str] | None = None
    per_split: tuple[list[str] | None, list[str] | None, list[str] | None] | None = None
    sequences_per_dataset: dict[str, tuple[int, int]] | None = None


def blend_prefixes(blends: DataBlends) -> list[str]:
    """Every prefix the blends name, once each, in order of first mention."""
    from tst.data.datasets import parse_blend

    words = [blends.blend] if blends.blend else [b for b in blends.per_split or () if b]
    prefixes = [p for blend in words for p in parse_blend(blend)[0]]
    return list(dict.fromkeys(prefixes))


def data_blends(d) -> DataBlends:
    """The blends a run's data flags (``tst.config.DataArgs``) name; reads the flag files
    (``--per-dataset-sequences-path``'s too)."""
    from tst.data.datasets import parse_blend

    if d.mock_data:
        return DataBlends()
    counts = (read_sequences_per_dataset(d.per_dataset_sequences_path)
              if d.per_dataset_sequences_path else None)  # fmt: skip
    if d.data_path or d.data_args_path:
        blend = d.data_path or _read_words(d.data_args_path)
        parse_blend(blend, "--data-args-path" if d.data_args_path else "--data-path")
        return DataBlends(blend=blend, sequences_per_dataset=counts)
    if d.per_split_data_args_path:
        splits = _read_per_split(d.per_split_data_args_path)
        flags = [f"--per-split-data-args-path ({name})" for name in SPLITS]
    else:
        splits = [_words(d.train_data_path), _words(d.valid_data_path), _words(d.test_data_path)]
        flags = [f"--{name}-data-path" for name in SPLITS]
    for blend, flag in zip(splits, flags, strict=True):
        if blend is not None:
            parse_blend(blend, flag)
    if splits[0] is None:
        raise InputError(
            'per-split data paths give no training data: add --train-data-path (or a "train" '
            "blend in --per-split-data-args-path)"
        )
    return DataBlends(per_split=tuple(splits), sequences_per_dataset=counts)


def _words(values: list[str] | None) -> list[str] | None:
    """A flag's values, each split on whitespace (``--train-data-path "0.7 a 0.3 b"``)."""
    if not values:
        return None
    return [word for value in values for word in value.split()] or None


def _read(path: str, flag: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as error:
        raise InputError(f"{flag} {path}: {error.strerror}") from None


def _read_words(path: str) -> list[str]:
    words = _read(path, "--data-args-path").split()
    if not words:
        raise InputError(f"--data-args-path {path} is empty: write the --data-path blend in it")
    return words


def _read_json_object(path: str, flag: str, fix: str) -> dict:
    """The JSON object in ``flag``'s file, or one line naming the file, the fault and ``fix``."""
    try:
        content = json.loads(_read(path, flag))
    except json.JSONDecodeError as error:
        raise InputError(
            f"{flag} {path} is not JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg}): {fix}"
        ) from None
    if not isinstance(content, dict):
        raise InputError(f"{flag} {path} holds a {type(content).__name__}, not an object: {fix}")
    return content


def _read_per_split(path: str) -> list[list[str] | None]:
    flag = "--per-split-data-args-path"
    shape = '{"train": [...], "valid": [...], "test": [...]} (null for an unused split)'
    content = _read_json_object(path, flag, f"write {shape}")
    splits = []
    for name in SPLITS:
        if name not in content:
            raise InputError(f'{flag} {path} has no "{name}" key: write {shape}')
        value = content[name]
        if isinstance(value, str):
            value = value.split()
        ok = value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if not ok:
            raise InputError(
                f'{flag} {path}: "{name}" must be a list of strings, a string or null, got '
                f"{json.dumps(value)}"
            )
        splits.append(_words(value))
    return splits


def read_sequences_per_dataset(path: str) -> dict[str, tuple[int, int]]:
    """``--per-dataset-sequences-path``: Megatron-LM's JSON ``{prefix: [sequences, documents]}``
    (``documents`` as the ``.idx`` header counts them: the document boundaries, one more than
    the documents), as ``tools/build_sequences_per_dataset.py`` writes it."""
    flag = "--per-dataset-sequences-path"
    fix = "write it with tools/build_sequences_per_dataset.py"
    content = _read_json_object(path, flag, fix)
    counts = {}
    for prefix, value in content.items():
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
              and value[1] >= 1)  # fmt: skip
        if not ok:
            raise InputError(
                f"{flag} {path}: {prefix!r} must map to [sequences, document boundaries] (two "
                f"integers >= 0, the second >= 1), got {json.dumps(value)}; {fix}"
            )
        counts[prefix] = (value[0], value[1])
    return counts
