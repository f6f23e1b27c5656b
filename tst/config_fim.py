"""Megatron-LM's fill-in-the-middle data flags (``--fim-data`` and its ``--fim-*`` options),
with its names, meanings and defaults; the transform is :mod:`tst.data.fim`."""

from __future__ import annotations

from dataclasses import dataclass

from tst.config_fields import _f, _require

__all__ = ["FIMConfig"]


@dataclass
class FIMConfig:
    fim_data: bool = _f(
        False,
        "Fill-in-the-middle data (Megatron-LM's FIM dataset): each document piece of a "
        "training sample becomes, with probability --fim-rate, prefix / suffix / middle "
        "around sentinel tokens (applied to every split).",
    )
    fim_rate: float = _f(0.5, "FIM: probability that a document piece is rearranged.")
    fim_spm_rate: float = _f(
        0.5,
        "FIM: probability that a rearranged piece is suffix-prefix-middle (SPM) rather than "
        "prefix-suffix-middle (PSM).",
    )
    fim_split_sample: str | None = _f(
        None,
        "FIM: a token (one vocabulary entry, e.g. a file separator) that splits each piece "
        "into fragments rearranged one by one (--fim-fragment-rate).",
    )
    fim_fragment_rate: float | None = _f(
        None, "FIM with --fim-split-sample: probability that a fragment is rearranged."
    )
    fim_no_prefix: str | None = _f(
        None, "FIM: pieces whose text starts with this string are left as they are."
    )
    fim_prefix_token: str = _f("<fim_prefix>", "FIM prefix sentinel (a vocabulary entry).")
    fim_middle_token: str = _f("<fim_middle>", "FIM middle sentinel (a vocabulary entry).")
    fim_suffix_token: str = _f("<fim_suffix>", "FIM suffix sentinel (a vocabulary entry).")
    fim_pad_token: str = _f(
        "<fim_pad>", "FIM padding (a vocabulary entry): fills a rearranged sample cut short."
    )
    fim_eod_token: str = _f(
        "<|endoftext|>",
        "FIM: the token that separates documents inside a sample (each piece between two is "
        "rearranged on its own).",
    )

    def __post_init__(self):
        for flag, rate in (("--fim-rate", self.fim_rate), ("--fim-spm-rate", self.fim_spm_rate),
                           ("--fim-fragment-rate", self.fim_fragment_rate)):  # fmt: skip
            _require(
                rate is None or 0.0 <= rate <= 1.0,
                f"{flag} is a probability in [0, 1], got {rate}",
            )
        if self.fim_data:
            _require(
                self.fim_split_sample is None or self.fim_fragment_rate is not None,
                f"--fim-split-sample {self.fim_split_sample} rearranges fragments at "
                "--fim-fragment-rate: give it (a probability in [0, 1])",
            )
