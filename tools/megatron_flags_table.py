#!/usr/bin/env python
"""Print the README's "Coming from Megatron-LM" table: every flag of the given launch-script
flag lists, with what pretrain_tst.py does with it.

    python tools/megatron_flags_table.py tests/data/megatron_scripts/*.args
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def script_flags(paths: list[str]) -> dict[str, list[str]]:
    """flag -> names of the scripts that pass it (in file order)."""
    flags: dict[str, list[str]] = {}
    for path in paths:
        name = os.path.basename(path).removesuffix(".args")
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    flags.setdefault(line.split()[0], [])
                    if name not in flags[line.split()[0]]:
                        flags[line.split()[0]].append(name)
    return flags


def table(paths: list[str]) -> str:
    from tst import megatron_flags
    from tst.config import build_parser

    parser = build_parser()
    rows = ["| flag | here | scripts | what / why |", "|---|---|---|---|"]
    for flag, users in sorted(script_flags(paths).items()):
        kind, why = megatron_flags.classify(parser, flag)
        if kind == "unknown":
            why = "not yet: the MoE routing / MLA / MTP flags (refused as unknown, one line)"
        why = why.replace("|", "\\|")
        rows.append(f"| `{flag}` | {kind} | {len(users)} | {why} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="flag lists (.args files)")
    print(table(parser.parse_args(argv).paths))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
