"""tools/inspect_dataset.py and tools/get_corpus.py, plus --help of every tool."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from data_support import HAVE_SOTU, ROOT, load_tool, write_positional_dataset

inspect_dataset = load_tool("inspect_dataset")


def test_counts_and_phase_rows(tmp_path, capsys):
    prefix = str(tmp_path / "d")
    write_positional_dataset(prefix, [10] * 90 + [25] * 10)  # 1,150 tokens
    report = inspect_dataset.main(
        [
            "--data-prefix",
            prefix,
            "--bag-size",
            "4",
            "--seq-length",
            "4",
            "--split",
            "9,1,0",
            "--vocab-size",
            "2000",
        ]
    )
    assert report["documents"] == 100 and report["tokens"] == 1150
    assert report["max_token_id"] == 1150 and report["vocab_ok"]
    # Independent arithmetic: train = documents 0..89 (900 tokens), valid = 90..99 (250);
    # a phase-1 row is 4 * 5 = 20 tokens, a phase-2 row one 5-token unit of it.
    assert report["splits"]["train"] == {
        "documents": 90,
        "tokens": 900,
        "phase1": 45,
        "phase2": 180,
    }
    assert report["splits"]["valid"] == {"documents": 10, "tokens": 250, "phase1": 12, "phase2": 48}
    out = capsys.readouterr().out
    assert "document lengths" in out and "| #" in out
    padded = inspect_dataset.main(
        [
            "--data-prefix",
            prefix,
            "--bag-size",
            "4",
            "--seq-length",
            "4",
            "--split",
            "9,1,0",
            "--pad-documents-to-bag",
        ]
    )
    assert padded["splits"]["train"]["tokens"] == 90 * 12  # 10 -> 12 with EOD padding


def test_decoded_samples_and_vocab_check(tmp_path, capsys):
    preprocess = load_tool("preprocess_data")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "Hello, Senate."}) + "\n", encoding="utf-8")
    summary = preprocess.main(
        [
            "--input",
            str(corpus),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-type",
            "NullTokenizer",
            "--append-eod",
        ]
    )
    report = inspect_dataset.main(
        [
            "--data-prefix",
            summary.outputs["text"],
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "200",
        ]
    )
    assert report["vocab_ok"] is False  # EOD is 256
    out = capsys.readouterr().out
    assert "Hello, Senate." in out and "EOD (256) tokens: 1" in out


@pytest.mark.skipif(not HAVE_SOTU, reason="needs the sotu package (requirements.txt)")
def test_get_corpus(tmp_path):
    get_corpus = load_tool("get_corpus")
    out = tmp_path / "sotu.jsonl"
    assert get_corpus.main(["--output", str(out), "--limit", "3"]) == 3
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["year"] == 1790 and rows[0]["president"] == "Washington"
    assert rows[0]["text"].startswith("Fellow-Citizens of the Senate")


def test_every_tool_has_help():
    code = (
        "import runpy, sys\n"
        "for tool in ('train_tokenizer', 'preprocess_data', 'inspect_dataset', 'get_corpus'):\n"
        "    sys.argv = [tool + '.py', '--help']\n"
        "    try:\n"
        "        runpy.run_path(f'tools/{tool}.py', run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, tool\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    for flag in ("--model-prefix", "--output-prefix", "--json-keys", "--bag-size", "--limit"):
        assert flag in res.stdout
