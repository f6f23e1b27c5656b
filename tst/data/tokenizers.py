"""Text tokenizers under Megatron's type names, behind one small interface.

Every tokenizer answers ``vocab_size``, ``eod``, ``tokenize(text) -> list[int]`` and
``detokenize(ids) -> str``; that is all the preprocessor, the datasets and the trainer use.

``SentencePieceTokenizer``
    A SentencePiece ``.model`` file. EOD is the model's EOS piece (``tools/train_tokenizer.py``
    makes one), or failing that a user-defined ``<eod>`` / ``<|endoftext|>`` piece.
``HuggingFaceTokenizer``
    A Hugging Face ``tokenizer.json`` (or a folder holding one), read with the ``tokenizers``
    library only, so no ``transformers`` install and no hub access. EOD is the first of
    ``<|endoftext|>``, ``</s>``, ``<eod>``, ``<|end_of_text|>``, ``<eos>`` in its vocabulary.
``GPT2BPETokenizer``
    GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; EOD is ``<|endoftext|>``.
``NullTokenizer``
    Bytes: ids 0..255 are the UTF-8 bytes of the text, EOD is 256, ``vocab_size`` is 257 unless
    a larger one is given. Needs no file, so tests and smoke runs use it.

A file of the wrong kind (a ``tokenizer.json`` given as a SentencePiece model, a binary file
given as JSON, ...) raises :class:`TokenizerFileError` naming the file and the kind expected,
instead of the library's own parse error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "TOKENIZER_TYPES",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TextTokenizer",
    "TokenizerFileError",
    "TokenizerSpec",
    "build_tokenizer",
]

# Special-token spellings tried, in order, as the end-of-document token.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eod>", "<|end_of_text|>", "<eos>", "<EOD>")


class TokenizerFileError(ValueError):
    """A tokenizer file is missing, unreadable or of the wrong kind."""


class TextTokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    eod: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int] | np.ndarray) -> str: ...


class NullTokenizer:
    """UTF-8 bytes as tokens; EOD is 256. The only tokenizer that needs no file."""

    def __init__(self, vocab_size: int | None = None) -> None:
        if vocab_size is not None and vocab_size < 257:
            raise ValueError(
                f"NullTokenizer needs --vocab-size >= 257 (256 byte ids + EOD), got {vocab_size}"
            )
        self.vocab_size = vocab_size or 257
        self.eod = 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> np.ndarray:
        """The ids as a uint8 array: the preprocessor's fast path (no Python list)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        # Ids above 255 (EOD, padding) are no bytes; dropping them keeps decoding total.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece ``.model``; see the module docstring for how EOD is found."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        _require_file(model_file, "SentencePieceTokenizer", "--tokenizer-model")
        head = _head(model_file)
        if head.lstrip()[:1] in (b"{", b"["):
            raise TokenizerFileError(
                f"{model_file} is a JSON file, not a SentencePiece .model (a protobuf): "
                "for a Hugging Face tokenizer.json use --tokenizer-type HuggingFaceTokenizer"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except (OSError, RuntimeError) as err:
            raise TokenizerFileError(
                f"{model_file} is not a SentencePiece .model file ({err}); "
                "train one with tools/train_tokenizer.py or pick the matching --tokenizer-type"
            ) from err
        self.model_file = model_file
        self.vocab_size = int(self._sp.GetPieceSize())
        self.eod = self._find_eod()

    def _find_eod(self) -> int:
        eos = int(self._sp.eos_id())
        if eos >= 0:
            return eos
        for piece in _EOD_CANDIDATES:
            pid = int(self._sp.PieceToId(piece))
            # PieceToId answers unk_id for an unknown piece.
            if pid != self._sp.unk_id() and self._sp.IdToPiece(pid) == piece:
                return pid
        raise TokenizerFileError(
            f"{self.model_file} has no EOS piece and none of {_EOD_CANDIDATES}: --append-eod and "
            "the datasets need one; retrain with tools/train_tokenizer.py (it defines EOD)"
        )

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, tokenizer_file: str, flag: str = "--tokenizer-model") -> None:
        from tokenizers import Tokenizer

        if os.path.isdir(tokenizer_file):
            tokenizer_file = os.path.join(tokenizer_file, "tokenizer.json")
        _require_file(tokenizer_file, "HuggingFaceTokenizer", flag)
        _require_json(tokenizer_file, "a Hugging Face tokenizer.json", "HuggingFaceTokenizer")
        try:
            tok = Tokenizer.from_file(tokenizer_file)
        except Exception as err:  # the Rust side raises a bare Exception
            raise TokenizerFileError(
                f"{tokenizer_file} is JSON but not a Hugging Face tokenizer.json ({err}); "
                "a GPT-2 vocab.json goes with --tokenizer-type GPT2BPETokenizer --vocab-file"
            ) from err
        self._init(tok, tokenizer_file)

    def _init(self, tok, source: str) -> None:
        self._tok = tok
        self.source = source
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        for piece in _EOD_CANDIDATES:
            pid = tok.token_to_id(piece)
            if pid is not None:
                self.eod = int(pid)
                break
        else:
            raise TokenizerFileError(
                f"{source} has none of the end-of-document tokens {_EOD_CANDIDATES}; "
                "add one as a special token when training the tokenizer"
            )

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once: the Rust side spreads them over its threads."""
        # encode_batch_fast skips character offsets, which only ids-wanting callers don't need.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``.

    Built on the ``tokenizers`` library's BPE model with the ByteLevel pre-tokenizer, whose
    split regex is GPT-2's, so ids match the original ``encoder.json``/``vocab.bpe`` tokenizer.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        _require_file(vocab_file, "GPT2BPETokenizer", "--vocab-file")
        _require_file(merge_file, "GPT2BPETokenizer", "--merge-file")
        vocab = _require_json(vocab_file, "a GPT-2 vocab.json", "GPT2BPETokenizer")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise TokenizerFileError(
                f"{vocab_file} is JSON but not a GPT-2 vocab.json (a {{token: id}} object); "
                "a Hugging Face tokenizer.json goes with --tokenizer-type HuggingFaceTokenizer"
            )
        _check_merges(merge_file)
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as err:
            raise TokenizerFileError(
                f"{vocab_file} / {merge_file} do not form a GPT-2 BPE pair ({err})"
            ) from err
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if "<|endoftext|>" in vocab:
            tok.add_special_tokens(["<|endoftext|>"])
        self._init(tok, vocab_file)


TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
) -> TextTokenizer:
    """Build a tokenizer by Megatron type name; the files it needs depend on the type.

    ``vocab_size`` is used by ``NullTokenizer`` only (a floor of 257).
    """
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(_need(tokenizer_model, "--tokenizer-model", tokenizer_type))
    if tokenizer_type == "HuggingFaceTokenizer":
        # Megatron passes a tokenizer.json (or its folder) as --tokenizer-model.
        path = tokenizer_model or vocab_file
        flag = "--tokenizer-model" if tokenizer_model else "--vocab-file"
        return HuggingFaceTokenizer(_need(path, "--tokenizer-model", tokenizer_type), flag)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(
            _need(vocab_file, "--vocab-file", tokenizer_type),
            _need(merge_file, "--merge-file", tokenizer_type),
        )
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not one of {TOKENIZER_TYPES}")


@dataclass(frozen=True)
class TokenizerSpec:
    """The arguments of :func:`build_tokenizer`, kept as a value: picklable (each
    preprocessing worker builds its own tokenizer) and storable (an export names its files)."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None  # NullTokenizer's floor (--vocab-size as trained)

    def build(self) -> TextTokenizer:
        return build_tokenizer(
            self.tokenizer_type,
            self.tokenizer_model,
            self.vocab_file,
            self.merge_file,
            self.vocab_size,
        )


