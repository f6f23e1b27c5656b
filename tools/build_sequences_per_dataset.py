"""Write the --per-dataset-sequences-path file for a blend: each prefix's counts, one JSON.

    python tools/build_sequences_per_dataset.py --per-split-data-args-path blend.json \\
        --per-dataset-sequences-path blend-sequences.json

Takes the training run's data flags (``--data-path``, ``--data-args-path``,
``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path`` or
``--per-split-data-args-path``, read as ``pretrain_tst.py`` reads them), checks every prefix
they name (sizes, header, structure) and writes ``{prefix: [sequences, document boundaries]}``
as each ``.idx`` header holds them: Megatron-LM's format (its
``tools/build_sequences_per_dataset.py``), read by both trainers. The file is written whole
or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from tst.data.blends import blend_prefixes, data_blends  # noqa: E402
from tst.data.indexed import check_indexed_dataset  # noqa: E402
from tst.errors import InputError  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="build_sequences_per_dataset.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data-path", nargs="*", help="a blend split by --split, as the trainer's")
    p.add_argument("--data-args-path", help="a file holding the --data-path blend")
    p.add_argument("--train-data-path", nargs="*", help="the training blend")
    p.add_argument("--valid-data-path", nargs="*", help="the validation blend")
    p.add_argument("--test-data-path", nargs="*", help="the test blend")
    p.add_argument("--per-split-data-args-path", help='a JSON {"train": ..., "valid": ..., ...}')
    p.add_argument("--per-dataset-sequences-path", dest="output", required=True,
                   help="the JSON file to write")  # fmt: skip
    args = p.parse_args(argv)
    sources = [args.data_path, args.data_args_path, args.per_split_data_args_path,
               args.train_data_path or args.valid_data_path or args.test_data_path]  # fmt: skip
    if sum(bool(s) for s in sources) != 1:
        p.error("give one of --data-path, --data-args-path, --per-split-data-args-path and "
                "--train/valid/test-data-path")  # fmt: skip
    # The data flags as the trainer reads them: no mock data, no counts file to read.
    args.mock_data, args.per_dataset_sequences_path = False, None
    return args


def sequences_per_dataset(args: argparse.Namespace) -> dict[str, list[int]]:
    """Every prefix the data flags name -> [sequences, document boundaries] from its header."""
    counts = {}
    for prefix in blend_prefixes(data_blends(args)):
        info = check_indexed_dataset(prefix)
        counts[prefix] = list(info.header_counts)
    return counts


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    args = get_args(argv)
    counts = sequences_per_dataset(args)
    out = args.output
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(counts, f, indent=1)
            f.write("\n")
        os.replace(tmp, out)
    except OSError as error:
        raise InputError(f"--per-dataset-sequences-path {out}: {error.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{len(counts)} prefixes: {sum(c[0] for c in counts.values())} sequences; wrote {out}")
    return counts


if __name__ == "__main__":
    from _cli import run_main

    run_main(main)
