"""Train a tokenizer on plain-text or JSONL files (optionally .gz).

    python tools/train_tokenizer.py --input data/sotu.jsonl --model-prefix data/tok \\
        --model-type bpe --vocab-size 8000

SentencePiece (BPE or unigram; the default) writes PREFIX.model and PREFIX.vocab, for
``--tokenizer-type SentencePieceTokenizer --tokenizer-model PREFIX.model``. With
``--library huggingface`` a byte-level BPE is trained with the ``tokenizers`` library and
written as PREFIX/tokenizer.json (for HuggingFaceTokenizer) plus PREFIX/vocab.json and
PREFIX/merges.txt (for GPT2BPETokenizer).

Documents are split at newlines into training sentences; SentencePiece drops sentences longer
than its ``max_sentence_length``, so longer lines are cut at whitespace into pieces that fit
(and counted in the summary) instead of being dropped silently. Special tokens: EOD (the
SentencePiece EOS piece), BOS, PAD, plus any --user-defined-symbols. The defaults (identity
normalization, byte fallback, whitespace kept) make decode(encode(text)) == text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tst.data.corpus import (  # noqa: E402
    INPUT_FORMATS,
    TEXT_MODES,
    BadRecord,
    CorpusError,
    decode_record,
    expand_inputs,
    read_records,
)


@dataclass
class TrainSummary:
    """What a run read and wrote."""

    documents: int = 0
    sentences: int = 0
    long_lines_split: int = 0  # lines longer than --max-sentence-length, cut into pieces
    bad_utf8_records: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    vocab_size: int = 0
    outputs: tuple[str, ...] = ()


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, help="files, globs or folders (.gz ok)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys holding text")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="line")
    p.add_argument("--model-prefix", required=True, help="output prefix (a folder for HF)")
    p.add_argument("--library", choices=("sentencepiece", "huggingface"), default="sentencepiece")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--eod-token", default="<|endoftext|>", help="end-of-document token")
    p.add_argument("--bos-token", default="<s>", help="'' for none")
    p.add_argument("--pad-token", default="", help="'' for none")
    p.add_argument("--user-defined-symbols", nargs="*", default=[], help="extra special tokens")
    p.add_argument("--character-coverage", type=float, default=0.9995, help="SentencePiece")
    p.add_argument(
        "--normalization",
        default="identity",
        help="SentencePiece normalization rule (identity keeps text as is; nmt_nfkc is SP's)",
    )
    p.add_argument("--no-byte-fallback", action="store_true", help="SentencePiece: no <0xNN>")
    p.add_argument("--split-digits", action="store_true", help="SentencePiece: one digit a piece")
    p.add_argument(
        "--max-sentence-length",
        type=int,
        default=4192,
        help="longest training sentence in bytes; longer lines are cut at whitespace",
    )
    p.add_argument(
        "--input-sentence-size", type=int, default=0, help="sample this many sentences (0: all)"
    )
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0, help="sentence sampling seed (SentencePiece)")
    p.add_argument("--verbose", action="store_true", help="show the trainer's own log")
    return p.parse_args(argv)


def _cut(line: str, max_bytes: int) -> list[str]:
    """Cut a line into pieces of at most ``max_bytes`` UTF-8 bytes, at whitespace if possible."""
    pieces = []
    while len(line.encode("utf-8")) > max_bytes:
        head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        cut = head.rfind(" ")
        if cut <= 0:
            cut = len(head)
        pieces.append(line[:cut])
        line = line[cut:]
    if line:
        pieces.append(line)
    return pieces


def _sentences(args: argparse.Namespace, summary: TrainSummary) -> Iterator[str]:
    files = expand_inputs(args.input, args.input_format)
    disk = [0]
    total = max(sum(f.size for f in files), 1)
    start = last = time.perf_counter()
    for rec in read_records(files, args.text_mode, disk):
        fmt = files[rec.source].format
        try:
            docs = decode_record(rec.data, fmt, tuple(args.json_keys) if fmt == "jsonl" else ())
        except BadRecord as err:
            summary.bad_utf8_records += 1
            print(f"skipped {files[rec.source].path}:{rec.line}: {err}", file=sys.stderr)
            continue
        except CorpusError as err:
            raise CorpusError(f"{files[rec.source].path}:{rec.line}: {err}") from None
        for doc in docs:
            if not doc.strip():
                continue
            summary.documents += 1
            summary.input_bytes += len(doc.encode("utf-8"))
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                pieces = _cut(line, args.max_sentence_length)
                summary.long_lines_split += len(pieces) > 1
                summary.sentences += len(pieces)
                yield from pieces
        now = time.perf_counter()
        if now - last > 2.0:
            last = now
            print(
                f"[{100.0 * min(disk[0] / total, 1.0):5.1f}%] read {summary.documents:,} docs, "
                f"{summary.input_bytes / 1e6 / (now - start):,.1f} MB/s",
                file=sys.stderr,
            )


def _specials(args: argparse.Namespace) -> list[str]:
    specials = [t for t in (args.eod_token, args.bos_token, args.pad_token) if t]
    return specials + [s for s in args.user_defined_symbols if s not in specials]


def _train_sentencepiece(args: argparse.Namespace, summary: TrainSummary) -> tuple[str, ...]:
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    spm.set_random_generator_seed(args.seed)  # sentence sampling and shuffling
    extra = [s for s in args.user_defined_symbols if s not in (args.eod_token, args.bos_token)]
    spm.SentencePieceTrainer.Train(
        sentence_iterator=_sentences(args, summary),
        model_prefix=args.model_prefix,
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        normalization_rule_name=args.normalization,
        remove_extra_whitespaces=args.normalization != "identity",
        byte_fallback=not args.no_byte_fallback,
        split_digits=args.split_digits,
        max_sentence_length=args.max_sentence_length,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        num_threads=args.num_threads,
        unk_id=0,
        bos_id=1 if args.bos_token else -1,
        eos_id=2,
        pad_id=3 if args.pad_token else -1,
        bos_piece=args.bos_token or "<s>",
        eos_piece=args.eod_token,
        pad_piece=args.pad_token or "<pad>",
        user_defined_symbols=extra,
        hard_vocab_limit=False,
        minloglevel=0 if args.verbose else 2,
    )
    return args.model_prefix + ".model", args.model_prefix + ".vocab"


def _train_huggingface(args: argparse.Namespace, summary: TrainSummary) -> tuple[str, ...]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=_specials(args),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=args.verbose,
    )
    tok.train_from_iterator(_sentences(args, summary), trainer=trainer)
    os.makedirs(args.model_prefix, exist_ok=True)
    path = os.path.join(args.model_prefix, "tokenizer.json")
    tok.save(path)
    vocab, merges = tok.model.save(args.model_prefix)
    return path, vocab, merges


def main(argv: list[str] | None = None) -> TrainSummary:
    """Train and report; returns the summary (tests call this in-process)."""
    args = get_args(argv)
    summary = TrainSummary()
    start = time.perf_counter()
    if args.library == "sentencepiece":
        summary.outputs = _train_sentencepiece(args, summary)
    else:
        summary.outputs = _train_huggingface(args, summary)
    summary.seconds = time.perf_counter() - start
    if summary.sentences == 0:
        raise CorpusError(f"--input {' '.join(args.input)}: no text to train on")

    from tst.data.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer

    tokenizer = (
        SentencePieceTokenizer(summary.outputs[0])
        if args.library == "sentencepiece"
        else HuggingFaceTokenizer(summary.outputs[0])
    )
    summary.vocab_size = tokenizer.vocab_size
    print(
        f"trained a {args.library} {args.model_type if args.library == 'sentencepiece' else 'bpe'}"
        f" tokenizer in {summary.seconds:.1f} s: vocab {summary.vocab_size}, eod id "
        f"{tokenizer.eod} ({args.eod_token}); read {summary.documents:,} documents, "
        f"{summary.input_bytes / 1e6:,.2f} MB, {summary.sentences:,} sentences "
        f"({summary.long_lines_split:,} long lines cut to fit, "
        f"{summary.bad_utf8_records:,} records with bad UTF-8 skipped)"
    )
    for path in summary.outputs:
        print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
