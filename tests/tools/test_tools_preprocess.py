"""tools/preprocess_data.py: round trips for every tokenizer type, worker-count invariance,
input formats, and each kind of bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_support import (
    ROOT,
    TRICKY_DOCS,
    load_tool,
    make_tokenizers,
    training_text,
    write_jsonl,
)

from tst.data.indexed import check_indexed_dataset, open_indexed_dataset
from tst.data.preprocess import PreprocessError
from tst.data.tokenizers import TokenizerFileError, build_tokenizer

preprocess_data = load_tool("preprocess_data")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, list[str]]:
    return make_tokenizers(str(tmp_path_factory.mktemp("tokenizers")))


def _tok_from_flags(ttype: str, flags: list[str]):
    kw = dict(zip(flags[0::2], flags[1::2], strict=True))
    return build_tokenizer(
        ttype, kw.get("--tokenizer-model"), kw.get("--vocab-file"), kw.get("--merge-file")
    )


def _run(inputs, prefix, ttype="NullTokenizer", flags=(), extra=()):
    argv = ["--input", *inputs, "--output-prefix", prefix, "--tokenizer-type", ttype]
    return preprocess_data.main([*argv, *flags, *extra, "--log-interval", "100"])


def _documents(prefix: str) -> list[np.ndarray]:
    ds = open_indexed_dataset(prefix)
    # Copies: megatron-core closes the memory map when the dataset is collected.
    return [np.array(ds[i]) for i in range(len(ds))]


@pytest.mark.parametrize(
    "ttype", ["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer"]
)
def test_round_trip_every_tokenizer(tmp_path, tokenizers, ttype):
    docs = training_text()[:7]
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    prefix = str(tmp_path / "out")
    summary = _run([corpus], prefix, ttype, tokenizers[ttype], ["--append-eod"])
    tok = _tok_from_flags(ttype, tokenizers[ttype])
    written = _documents(summary.outputs["text"])
    assert len(written) == len(docs)
    for original, ids in zip(docs, written, strict=True):
        # Independent expectation: the tokenizer on the raw text, then EOD.
        assert ids.tolist() == tok.tokenize(original) + [tok.eod]
        assert tok.detokenize(ids[:-1]) == original
    info = check_indexed_dataset(summary.outputs["text"])
    assert info.dtype == np.uint16  # vocabularies below 65,500 ids
    assert summary.tokens == sum(len(w) for w in written)


def test_one_and_four_workers_write_identical_files(tmp_path, tokenizers):
    # Enough records for many chunks, so the four workers really interleave.
    docs = [d for d in training_text() for _ in range(3)] + TRICKY_DOCS * 40
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    flags = tokenizers["SentencePieceTokenizer"]
    one = _run(
        [corpus], str(tmp_path / "w1"), "SentencePieceTokenizer", flags, ["--chunk-records", "8"]
    )
    four = _run(
        [corpus],
        str(tmp_path / "w4"),
        "SentencePieceTokenizer",
        flags,
        ["--workers", "4", "--chunk-records", "8"],
    )
    for suffix in (".bin", ".idx"):
        with (
            open(one.outputs["text"] + suffix, "rb") as a,
            open(four.outputs["text"] + suffix, "rb") as b,
        ):
            assert a.read() == b.read()
    assert one.documents == four.documents == len(docs)


def test_text_modes_gzip_globs_and_several_json_keys(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond\nline\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("third\n")
    line = _run([str(tmp_path / "*.txt*")], str(tmp_path / "line"), extra=["--text-mode", "line"])
    tok = build_tokenizer("NullTokenizer")
    assert [tok.detokenize(d) for d in _documents(line.outputs["text"])] == [
        "first line",
        "second",
        "line",
        "third",
    ]
    assert line.empty_documents == 1  # the blank line
    block = _run(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")],
        str(tmp_path / "blk"),
        extra=["--text-mode", "block"],
    )
    assert [tok.detokenize(d) for d in _documents(block.outputs["text"])] == [
        "first line",
        "second\nline",
        "third",
    ]
    with gzip.open(tmp_path / "k.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"title": "T1", "text": "body one"}) + "\n")
        f.write(json.dumps({"title": "T2", "text": "body two"}) + "\n")
    keys = _run(
        [str(tmp_path / "k.jsonl.gz")], str(tmp_path / "k"), extra=["--json-keys", "text", "title"]
    )
    assert [tok.detokenize(d) for d in _documents(keys.outputs["title"])] == ["T1", "T2"]
    assert [tok.detokenize(d) for d in _documents(keys.outputs["text"])] == ["body one", "body two"]
    assert keys.outputs["text"] == str(tmp_path / "k_text_document")  # Megatron-LM's naming


def _bad_utf8_corpus(tmp_path) -> str:
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}).encode() for i in range(6)]
    lines[2] = b'{"text": "caf\xe9 latin-1"}'  # invalid UTF-8 on line 3
    lines[4] = json.dumps({"text": "   "}).encode()  # an empty document on line 5
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_bad_utf8_is_skipped_and_reported_with_file_and_line(tmp_path, capsys):
    corpus = _bad_utf8_corpus(tmp_path)
    summary = _run([corpus], str(tmp_path / "out"))
    assert summary.bad_utf8_records == 1
    assert summary.bad_utf8_locations[0].startswith(f"{corpus}:3:")
    assert summary.empty_documents == 1
    assert summary.documents == 4
    assert f"{corpus}:3:" in capsys.readouterr().err


def test_bad_utf8_fatal_leaves_no_output(tmp_path):
    corpus = _bad_utf8_corpus(tmp_path)
    prefix = str(tmp_path / "out")
    with pytest.raises(PreprocessError, match=rf"{corpus}:3: invalid UTF-8.*--on-bad-utf8 skip"):
        _run([corpus], prefix, extra=["--on-bad-utf8", "fail"])
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # no .bin/.idx, no temporaries


def test_bad_json_and_missing_key_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(PreprocessError, match=rf"{path}:2: not a JSON line"):
        _run([str(path)], str(tmp_path / "o"))
    path.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(PreprocessError, match=rf"{path}:2: no key 'text'.*--json-keys"):
        _run([str(path)], str(tmp_path / "o"))
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_interrupted_run_leaves_no_pair_that_looks_valid(tmp_path, monkeypatch):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), [f"document {i}" for i in range(300)])
    prefix = str(tmp_path / "out")
    _run([corpus], prefix)  # an older complete pair exists at the prefix
    old = check_indexed_dataset(prefix + "_text_document")

    from tst.data import indexed

    calls = {"n": 0}
    original = indexed.AtomicIndexedWriter.add_document

    def dying(self, tokens):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt  # as a Ctrl-C half way through
        original(self, tokens)

    monkeypatch.setattr(indexed.AtomicIndexedWriter, "add_document", dying)
    write_jsonl(corpus, [f"new document {i}" for i in range(300)])
    with pytest.raises(KeyboardInterrupt):
        _run([corpus], prefix)
    # The old pair is untouched and still consistent; no temporary is left behind.
    assert check_indexed_dataset(prefix + "_text_document") == old
    assert sorted(os.listdir(tmp_path)) == [
        "c.jsonl",
        "out_text_document.bin",
        "out_text_document.idx",
    ]


def test_wrong_tokenizer_file_kind_is_named(tmp_path, tokenizers):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), ["x"])
    hf_json = tokenizers["HuggingFaceTokenizer"][1]
    with pytest.raises(TokenizerFileError, match=rf"{hf_json} is a JSON file, not a SentencePiece"):
        _run(
            [corpus], str(tmp_path / "o"), "SentencePieceTokenizer", ["--tokenizer-model", hf_json]
        )
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_missing_input_is_an_error(tmp_path):
    from tst.data.corpus import CorpusError

    with pytest.raises(CorpusError, match="no such file"):
        _run([str(tmp_path / "nope*.jsonl")], str(tmp_path / "o"))


def test_int32_tokens_for_a_large_vocabulary(tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), ["abc"])
    summary = _run([corpus], str(tmp_path / "o"), extra=["--vocab-size", "70000"])
    assert check_indexed_dataset(summary.outputs["text"]).dtype == np.int32


def test_cli_smoke(tmp_path):
    """The one subprocess run: the script works from the repo root and fails cleanly."""
    corpus = _bad_utf8_corpus(tmp_path)
    cmd = [
        sys.executable,
        "tools/preprocess_data.py",
        "--input",
        corpus,
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-type",
        "NullTokenizer",
        "--on-bad-utf8",
        "fail",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert f"error: {corpus}:3: invalid UTF-8" in res.stderr
    assert "Traceback" not in res.stderr


def test_megatron_lms_other_flags_are_accepted_or_refused_by_name(tmp_path, tokenizers):
    """--partitions, --keep-sequential-samples, --legacy-tokenizer (not with
    SentencePieceTokenizer), --keep-newlines and --lang write what the plain command writes;
    --split-sentences (BERT-style data) and --partitions 0 are refused by name."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), training_text()[:5])
    plain = str(tmp_path / "plain")
    _run([corpus], plain, "ByteTokenizer", extra=["--append-eod"])
    flagged = str(tmp_path / "flagged")
    _run([corpus], flagged, "ByteTokenizer", extra=[
        "--append-eod", "--partitions", "3", "--keep-sequential-samples", "--legacy-tokenizer",
        "--keep-newlines", "--lang", "english", "--workers", "3"])  # fmt: skip
    for suffix in (".bin", ".idx"):
        with open(plain + "_text_document" + suffix, "rb") as a, \
                open(flagged + "_text_document" + suffix, "rb") as b:  # fmt: skip
            assert a.read() == b.read(), suffix
    for extra, message in (
        (["--split-sentences"], r"--split-sentences splits each document into sentences"),
        (["--partitions", "0"], r"--partitions must be >= 1, got 0"),
    ):
        with pytest.raises(PreprocessError, match=message):
            _run([corpus], str(tmp_path / "x"), "ByteTokenizer", extra=extra)
    with pytest.raises(PreprocessError, match=r"--legacy-tokenizer with SentencePieceTokenizer"):
        _run([corpus], str(tmp_path / "x"), "SentencePieceTokenizer",
             tokenizers["SentencePieceTokenizer"], ["--legacy-tokenizer"])  # fmt: skip
    assert not [n for n in os.listdir(tmp_path) if n.startswith("x")]
