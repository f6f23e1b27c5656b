"""Inspect a Megatron .bin/.idx dataset: counts, length histogram, decoded samples, TST samples.

    python tools/inspect_dataset.py --data-prefix data/sotu_text_document \\
        --bag-size 6 --seq-length 512 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tok.model

Checks the files (sizes, header, dtype) first, then prints document and token counts, a
histogram of document lengths, the largest token id, and, for --bag-size and --seq-length,
how many superposition (phase 1) and recovery (phase 2) rows one epoch of each split gives:
a phase-1 row is one big sample of bag_size * (L + 1) tokens, a phase-2 row one L + 1-token
piece of a big sample. With a tokenizer, also a few decoded documents.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

import numpy as np  # noqa: E402

from tst.data.indexed import check_indexed_dataset  # noqa: E402
from tst.data.tokenizers import (  # noqa: E402
    TOKENIZER_TYPES,
    build_tokenizer,
)

_SPLITS = ("train", "valid", "test")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="inspect_dataset.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-prefix", required=True, help="PREFIX of PREFIX.bin / PREFIX.idx")
    p.add_argument("--bag-size", type=int, default=1, help="superposition bag size")
    p.add_argument("--seq-length", type=int, default=0, help="L (0: skip the sample counts)")
    p.add_argument("--split", default="969,30,1", help="train,valid,test document weights")
    p.add_argument("--pad-documents-to-bag", action="store_true", help="as the trainer's flag")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="to decode samples")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--vocab-size", type=int, help="check every token id is below it")
    p.add_argument("--num-samples", type=int, default=2, help="documents to decode")
    p.add_argument("--sample-chars", type=int, default=300, help="characters shown per document")
    p.add_argument("--bins", type=int, default=12, help="histogram bins (log2-spaced)")
    return p.parse_args(argv)


def split_ranges(split: str, num_docs: int) -> list[tuple[int, int]]:
    """Document ranges of train/valid/test, rounded as megatron-core's builder rounds them."""
    weights = [float(w) for w in split.replace("/", ",").split(",") if w.strip()]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds, acc = [0.0], 0.0
    for w in weights[:3]:
        acc += w / total
        bounds.append(acc)
    return [
        (int(round(a * num_docs)), int(round(b * num_docs)))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def histogram(lengths: np.ndarray, bins: int) -> list[str]:
    """Text bars of document lengths over log2-spaced bins."""
    if lengths.size == 0:
        return ["  (no documents)"]
    low, top = max(int(lengths.min()), 1), max(int(lengths.max()), 1)
    edges = np.unique(np.geomspace(low, top + 1, bins + 1).astype(np.int64))
    edges[0] = min(edges[0], int(lengths.min()))  # zero-length documents land in bin one
    edges[-1] = top + 1
    counts, _ = np.histogram(lengths, bins=edges)
    width = 40 / max(int(counts.max()), 1)
    lines = []
    lo = int(edges[0])
    for hi, n in zip(edges[1:].tolist(), counts.tolist(), strict=True):
        lines.append(f"  {lo:>9,} - {hi - 1:>9,} | {'#' * int(np.ceil(n * width)):<40} {n:,}")
        lo = hi
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Print the report; returns its numbers (tests call this in-process)."""
    args = get_args(argv)
    info = check_indexed_dataset(args.data_prefix)
    idx = np.memmap(args.data_prefix + ".idx", dtype=np.uint8, mode="r")
    lengths = np.frombuffer(idx, dtype=np.int32, count=info.num_sequences, offset=34).copy()
    tokens = np.memmap(args.data_prefix + ".bin", dtype=info.dtype, mode="r")
    report: dict = {
        "documents": info.num_sequences,
        "tokens": info.num_tokens,
        "dtype": info.dtype.__name__,
        "max_token_id": int(tokens.max()) if info.num_tokens else -1,
    }
    print(f"{args.data_prefix}: {info.dtype.__name__} tokens, files check out")
    print(
        f"  documents {info.num_sequences:,} (sequences; {info.num_documents:,} document "
        f"boundaries), tokens {info.num_tokens:,}, largest token id {report['max_token_id']:,}"
    )
    if lengths.size:
        print(
            f"  document length: min {lengths.min():,}, median {int(np.median(lengths)):,}, "
            f"mean {lengths.mean():,.1f}, max {lengths.max():,}"
        )
    if args.vocab_size is not None and report["max_token_id"] >= args.vocab_size:
        print(f"  ERROR: token id {report['max_token_id']} >= --vocab-size {args.vocab_size}")
        report["vocab_ok"] = False
    elif args.vocab_size is not None:
        report["vocab_ok"] = True
    print("document lengths (tokens):")
    print("\n".join(histogram(lengths, args.bins)))

    if args.seq_length:
        report["splits"] = _sample_counts(args, lengths)
    if args.tokenizer_type:
        _decode(args, tokens, lengths)
    return report


def _sample_counts(args: argparse.Namespace, lengths: np.ndarray) -> dict:
    bag, seq = args.bag_size, args.seq_length
    big = bag * (seq + 1)
    padded = -(-lengths // bag) * bag if args.pad_documents_to_bag else lengths
    print(
        f"per epoch, bag_size {bag}, L {seq}: a phase-1 row is {big:,} tokens, a phase-2 row "
        f"{seq + 1:,}"
        + (" (documents EOD-padded to the bag size)" if args.pad_documents_to_bag else "")
    )
    out = {}
    for name, (lo, hi) in zip(_SPLITS, split_ranges(args.split, lengths.size), strict=True):
        n_tokens = int(padded[lo:hi].sum())
        phase1 = n_tokens // big
        out[name] = {
            "documents": hi - lo,
            "tokens": n_tokens,
            "phase1": phase1,
            "phase2": phase1 * bag,
        }
        print(
            f"  {name:<5} {hi - lo:>9,} docs {n_tokens:>13,} tokens: {phase1:>10,} phase-1 rows "
            f"or {phase1 * bag:>10,} phase-2 rows"
            + ("  (too small for one row)" if phase1 == 0 and hi > lo else "")
        )
    return out


def _decode(args: argparse.Namespace, tokens: np.ndarray, lengths: np.ndarray) -> None:
    tok = build_tokenizer(
        args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file
    )
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    eods = int(np.count_nonzero(tokens == tok.eod)) if tokens.size else 0
    print(f"EOD ({tok.eod}) tokens: {eods:,}")
    for i in range(min(args.num_samples, lengths.size)):
        ids = np.asarray(tokens[starts[i] : starts[i + 1]])
        text = tok.detokenize(ids[: args.sample_chars * 2])[: args.sample_chars]
        print(f"--- document {i} ({lengths[i]:,} tokens) ---\n{text}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
