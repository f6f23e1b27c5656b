"""Tokenize text into Megatron .bin/.idx files (same flags as Megatron-LM's preprocess_data.py).

    python tools/preprocess_data.py --input data/sotu.jsonl --output-prefix data/sotu \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok.model \\
        --append-eod --workers 2

writes data/sotu_text_document.bin/.idx (one prefix per --json-keys key). Inputs are JSONL,
plain text (one document per line, or per blank-line-separated block with --text-mode block),
or gzip of either. Output goes to temporary files renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# megatron-core warns at import that apex/TE are absent; irrelevant to preprocessing.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from tst.data.corpus import INPUT_FORMATS, TEXT_MODES  # noqa: E402
from tst.data.preprocess import (  # noqa: E402
    PreprocessConfig,
    PreprocessError,
    PreprocessSummary,
    preprocess,
)
from tst.data.tokenizers import (  # noqa: E402
    LEGACY_SENTENCEPIECE_REFUSED,
    TIKTOKEN_NUM_SPECIAL,
    TIKTOKEN_PATTERNS,
    TOKENIZER_TYPES,
    TokenizerSpec,
)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (Megatron-LM's flag names, plus input-format options)."""
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input", nargs="+", required=True, help="input files, globs or folders (.gz is read)"
    )
    g.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSONL keys to extract, one output each"
    )
    g.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="auto: .jsonl/.json/.ndjson (optionally .gz) are JSONL, other files plain text",
    )
    g.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="line",
        help="plain text: one document per line, or per blank-line-separated block",
    )
    g.add_argument(
        "--on-bad-utf8",
        choices=("skip", "fail"),
        default="skip",
        help="records with invalid UTF-8: skip them (counted, file:line reported) or stop",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="SentencePiece .model or HF tokenizer.json")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument(
        "--vocab-size", type=int,
        help="NullTokenizer / ByteTokenizer: vocabulary size (>= 257); TikTokenizer: ids kept "
        "(default 2**17)",
    )  # fmt: skip
    g.add_argument(
        "--tiktoken-pattern", choices=sorted(TIKTOKEN_PATTERNS), help="TikTokenizer's regex"
    )
    g.add_argument(
        "--tiktoken-num-special-tokens", type=int, default=TIKTOKEN_NUM_SPECIAL,
        help="TikTokenizer: ids 0..N-1 are special tokens",
    )  # fmt: skip
    g.add_argument(
        "--tokenizer-special-tokens", "--tiktoken-special-tokens", nargs="+",
        help="TikTokenizer's special tokens (default <unk> <s> </s>)",
    )  # fmt: skip
    g.add_argument("--append-eod", action="store_true", help="append EOD to every document")
    g = p.add_argument_group("output data")
    g.add_argument(
        "--output-prefix",
        required=True,
        help="writes PREFIX_<key>_document.bin/.idx for each json key",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument(
        "--chunk-records",
        type=int,
        default=64,
        help="records per worker task (any value gives the same output)",
    )
    g.add_argument("--log-interval", type=float, default=2.0, help="seconds between progress lines")
    g = p.add_argument_group("Megatron-LM's other flags")
    g.add_argument(
        "--partitions", type=int, default=1,
        help="Megatron-LM splits the input into N files processed side by side; here "
        "--workers share one pass and the documents keep the input's order (Megatron-LM's "
        "with --keep-sequential-samples; without it, its partitions interleave the input's "
        "lines round-robin): any N writes the same files",
    )  # fmt: skip
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="the documents always keep the input's order here")  # fmt: skip
    g.add_argument("--legacy-tokenizer", action="store_true",
                   help="Megatron-LM's legacy tokenizer system: the same ids for every type "
                   "but SentencePieceTokenizer (refused with it, as by the trainer)")  # fmt: skip
    g.add_argument("--split-sentences", action="store_true",
                   help="refused: NLTK sentence splitting makes BERT-style data; documents "
                   "are kept whole for GPT pretraining")  # fmt: skip
    g.add_argument("--keep-newlines", action="store_true",
                   help="read by --split-sentences only (as in Megatron-LM): no effect")  # fmt: skip
    g.add_argument("--lang", default="english",
                   help="--split-sentences' NLTK language only (as in Megatron-LM): no effect")  # fmt: skip
    return p.parse_args(argv)


def check_megatron_flags(args: argparse.Namespace) -> None:
    """Megatron-LM's flags this preprocessor has no use for: refused with the reason where
    the output would differ from Megatron-LM's, accepted otherwise."""
    if args.split_sentences:
        raise PreprocessError(
            "--split-sentences splits each document into sentences (NLTK punkt), Megatron-LM's "
            "way to make BERT-style data; GPT pretraining reads each document whole: drop it"
        )
    if args.partitions < 1:
        raise PreprocessError(f"--partitions must be >= 1, got {args.partitions}")
    if args.legacy_tokenizer and args.tokenizer_type == "SentencePieceTokenizer":
        raise PreprocessError(LEGACY_SENTENCEPIECE_REFUSED)


def main(argv: list[str] | None = None) -> PreprocessSummary:
    """Run the tool; returns the summary (tests call this in-process)."""
    args = get_args(argv)
    check_megatron_flags(args)
    cfg = PreprocessConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        tokenizer=TokenizerSpec(
            args.tokenizer_type,
            args.tokenizer_model,
            args.vocab_file,
            args.merge_file,
            args.vocab_size,
            args.tiktoken_pattern,
            args.tiktoken_num_special_tokens,
            args.tokenizer_special_tokens,
        ),
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod,
        workers=args.workers,
        input_format=args.input_format,
        text_mode=args.text_mode,
        on_bad_utf8=args.on_bad_utf8,
        chunk_records=args.chunk_records,
        log_interval_s=args.log_interval,
    )
    return preprocess(cfg)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
