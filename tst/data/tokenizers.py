"""Text tokenizers under Megatron's type names, behind one small interface.

Every tokenizer answers ``vocab_size``, ``eod``, ``bos`` (``None`` when it adds none),
``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``; that is all the
preprocessor, the datasets, the trainer, the exporter and ``tools/generate.py`` use.
``tokenize`` is what one document becomes in the ``.bin`` (before ``--append-eod``).

``SentencePieceTokenizer``
    A SentencePiece ``.model``: the model's pieces, no BOS added. EOD is the model's EOS
    piece (``tools/train_tokenizer.py`` makes one), or failing that a user-defined ``<eod>`` /
    ``<|endoftext|>`` piece. (Megatron-LM's type of this name appends ``<CLS>``, ``<SEP>``,
    ``<EOD>``, ``<MASK>`` ... ids past the model's pieces; this one does not.)
``GPTSentencePieceTokenizer``
    Megatron-LM's: ``vocab_size`` is the piece count, ``tokenize`` the model's ids with no
    BOS or EOS, EOD the model's EOS piece (a model without one is refused).
``Llama2Tokenizer``
    Megatron-LM's: as ``GPTSentencePieceTokenizer`` but ``tokenize`` puts the model's BOS
    first (so each preprocessed document starts with BOS, and ``--append-eod`` ends it with
    EOS, as Megatron-LM's preprocessor does); a model without BOS or EOS is refused.
``HuggingFaceTokenizer``
    A Hugging Face ``tokenizer.json``, or a folder holding one, read with the ``tokenizers``
    library only (no ``transformers``, no hub). As Megatron-LM's (which calls
    ``AutoTokenizer(text)``), ``tokenize`` adds what the file's post-processor adds (a
    Llama-3 file puts BOS first; most add nothing). EOD is the folder's
    ``tokenizer_config.json`` ``eos_token`` when there is one (Megatron-LM's ``eod`` is
    ``eos_token_id``), else the first of ``<|endoftext|>``, ``</s>``, ``<eod>``,
    ``<|end_of_text|>``, ``<eos>``, ``<EOD>`` in the vocabulary.
``GPT2BPETokenizer``
    GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; EOD is ``<|endoftext|>``.
``ByteTokenizer``
    UTF-8 bytes: ids 0..255 are byte values, EOD is 256, ``vocab_size`` 257. Needs no file.
    ``tokenize`` is exact for every string that has a UTF-8 encoding (all of Unicode but lone
    surrogates, which are refused); ``detokenize`` turns ids into bytes (ids above 255, EOD
    and padding, are dropped) and decodes them with U+FFFD for each invalid UTF-8 sequence
    (a model can emit any byte order), ``detokenize_bytes`` returns the bytes themselves.
``TikTokenizer``
    Megatron-LM's (its ``CustomTikTokenizer``, the Nemotron / Mistral-NeMo vocabularies): a
    JSON list of ``{"rank", "token_bytes" (base64), "token_str"}`` ranks as ``--tokenizer-model``,
    ``--tiktoken-pattern`` v1 or v2 (the pre-tokenizer's regex), the first
    ``--tiktoken-num-special-tokens`` ids (default 1000) special: ``<unk>``, ``<s>``, ``</s>``
    (or ``--tokenizer-special-tokens``, which must hold those three) then ``<SPECIAL_k>``
    fillers, the ranks after them; ``vocab_size`` is ``--vocab-size`` (default 2**17, the
    file's first ``vocab_size - S`` ranks kept). ``tokenize`` adds nothing; EOD is ``</s>``.
    Encoded with the ``tiktoken`` library.
``NullTokenizer``
    ``ByteTokenizer`` with a larger ``--vocab-size`` allowed (the extra ids never occur);
    tests and smoke runs use it. (Megatron-LM's type of this name reads space-separated
    integers instead.)

A file of the wrong kind (a ``tokenizer.json`` given as a SentencePiece model, a binary file
given as JSON, ...) raises :class:`TokenizerFileError` naming the file and the kind expected,
instead of the library's own parse error. This module imports no third-party package at
import time (``tst.config`` imports it for the flag's choices).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tst.errors import InputError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "LEGACY_SENTENCEPIECE_REFUSED",
    "TOKENIZER_TYPES",
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TextTokenizer",
    "TikTokenizer",
    "TokenizerFileError",
    "TokenizerInputError",
    "TokenizerSpec",
    "build_tokenizer",
    "lone_surrogate",
]

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "TikTokenizer",
    "ByteTokenizer",
    "NullTokenizer",
)

# Special-token spellings tried, in order, as the end-of-document token.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eod>", "<|end_of_text|>", "<eos>", "<EOD>")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerFileError(InputError):
    """A tokenizer file is missing, unreadable or of the wrong kind."""


class TokenizerInputError(InputError):
    """A text a tokenizer cannot encode (a lone surrogate has no UTF-8 bytes)."""


class TextTokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    eod: int
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int] | np.ndarray) -> str: ...


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (no UTF-8 encoding), or ``None``.

    JSON ``\\ud800``-style escapes produce them; files decoded as UTF-8 never do."""
    found = _LONE_SURROGATE.search(text)
    return None if found is None else found.start()


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOD 256; see the module docstring for invalid UTF-8."""

    BYTES = 256  # ids 0..255 are byte values

    def __init__(self, vocab_size: int | None = None, name: str = "ByteTokenizer") -> None:
        if vocab_size is not None and vocab_size < self.BYTES + 1:
            raise InputError(
                f"{name} needs --vocab-size >= 257 (256 byte ids + EOD), got {vocab_size}"
            )
        self.vocab_size = self.BYTES + 1
        self.eod = self.BYTES
        self.bos = None

    def _utf8(self, text: str) -> bytes:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TokenizerInputError(
                f"the text holds a lone surrogate U+{ord(text[err.start]):04X} at character "
                f"{err.start}, which has no UTF-8 encoding (a JSON \\u escape of half a "
                "surrogate pair?)"
            ) from None

    def tokenize(self, text: str) -> list[int]:
        return list(self._utf8(text))

    def tokenize_array(self, text: str) -> np.ndarray:
        """The ids as a uint8 array: the preprocessor's fast path (no Python list)."""
        import numpy as np

        return np.frombuffer(self._utf8(text), dtype=np.uint8)

    def detokenize_bytes(self, ids: list[int] | np.ndarray) -> bytes:
        """The bytes of ``ids``; ids above 255 (EOD, padding) are no bytes and are dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < self.BYTES)

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        # errors="replace" puts one U+FFFD per maximal invalid subsequence (the Unicode
        # standard's recommended practice), so decoding is total and never raises.
        return self.detokenize_bytes(ids).decode("utf-8", errors="replace")


class NullTokenizer(ByteTokenizer):
    """:class:`ByteTokenizer` whose ``vocab_size`` may be set above 257 (unused ids)."""

    def __init__(self, vocab_size: int | None = None) -> None:
        super().__init__(vocab_size, "NullTokenizer")
        self.vocab_size = vocab_size or self.BYTES + 1


class SentencePieceTokenizer:
    """A SentencePiece ``.model``; see the module docstring for how EOD is found."""

    TYPE = "SentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        _require_file(model_file, self.TYPE, "--tokenizer-model")
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
        self.bos: int | None = None
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

    def _special(self, which: str, token_id: int) -> int:
        """The model's own BOS / EOS id, refused when the model was trained without it."""
        if token_id < 0:
            raise TokenizerFileError(
                f"--tokenizer-model {self.model_file} has no {which} piece, which {self.TYPE} "
                f"takes as its {'EOD' if which == 'EOS' else which}; train the model with one "
                "(tools/train_tokenizer.py does), or use --tokenizer-type SentencePieceTokenizer"
            )
        return int(token_id)

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_text(self, text: str) -> list[int]:
        """``text``'s ids alone (no BOS / EOS added), for pieces of a document."""
        return self._sp.EncodeAsIds(text)

    def token_to_id(self, token: str) -> int | None:
        """The id of the piece ``token`` (None when the model has no such piece)."""
        pid = int(self._sp.PieceToId(token))
        return pid if self._sp.IdToPiece(pid) == token else None

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``GPTSentencePieceTokenizer``: no BOS/EOS added, EOD = the model's EOS."""

    TYPE = "GPTSentencePieceTokenizer"

    def _find_eod(self) -> int:
        return self._special("EOS", self._sp.eos_id())


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``Llama2Tokenizer``: BOS first in every ``tokenize``, EOD = EOS."""

    TYPE = "Llama2Tokenizer"

    def _find_eod(self) -> int:
        self.bos = self._special("BOS", self._sp.bos_id())
        return self._special("EOS", self._sp.eos_id())

    def tokenize(self, text: str) -> list[int]:
        return [self.bos, *self._sp.EncodeAsIds(text)]


_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # "org/model", as the Hugging Face hub names them


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, tokenizer_file: str, flag: str = "--tokenizer-model") -> None:
        from tokenizers import Tokenizer

        folder = None
        if os.path.isdir(tokenizer_file):
            folder = tokenizer_file
            tokenizer_file = os.path.join(tokenizer_file, "tokenizer.json")
        elif not os.path.exists(tokenizer_file) and _HUB_NAME.fullmatch(tokenizer_file):
            # Megatron-LM's HuggingFaceTokenizer downloads a hub name ("org/model").
            raise TokenizerFileError(
                f"{flag} {tokenizer_file}: no such file or folder; a Hugging Face hub name is "
                "not downloaded here (files are read from disk only): download the model's "
                "tokenizer.json and tokenizer_config.json and pass their folder"
            )
        _require_file(tokenizer_file, "HuggingFaceTokenizer", flag)
        _require_json(tokenizer_file, "a Hugging Face tokenizer.json", "HuggingFaceTokenizer")
        try:
            tok = Tokenizer.from_file(tokenizer_file)
        except Exception as err:  # the Rust side raises a bare Exception
            raise TokenizerFileError(
                f"{tokenizer_file} is JSON but not a Hugging Face tokenizer.json ({err}); "
                "a GPT-2 vocab.json goes with --tokenizer-type GPT2BPETokenizer --vocab-file"
            ) from err
        self._init(tok, tokenizer_file, _config_eos(folder) if folder else None)

    def _init(self, tok, source: str, eos: str | None = None) -> None:
        self._tok = tok
        self.source = source
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        if eos is not None:
            eod = tok.token_to_id(eos)
            if eod is None:
                raise TokenizerFileError(
                    f"the tokenizer_config.json beside {source} names eos_token {eos!r}, which "
                    "is not in the tokenizer's vocabulary"
                )
            self.eod = int(eod)
        else:
            self.eod = self._candidate_eod(tok, source)
        # What the post-processor puts first (a Llama-3 file: BOS), for the exporter.
        first = tok.encode("", add_special_tokens=True).ids
        self.bos = int(first[0]) if first and first[0] != self.eod else None

    @staticmethod
    def _candidate_eod(tok, source: str) -> int:
        for piece in _EOD_CANDIDATES:
            pid = tok.token_to_id(piece)
            if pid is not None:
                return int(pid)
        raise TokenizerFileError(
            f"{source} has none of the end-of-document tokens {_EOD_CANDIDATES}; "
            "add one as a special token when training the tokenizer"
        )

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_text(self, text: str) -> list[int]:
        """``text``'s ids alone (nothing the post-processor adds), for pieces of a document."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        """The id of the vocabulary entry ``token`` (added tokens too), or None."""
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once: the Rust side spreads them over its threads."""
        # encode_batch_fast skips character offsets, which only ids-wanting callers don't need.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=True)]

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _config_eos(folder: str) -> str | None:
    """The ``eos_token`` of ``folder/tokenizer_config.json`` (a string or an added-token
    object), or ``None`` when the folder has no such file or key."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(f"{path} is not valid JSON ({err})") from err
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


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


