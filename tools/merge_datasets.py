"""Merge Megatron .bin/.idx datasets into one (Megatron-LM's tools/merge_datasets.py flags).

    python tools/merge_datasets.py --input data/shards --output-prefix data/corpus_text_document

reads every PREFIX.bin / PREFIX.idx pair in the --input folder, in sorted order of the
prefixes (as Megatron-LM's tool does), and writes their documents one after another into
--output-prefix.bin / .idx. --input may instead name the prefixes themselves (then in the
order given). Every input is checked first (a missing partner, a truncated or corrupt file,
mixed token types all stop the merge, naming the file); the output is written to temporary
files renamed into place only when complete, so a failed merge leaves no output behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from tst.data.indexed import (  # noqa: E402
    AtomicIndexedWriter,
    IndexedDatasetError,
    IndexInfo,
    check_indexed_dataset,
)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (Megatron-LM's flag names)."""
    p = argparse.ArgumentParser(
        prog="merge_datasets.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True,
                   help="a folder holding the .bin/.idx pairs to merge (sorted by prefix), or "
                   "the prefixes themselves, in order")  # fmt: skip
    p.add_argument("--output-prefix", required=True, help="PREFIX of the merged PREFIX.bin/.idx")
    p.add_argument("--multimodal", action="store_true",
                   help="Megatron-LM's multimodal indexes: refused (token datasets only)")  # fmt: skip
    return p.parse_args(argv)


def input_prefixes(inputs: list[str]) -> list[str]:
    """The prefixes to merge: a single folder's pairs sorted by prefix, else ``inputs``."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        folder = inputs[0]
        names = sorted(os.listdir(folder))
        prefixes = sorted({os.path.splitext(n)[0] for n in names
                           if n.endswith((".bin", ".idx"))
                           and os.path.isfile(os.path.join(folder, n))})  # fmt: skip
        if not prefixes:
            raise IndexedDatasetError(f"--input {folder} holds no .bin / .idx files to merge")
        return [os.path.join(folder, prefix) for prefix in prefixes]
    for path in inputs:
        if os.path.isdir(path):
            raise IndexedDatasetError(
                f"--input {path} is a folder among several inputs: give one folder, or prefixes"
            )
    return list(inputs)


def main(argv: list[str] | None = None) -> dict:
    """Merge; returns the counts (tests call this in-process)."""
    args = get_args(argv)
    if args.multimodal:
        raise IndexedDatasetError(
            "--multimodal: multimodal indexes are not merged here (this trainer reads token "
            "datasets only); drop the flag"
        )
    prefixes = input_prefixes(args.input)
    out = os.path.abspath(args.output_prefix)
    for prefix in prefixes:
        if os.path.abspath(prefix) == out:
            raise IndexedDatasetError(
                f"--output-prefix {args.output_prefix} is one of the inputs (a merged file left "
                "in the input folder is read again by the next merge): write it elsewhere"
            )
    if len(set(map(os.path.abspath, prefixes))) != len(prefixes):
        raise IndexedDatasetError("--input names a prefix twice: its documents would repeat")
    infos: list[IndexInfo] = [check_indexed_dataset(prefix) for prefix in prefixes]
    with AtomicIndexedWriter(args.output_prefix, infos[0].dtype) as writer:
        for info in infos:
            writer.add_dataset(info)
            print(f"  {info.prefix}: {info.num_sequences:,} documents, {info.num_tokens:,} "
                  f"tokens")  # fmt: skip
        writer.commit()
    print(f"wrote {args.output_prefix}.bin / .idx: {writer.num_documents:,} documents, "
          f"{writer.num_tokens:,} {infos[0].dtype.__name__} tokens from {len(infos)} datasets")  # fmt: skip
    return {"documents": writer.num_documents, "tokens": writer.num_tokens,
            "inputs": [info.prefix for info in infos]}  # fmt: skip


if __name__ == "__main__":
    from _cli import run_main

    run_main(main)
