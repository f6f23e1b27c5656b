"""A short fuzzing run of tools/preprocess_data.py: random bytes, damaged JSONL, cut gzip.

Every input must end in either a clear error of the tool's own kinds (which the CLI prints
as one line) with no output left behind, or a finished, valid .bin/.idx pair whose skipped
records are counted. Never another exception, never a pair that fails the checked open.
"""

from __future__ import annotations

import gzip
import json
import os
import random

import pytest
from data_support import load_tool

from tst.data.corpus import CorpusError
from tst.data.indexed import IndexedDatasetError, check_indexed_dataset
from tst.data.preprocess import PreprocessError
from tst.data.tokenizers import TokenizerFileError

preprocess_data = load_tool("preprocess_data")
CLEAR_ERRORS = (PreprocessError, CorpusError, TokenizerFileError, IndexedDatasetError)
CASES = 40


def _random_input(rng: random.Random, path: str) -> str:
    kind = rng.choice(["bytes", "jsonl-garbage", "gzip-cut", "text-bytes", "jsonl-types"])
    if kind == "bytes":
        path += ".jsonl"
        data = rng.randbytes(rng.randint(0, 4000))
    elif kind == "jsonl-garbage":
        path += ".jsonl"
        lines = []
        for i in range(rng.randint(1, 30)):
            good = json.dumps({"text": f"document {i} " * rng.randint(0, 5)}).encode()
            bad = rng.randbytes(rng.randint(1, 40))
            lines.append(rng.choice([good, good, bad, good[: rng.randint(0, len(good))]]))
        data = b"\n".join(lines)
    elif kind == "gzip-cut":
        path += ".jsonl.gz"
        full = gzip.compress(b"\n".join(json.dumps({"text": f"d{i}"}).encode() for i in range(50)))
        data = full[: rng.randint(0, len(full))]
    elif kind == "text-bytes":
        path += ".txt"
        data = rng.randbytes(rng.randint(0, 2000)).replace(b"\x00", b"\n")
    else:  # JSON of the wrong shapes
        path += ".jsonl"
        values = [[1, 2], None, 3.5, {"text": None}, {"text": 7}, "str", {"text": "fine"}]
        data = b"\n".join(json.dumps(rng.choice(values)).encode() for _ in range(10))
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("case", range(CASES))
def test_garbage_in_gives_a_clear_error_or_a_valid_counted_output(tmp_path, case):
    rng = random.Random(int.from_bytes(os.urandom(4), "little") ^ case)
    corpus = _random_input(rng, str(tmp_path / "input"))
    prefix = str(tmp_path / "out")
    argv = ["--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
            "--append-eod", "--log-interval", "1000"]  # fmt: skip
    if corpus.endswith(".txt"):
        argv += ["--input-format", "text"]
    try:
        summary = preprocess_data.main(argv)
    except CLEAR_ERRORS as error:
        assert str(error), "an error must say what went wrong"
        outputs = [n for n in os.listdir(tmp_path) if n.startswith("out")]
        assert outputs == [], f"a failed run left {outputs}"
        return
    info = check_indexed_dataset(prefix + "_text_document")  # opens and passes its checks
    # What the summary reports written is what the files hold.
    assert info.num_sequences == summary.documents
    assert info.num_tokens == summary.tokens
