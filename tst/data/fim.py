"""Fill-in-the-middle data (``--fim-data``): Megatron-LM's FIM dataset transform, per unit.

A unit is ``L + 1`` tokens, one recovery-phase sample (a superposition row is ``bag`` of
them). Each unit is cut at the document separator (``--fim-eod-token``); each piece between
two separators is, with probability ``--fim-rate``, turned into text, cut at two character
positions drawn uniformly into prefix / middle / suffix, re-tokenized, and laid out as

- PSM: ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle``, or
- SPM (probability ``--fim-spm-rate``): ``<fim_prefix> <fim_suffix> suffix <fim_middle>
  prefix middle``,

as the FIM paper (Bavarian et al., 2022) and Megatron-LM's ``GPTFIMDataset`` do; the unit is
then cut back to ``L + 1`` tokens or padded with ``--fim-pad-token``. With
``--fim-split-sample`` a piece holding that token is, with probability ``--fim-rate``, split
at it and each fragment rearranged with probability ``--fim-fragment-rate``.
``--fim-no-prefix`` leaves a piece whose text starts with that string as it is.

Deliberate differences from Megatron-LM 0.16.1: the random draws of a unit come from a
generator seeded by (``--seed``, split, sample index, unit), so a unit's form depends on
nothing but its place in the data: the same in the superposition and the recovery phase, in
every loader worker, after a resume, under any parallel layout (Megatron-LM draws from one
generator per dataset in the order samples happen to be read). Every separator is kept
(Megatron-LM drops one that follows another or opens the sample).
"""

from __future__ import annotations

import numpy as np

from tst.errors import InputError

__all__ = ["FIMTransform"]


class FIMTransform:
    """Rearranges big samples unit by unit; built once per run from the tokenizer."""

    def __init__(self, cfg, tokenizer, seed: int, unit_length: int) -> None:
        name = type(tokenizer).__name__
        lookup = getattr(tokenizer, "token_to_id", None)
        if lookup is None or not hasattr(tokenizer, "encode_text"):
            raise InputError(
                f"--fim-data rearranges text and needs sentinel tokens in the vocabulary: "
                f"{name} has no vocabulary entries to look them up (use a HuggingFace, "
                "SentencePiece, GPT-2 BPE or TikTokenizer tokenizer holding them)"
            )
        ids = {}
        for flag, token in (("--fim-prefix-token", cfg.fim_prefix_token),
                            ("--fim-middle-token", cfg.fim_middle_token),
                            ("--fim-suffix-token", cfg.fim_suffix_token),
                            ("--fim-pad-token", cfg.fim_pad_token),
                            ("--fim-eod-token", cfg.fim_eod_token),
                            ("--fim-split-sample", cfg.fim_split_sample)):  # fmt: skip
            if token is None:
                continue
            tid = lookup(token)
            if tid is None:
                raise InputError(
                    f"{flag} {token!r} is not one entry of the {name} vocabulary: add it to "
                    f"the tokenizer as a special token, or name one it has with {flag}"
                )
            ids[flag] = tid
        self.prefix = ids["--fim-prefix-token"]
        self.middle = ids["--fim-middle-token"]
        self.suffix = ids["--fim-suffix-token"]
        self.pad = ids["--fim-pad-token"]
        self.eod = ids["--fim-eod-token"]
        self.split_token = ids.get("--fim-split-sample")
        self.rate = cfg.fim_rate
        self.spm_rate = cfg.fim_spm_rate
        self.fragment_rate = cfg.fim_fragment_rate
        self.no_prefix = cfg.fim_no_prefix
        self.seed = seed
        self.unit_length = unit_length
        self.tokenizer = tokenizer

    def __call__(self, tokens: np.ndarray, split: int, index: int) -> np.ndarray:
        """The big sample ``index`` of ``split`` (whole units of ``L + 1``) rearranged."""
        n = self.unit_length
        if len(tokens) % n:
            raise ValueError(f"a sample of {len(tokens)} tokens is not whole units of {n}")
        out = np.empty(len(tokens), dtype=np.int64)
        for u in range(len(tokens) // n):
            rng = np.random.default_rng([self.seed, split, index, u])
            out[u * n : (u + 1) * n] = self.unit(tokens[u * n : (u + 1) * n], rng)
        return out

    def unit(self, unit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One unit rearranged piece by piece, cut or padded back to its length."""
        parts: list[np.ndarray] = []
        start = 0
        for at in np.flatnonzero(unit == self.eod):
            if at > start:
                parts.append(self._split_and_permute(unit[start:at], rng))
            parts.append(np.array([self.eod]))
            start = at + 1
        if start < len(unit):
            parts.append(self._split_and_permute(unit[start:], rng))
        out = np.concatenate(parts).astype(np.int64) if parts else unit.astype(np.int64)
        if len(out) >= len(unit):
            return out[: len(unit)]
        return np.concatenate([out, np.full(len(unit) - len(out), self.pad, dtype=np.int64)])

    def _split_and_permute(self, piece: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.split_token is None:
            return self._permute(piece, self.rate, rng)
        breaks = np.flatnonzero(piece == self.split_token)
        if len(breaks) == 0:
            return self._permute(piece, self.rate, rng)
        if rng.random() >= self.rate:
            return piece
        parts: list[np.ndarray] = []
        start = 0
        for at in breaks:
            if at > start:
                parts.append(self._permute(piece[start:at], self.fragment_rate, rng))
            parts.append(np.array([self.split_token]))
            start = at + 1
        if start < len(piece):
            parts.append(self._permute(piece[start:], self.fragment_rate, rng))
        return np.concatenate(parts)

    def _permute(self, piece: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= rate:
            return piece
        text = self.tokenizer.detokenize(piece)
        if self.no_prefix is not None and text.startswith(self.no_prefix):
            return piece
        a, b = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
        encode = self.tokenizer.encode_text
        prefix, middle, suffix = encode(text[:a]), encode(text[a:b]), encode(text[b:])
        if rng.random() < self.spm_rate:
            layout = [self.prefix, self.suffix, *suffix, self.middle, *prefix, *middle]
        else:
            layout = [self.prefix, *prefix, self.suffix, *suffix, self.middle, *middle]
        return np.asarray(layout, dtype=np.int64)
