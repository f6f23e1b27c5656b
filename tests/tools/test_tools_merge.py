"""tools/merge_datasets.py (Megatron-LM's flags): merged shards are the dataset the whole
corpus gives, and bad input stops the merge by name, leaving no output.

The reference is independent of the merge: the project's preprocessor run over the
concatenated corpus must write, byte for byte, the .bin / .idx that merging the shards it
writes one by one gives; megatron-core's own reader reads the documents back in order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_support import ROOT, load_tool, training_text, write_jsonl

from tst.data.indexed import AtomicIndexedWriter, IndexedDatasetError, open_indexed_dataset

merge_datasets = load_tool("merge_datasets")
preprocess_data = load_tool("preprocess_data")


def _preprocess(jsonl: str, prefix: str) -> str:
    preprocess_data.main(["--input", jsonl, "--output-prefix", prefix, "--tokenizer-type",
                          "ByteTokenizer", "--append-eod", "--log-interval", "100"])  # fmt: skip
    return prefix + "_text_document"


def _documents(prefix: str) -> list[list[int]]:
    ds = open_indexed_dataset(prefix)
    return [np.array(ds[i]).tolist() for i in range(len(ds))]


def _bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three preprocessed shards of the corpus (in a folder, named so that sorting keeps
    their order) and the whole corpus preprocessed at once."""
    tmp = tmp_path_factory.mktemp("merge")
    docs = training_text()
    parts = [docs[:3], docs[3:5], docs[5:]]
    assert all(parts)
    folder = tmp / "shards"
    folder.mkdir()
    prefixes = [_preprocess(write_jsonl(str(tmp / f"part{k}.jsonl"), part),
                            str(folder / f"part{k}")) for k, part in enumerate(parts)]  # fmt: skip
    whole = _preprocess(write_jsonl(str(tmp / "whole.jsonl"), docs), str(tmp / "whole"))
    return folder, prefixes, whole


def test_merging_the_shards_writes_what_the_whole_corpus_gives(shards, tmp_path):
    folder, prefixes, whole = shards
    out = str(tmp_path / "merged")
    report = merge_datasets.main(["--input", str(folder), "--output-prefix", out])
    assert report["inputs"] == prefixes  # the folder's pairs, sorted by prefix
    assert _bytes(out) == _bytes(whole)
    want = _documents(whole)
    assert _documents(out) == want and report["documents"] == len(want)
    assert report["tokens"] == sum(map(len, want))
    # Prefixes given by name merge in the order given.
    backwards = str(tmp_path / "backwards")
    merge_datasets.main(["--input", *reversed(prefixes), "--output-prefix", backwards])
    by_shard = [_documents(p) for p in reversed(prefixes)]
    assert _documents(backwards) == [d for shard in by_shard for d in shard]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["merged.bin", "merged.idx", "backwards.bin", "backwards.idx"]
    )  # no temporaries left


def _copy(shards, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(shards[0], folder)
    return folder, sorted(str(folder / os.path.splitext(n)[0])
                          for n in os.listdir(folder) if n.endswith(".idx"))  # fmt: skip


def _error(argv: list[str]) -> str:
    with pytest.raises(IndexedDatasetError) as caught:
        merge_datasets.main(argv)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_bad_input_stops_the_merge_by_name_and_leaves_no_output(shards, tmp_path):
    folder, prefixes = _copy(shards, tmp_path)
    out = str(tmp_path / "out" / "merged")
    os.makedirs(os.path.dirname(out))
    argv = ["--input", str(folder), "--output-prefix", out]
    # A shard tokenized with another vocabulary (int32 tokens): found while writing, after
    # the shards before it were copied; the partial output is removed.
    with AtomicIndexedWriter(str(folder / "part9"), np.int32) as writer:
        writer.add_document(np.arange(5))
        writer.commit()
    assert "part9 stores tokens as int32, the datasets before it as uint16" in _error(argv)
    assert os.listdir(os.path.dirname(out)) == []
    for suffix in (".bin", ".idx"):
        os.remove(str(folder / "part9") + suffix)
    # A missing partner, a truncated .bin: named before anything is written.
    os.remove(prefixes[1] + ".idx")
    assert f"{prefixes[1]}.idx is missing (its partner exists)" in _error(argv)
    shutil.copy(shards[1][1] + ".idx", prefixes[1] + ".idx")
    with open(prefixes[2] + ".bin", "r+b") as f:
        f.truncate(10)
    assert f"{prefixes[2]}.bin is truncated" in _error(argv)
    assert os.listdir(os.path.dirname(out)) == []
    # The output among the inputs, a prefix twice, nothing to merge, --multimodal.
    assert "is one of the inputs" in _error(["--input", str(folder), "--output-prefix",
                                             prefixes[0]])  # fmt: skip
    assert "names a prefix twice" in _error(["--input", prefixes[0], prefixes[0],
                                             "--output-prefix", out])  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no .bin / .idx files" in _error(["--input", str(empty), "--output-prefix", out])
    assert "--multimodal" in _error([*argv, "--multimodal"])
    assert "is a folder among several inputs" in _error(["--input", str(folder), prefixes[0],
                                                         "--output-prefix", out])  # fmt: skip


def test_the_command_line_exits_1_with_one_line(shards, tmp_path):
    folder, prefixes = _copy(shards, tmp_path)
    os.remove(prefixes[0] + ".bin")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "merge_datasets.py"), "--input",
         str(folder), "--output-prefix", str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.startswith("merge_datasets.py: error: ") and "Traceback" not in result.stderr
    )
    assert f"{prefixes[0]}.bin is missing" in result.stderr