_SENTENCEPIECE = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
    "Llama2Tokenizer": Llama2Tokenizer,
}


# Megatron-LM's two tiktoken pre-tokenizer patterns (megatron/training/tokenizer), by name.
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
        r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
TIKTOKEN_SPECIAL = ("<unk>", "<s>", "</s>")  # the special tokens every vocabulary must hold
TIKTOKEN_NUM_SPECIAL = 1000  # --tiktoken-num-special-tokens' default (Megatron-LM's)

# Why --legacy-tokenizer is refused with SentencePieceTokenizer (the trainer and the
# preprocessor): the one type whose ids differ between Megatron-LM's two systems.
LEGACY_SENTENCEPIECE_REFUSED = (
    "--legacy-tokenizer with SentencePieceTokenizer: Megatron-LM's legacy type of that name "
    "adds <CLS> <SEP> <EOD> <MASK> <PAD> ids past the model's pieces and ends documents with "
    "that <EOD>; this one has the model's pieces only and its EOS as EOD (Megatron-LM's "
    "default system): drop --legacy-tokenizer, or use GPTSentencePieceTokenizer"
)


class TikTokenizer:
    """Megatron-LM's ``TikTokenizer``; see the module docstring."""

    TYPE = "TikTokenizer"

    def __init__(
        self,
        path: str,
        pattern: str | None,
        vocab_size: int | None = None,
        num_special_tokens: int = TIKTOKEN_NUM_SPECIAL,
        special_tokens: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        import base64
        import binascii

        import tiktoken

        if pattern not in TIKTOKEN_PATTERNS:
            raise TokenizerFileError(
                f"--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2 (the "
                f"vocabulary's pre-tokenizer), got {pattern!r}"
            )
        _require_file(path, self.TYPE, "--tokenizer-model")
        vocab_size = 2**17 if vocab_size is None else vocab_size
        special = list(special_tokens or TIKTOKEN_SPECIAL)
        where = "--tokenizer-special-tokens"
        if len(set(special)) != len(special):
            raise InputError(f"{where} {special}: each special token once")
        if not set(TIKTOKEN_SPECIAL) <= set(special):
            raise InputError(f"{where} {special} must include {list(TIKTOKEN_SPECIAL)}")
        if not len(special) <= num_special_tokens < vocab_size:
            raise InputError(
                f"--tiktoken-num-special-tokens {num_special_tokens} must be at least the "
                f"{len(special)} special tokens and below --vocab-size {vocab_size}"
            )
        special += [f"<SPECIAL_{i}>" for i in range(len(special), num_special_tokens)]
        entries = _require_json(path, "a tiktoken vocabulary (a JSON list of ranks)", self.TYPE)
        inner = vocab_size - num_special_tokens
        if not isinstance(entries, list) or len(entries) < inner:
            count = len(entries) if isinstance(entries, list) else "no list of"
            raise TokenizerFileError(
                f"{path} holds {count} ranks, fewer than --vocab-size {vocab_size} minus "
                f"--tiktoken-num-special-tokens {num_special_tokens} = {inner}: lower "
                "--vocab-size (the first ranks are kept)"
            )
        ranks: dict[bytes, int] = {}
        for i, entry in enumerate(entries[:inner]):
            try:
                if set(entry) != {"rank", "token_bytes", "token_str"} or entry["rank"] != i:
                    raise ValueError("keys or rank")
                token = base64.b64decode(entry["token_bytes"], validate=True)
            except (TypeError, ValueError, binascii.Error) as err:
                raise TokenizerFileError(
                    f"{path}: entry {i} is not {{'rank': {i}, 'token_bytes': base64, "
                    f"'token_str': ...}} ({err})"
                ) from err
            if i < 256 and token != bytes([i]):
                raise TokenizerFileError(f"{path}: rank {i} must be the byte {i} itself")
            if token in ranks:
                raise TokenizerFileError(f"{path}: rank {i} repeats rank {ranks[token]}'s bytes")
            ranks[token] = i + num_special_tokens
        ids = {token: i for i, token in enumerate(special)}
        self._model = tiktoken.Encoding(
            name=os.path.basename(os.path.dirname(os.path.abspath(path))) or "tiktoken",
            pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks=ranks,
            special_tokens=ids,
        )
        self.path = path
        self.vocab_size = vocab_size
        self.special_tokens = special
        self.bos: int | None = None  # tokenize adds none (Megatron-LM's default)
        self.eod = ids["</s>"]

    def tokenize(self, text: str) -> list[int]:
        if (at := lone_surrogate(text)) is not None:
            raise TokenizerInputError(f"a lone surrogate at character {at} has no UTF-8 bytes")
        return self._model.encode_ordinary(text)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenize(text)

    def token_to_id(self, token: str) -> int | None:
        """A special token's id, or the rank of a whole token's UTF-8 bytes, or None."""
        if token in self.special_tokens:
            return self.special_tokens.index(token)
        try:
            return int(self._model.encode_single_token(token.encode("utf-8")))
        except KeyError:
            return None

    def detokenize(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]  # padding rows dropped
        return self._model.decode(ids)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    tiktoken_pattern: str | None = None,
    tiktoken_num_special_tokens: int = TIKTOKEN_NUM_SPECIAL,
    special_tokens: list[str] | tuple[str, ...] | None = None,
) -> TextTokenizer:
    """Build a tokenizer by Megatron type name; the files it needs depend on the type.

    ``vocab_size`` (``--vocab-size``) is checked by the byte tokenizers (at least 257) and
    sets ``NullTokenizer``'s size; the others ignore it (the trainer pads its rows).
    """
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer(vocab_size)
    if tokenizer_type in _SENTENCEPIECE:
        model = _need(tokenizer_model, "--tokenizer-model", tokenizer_type)
        return _SENTENCEPIECE[tokenizer_type](model)
    if tokenizer_type == "HuggingFaceTokenizer":
        # Megatron passes a tokenizer.json (or its folder) as --tokenizer-model.
        path = tokenizer_model or vocab_file
        flag = "--tokenizer-model" if tokenizer_model else "--vocab-file"
        return HuggingFaceTokenizer(_need(path, "--tokenizer-model", tokenizer_type), flag)
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(
            _need(tokenizer_model, "--tokenizer-model", tokenizer_type), tiktoken_pattern,
            vocab_size, tiktoken_num_special_tokens, special_tokens,
        )  # fmt: skip
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(
            _need(vocab_file, "--vocab-file", tokenizer_type),
            _need(merge_file, "--merge-file", tokenizer_type),
        )
    raise InputError(f"--tokenizer-type {tokenizer_type!r} is not one of {TOKENIZER_TYPES}")


@dataclass(frozen=True)
class TokenizerSpec:
    """The arguments of :func:`build_tokenizer`, kept as a value: picklable (each
    preprocessing worker builds its own tokenizer) and storable (an export names its files)."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None  # --vocab-size as trained (NullTokenizer's size)
    tiktoken_pattern: str | None = None  # TikTokenizer's
    tiktoken_num_special_tokens: int = TIKTOKEN_NUM_SPECIAL
    special_tokens: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.special_tokens is not None:  # a list from the flags: kept as a hashable value
            object.__setattr__(self, "special_tokens", tuple(self.special_tokens) or None)

    def build(self) -> TextTokenizer:
        return build_tokenizer(
            self.tokenizer_type,
            self.tokenizer_model,
            self.vocab_file,
            self.merge_file,
            self.vocab_size,
            self.tiktoken_pattern,
            self.tiktoken_num_special_tokens,
            self.special_tokens,
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