def _need(value: str | None, flag: str, tokenizer_type: str) -> str:
    if not value:
        raise TokenizerFileError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    return value


def _require_file(path: str, tokenizer_type: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise TokenizerFileError(f"{flag} {path}: no such file (needed by {tokenizer_type})")


def _head(path: str, size: int = 64) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _require_json(path: str, kind: str, tokenizer_type: str):
    head = _head(path)
    if head.lstrip()[:1] not in (b"{", b"["):
        hint = ""
        if path.endswith(".model") or b"\x00" in head or not _is_text(head):
            hint = " (it looks binary: a SentencePiece .model goes with SentencePieceTokenizer)"
        raise TokenizerFileError(
            f"{path} is not {kind}, which {tokenizer_type} expects: it is not JSON{hint}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(f"{path} is not {kind}: invalid JSON ({err})") from err


def _is_text(data: bytes) -> bool:
    """UTF-8 without NULs; ``data`` is a file's head, so a character cut at its end is fine."""
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.reason == "unexpected end of data"
    return True


def _check_merges(path: str) -> None:
    """A merges.txt is text whose lines (after an optional ``#version`` line) are pairs."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not _is_text(head) or head.lstrip()[:1] in (b"{", b"["):
        raise TokenizerFileError(
            f"{path} is not a GPT-2 merges.txt (text lines of two space-separated symbols), "
            "which GPT2BPETokenizer expects as --merge-file"
        )
    lines = [ln for ln in head.decode("utf-8", "replace").splitlines()[:20] if ln.strip()]
    body = [ln for ln in lines if not ln.startswith("#version")]
    if body and not all(len(ln.split(" ")) == 2 for ln in body[:-1]):
        raise TokenizerFileError(
            f"{path} is not a GPT-2 merges.txt: lines must be two space-separated symbols "
            f"(got {body[0][:60]!r}); it is the --merge-file of GPT2BPETokenizer"
        )
