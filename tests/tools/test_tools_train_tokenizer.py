"""tools/train_tokenizer.py: special tokens, long lines kept, both libraries."""

from __future__ import annotations

import pytest
from data_support import load_tool, training_text, write_jsonl

from tst.data.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer

train_tokenizer = load_tool("train_tokenizer")


def test_special_tokens_and_ids(tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), training_text())
    prefix = str(tmp_path / "sp")
    train_tokenizer.main(
        [
            "--input",
            corpus,
            "--model-prefix",
            prefix,
            "--vocab-size",
            "400",
            "--num-threads",
            "1",
            "--pad-token",
            "<pad>",
            "--user-defined-symbols",
            "<sep>",
        ]
    )
    tok = SentencePieceTokenizer(prefix + ".model")
    sp = tok._sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.IdToPiece(tok.eod) == "<|endoftext|>"
    sep = sp.PieceToId("<sep>")
    assert sep == 4 and sep in tok.tokenize("a<sep>b")  # a user-defined symbol is one piece


def test_long_lines_are_cut_not_dropped(tmp_path):
    # "zyzzyva" occurs only inside one line far longer than --max-sentence-length.
    # SentencePiece alone would drop that line, and the word would never be learned.
    long_line = " ".join(["zyzzyva"] * 3000)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), [*training_text()[:5], long_line])
    prefix = str(tmp_path / "sp")
    summary = train_tokenizer.main(
        [
            "--input",
            corpus,
            "--model-prefix",
            prefix,
            "--vocab-size",
            "400",
            "--num-threads",
            "1",
            "--max-sentence-length",
            "2000",
        ]
    )
    assert summary.long_lines_split == 1
    tok = SentencePieceTokenizer(prefix + ".model")
    assert len(tok.tokenize("zyzzyva")) <= 2


def test_huggingface_library(tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), training_text())
    out = str(tmp_path / "hf")
    summary = train_tokenizer.main(
        [
            "--input",
            corpus,
            "--model-prefix",
            out,
            "--library",
            "huggingface",
            "--vocab-size",
            "400",
        ]
    )
    tok = HuggingFaceTokenizer(summary.outputs[0])
    assert tok.vocab_size == summary.vocab_size <= 400
    assert tok.eod == 0  # first special token


def test_empty_input_is_an_error(tmp_path):
    from tst.data.corpus import CorpusError

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), ["", "  "])
    with pytest.raises((CorpusError, RuntimeError)):
        train_tokenizer.main(
            ["--input", corpus, "--model-prefix", str(tmp_path / "sp"), "--vocab-size", "400"]
        )
