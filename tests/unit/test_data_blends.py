"""Per-split data paths and blend files through pretrain_tst.py, as Megatron-LM reads them.

Two datasets with disjoint token ids (A: ids < 150, B: ids >= 200) say exactly what each
split read: with ``--train-data-path A --valid-data-path B`` every training row holds A's
ids only, the validation set holds B's only, and each split reads its prefix whole (all of
its documents: ``--split`` does not apply). The same blends given as a JSON file
(``--per-split-data-args-path``, with a ``--split`` that is ignored) and ``--data-path`` given
as a file (``--data-args-path``) give the same losses exactly. Bad input gets one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flags import SMALL_GPT

import pretrain_tst
from tst.data.stream import SampleStream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = [
    "--vocab-size", "384", "--tokenizer-type", "NullTokenizer", "--num-layers", "2",
    "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
    "--micro-batch-size", "2", "--train-iters", "4", "--tst-bag-size", "2", "--tst-iters", "2",
    "--lr", "1e-2", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
    "--peak-tflops", "1", "--num-workers", "0", *SMALL_GPT,
]  # fmt: skip


def _dataset(path, name: str, low: int, high: int, docs: int = 30) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(path / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(low)
    for _ in range(docs):
        builder.add_document(rng.integers(low, high, 40).tolist(), [40])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("blends")
    return _dataset(path, "a_text_document", 0, 150), _dataset(path, "b_text_document", 200, 380)


def _run(argv: list[str], metrics: str) -> dict:
    """pretrain_tst.main in this process: the datasets built, the training rows, records."""
    seen: dict = {"rows": []}
    build, next_micro_batch = pretrain_tst.build_datasets, SampleStream.next_micro_batch

    def capture(*args, **kwargs):
        seen["datasets"] = build(*args, **kwargs)
        return seen["datasets"]

    def record(self, bag_size):
        rows = next_micro_batch(self, bag_size)
        if self.dataset is seen["datasets"][0]:
            seen["rows"].append(rows)
        return rows

    pretrain_tst.build_datasets, SampleStream.next_micro_batch = capture, record
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        pretrain_tst.build_datasets, SampleStream.next_micro_batch = build, next_micro_batch
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    seen["loss"] = [r["loss"] for r in records if r.get("loss") is not None]
    seen["val"] = [r["val_loss"] for r in records if "val_loss" in r]
    seen["test"] = [r["test_loss"] for r in records if "test_loss" in r]
    return seen


def _tokens(dataset) -> np.ndarray:
    return np.concatenate([dataset[i]["tokens"].numpy() for i in range(len(dataset))])


def test_per_split_paths_train_and_evaluate_on_their_own_prefixes(data, tmp_path):
    a, b = data
    run = _run(BASE + ["--train-data-path", a, "--valid-data-path", b], str(tmp_path / "1.jsonl"))
    train, valid, test = run["datasets"]
    assert test is None  # not asked for: not built
    assert len(run["rows"]) == 4 and all(int(r.max()) < 150 for r in run["rows"])
    assert _tokens(train).max() < 150 and _tokens(valid).min() >= 200
    # Whole prefixes: every document of A trains, every document of B validates.
    assert sorted(train.indices.tolist()) == list(range(30))
    assert sorted(valid.indices.tolist()) == list(range(30))
    assert len(run["loss"]) == 4 and len(run["val"]) == 2
    # The same blends from a JSON file (a string, a weighted list, null), with a --split that
    # does not apply (warned, ignored): the same run exactly.
    spec = tmp_path / "splits.json"
    spec.write_text(json.dumps({"train": a, "valid": ["1.0", b], "test": None}))
    with pytest.warns(UserWarning, match="--split 98,2,0 has no effect with per-split"):
        again = _run(BASE + ["--per-split-data-args-path", str(spec), "--split", "98,2,0"],
                     str(tmp_path / "2.jsonl"))  # fmt: skip
    assert again["loss"] == run["loss"] and again["val"] == run["val"]
    # No validation blend: no evaluation, as with an empty validation split.
    no_valid = _run(BASE + ["--train-data-path", a], str(tmp_path / "3.jsonl"))
    assert no_valid["datasets"][1] is None and no_valid["val"] == []
    assert no_valid["loss"] == run["loss"]


def test_data_args_path_reads_the_data_path_blend_from_a_file(data, tmp_path):
    a, b = data
    direct = _run(BASE + ["--data-path", "0.3", a, "0.7", b], str(tmp_path / "1.jsonl"))
    blend = tmp_path / "blend.txt"
    blend.write_text(f"0.3 {a}\n0.7\t{b}\n")
    from_file = _run(BASE + ["--data-args-path", str(blend)], str(tmp_path / "2.jsonl"))
    assert from_file["loss"] == direct["loss"] and from_file["val"] == direct["val"]
    # The blend matters (a file that is not read would train on something else, or fail).
    only_a = _run(BASE + ["--data-path", a], str(tmp_path / "3.jsonl"))
    assert only_a["loss"] != direct["loss"]
    assert any(int(r.max()) >= 200 for r in direct["rows"])
    assert all(int(r.max()) < 150 for r in only_a["rows"])


def _error(argv: list[str]) -> str:
    with pytest.raises(ValueError) as info:
        pretrain_tst.main(argv)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_bad_data_path_input_gets_one_line(data, tmp_path):
    a, b = data
    missing = str(tmp_path / "nope.json")
    assert _error(BASE + ["--per-split-data-args-path", missing]) == (
        f"--per-split-data-args-path {missing}: No such file or directory"
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": ["a"],}')
    assert _error(BASE + ["--per-split-data-args-path", str(bad)]).startswith(
        f"--per-split-data-args-path {bad} is not JSON (line 1, column 17: "
    )
    bad.write_text(json.dumps({"train": [a], "test": None}))
    assert 'has no "valid" key' in _error(BASE + ["--per-split-data-args-path", str(bad)])
    bad.write_text(json.dumps({"train": [a], "valid": [1, b], "test": None}))
    assert '"valid" must be a list of strings' in _error(
        BASE + ["--per-split-data-args-path", str(bad)]
    )
    assert _error(BASE + ["--data-path", a, "--train-data-path", a]).startswith(
        "give one of --data-path, --data-args-path, --per-split-data-args-path and "
    )
    assert "no training data: add --train-data-path" in _error(BASE + ["--valid-data-path", b])
    assert "no dataset at prefix" in _error(BASE + ["--train-data-path", a, "--valid-data-path",
                                                    str(tmp_path / "b_text")])  # fmt: skip
    assert _error(BASE + ["--valid-data-path", "x", "0.5", b, "--train-data-path", a]).startswith(
        "--valid-data-path x 0.5 "
    )
    assert _error(BASE + ["--data-args-path", missing]) == (
        f"--data-args-path {missing}: No such file or directory"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    assert "is empty" in _error(BASE + ["--data-args-path", str(empty)])
    # From the command line: exit status 2 and one line, before any process group starts.
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_tst.py"), *BASE,
           "--per-split-data-args-path", missing]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"pretrain_tst.py: error: --per-split-data-args-path {missing}: No such file or directory"
    ]


def test_the_test_split_is_evaluated_once_at_the_end(data, tmp_path):
    """As Megatron-LM does: --test-data-path (or --split's third part) is scored once when
    the run completes. With the test prefix equal to the validation prefix, the end's test
    loss equals the last validation loss exactly (same weights, same tokens); another prefix
    gives another loss. A run without a test split logs none."""
    a, b = data
    same = _run(BASE + ["--train-data-path", a, "--valid-data-path", b, "--test-data-path", b],
                str(tmp_path / "1.jsonl"))  # fmt: skip
    assert _tokens(same["datasets"][2]).min() >= 200
    assert len(same["test"]) == 1 and same["test"][0] == same["val"][-1]
    other = _run(BASE + ["--train-data-path", a, "--valid-data-path", b, "--test-data-path", a],
                 str(tmp_path / "2.jsonl"))  # fmt: skip
    assert other["loss"] == same["loss"] and other["test"][0] != other["val"][-1]
    # --split's third part: a test split of its own documents.
    split = _run(BASE + ["--data-path", a, "--split", "60,20,20"], str(tmp_path / "3.jsonl"))
    test = split["datasets"][2]
    assert len(split["test"]) == 1 and set(test.indices.tolist()).isdisjoint(
        split["datasets"][1].indices.tolist())  # fmt: skip
    none = _run(BASE + ["--train-data-path", a, "--valid-data-path", b], str(tmp_path / "4.jsonl"))
    assert none["datasets"][2] is None and none["test"] == []
    # The tools read a file with a test record.
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from run_metrics import read_metrics

    assert len(read_metrics(str(tmp_path / "1.jsonl")).evals) == 2


def test_a_test_split_too_small_skips_the_test_score_and_a_train_part_stops_the_run(
    data, tmp_path, capsys
):
    """A test split with too few tokens for one sample (here no document: 1% of 30) skips
    the end's test score with one line saying why, for one prefix and for an unweighted
    blend (whose components are read whole, so megatron-core would assert on a weight of 0);
    a training part that small stops the run, naming the prefix and the split."""
    a, b = data
    blends = (["--data-path", a], ["--data-path", a, b], ["--data-path", "1", a, "1", b])
    for i, argv in enumerate(blends):
        run = _run(BASE + argv + ["--split", "90,9,1"], str(tmp_path / f"{i}.jsonl"))
        out = capsys.readouterr().out
        assert run["datasets"][2] is None and run["test"] == [], argv
        assert "no test evaluation at the end: the test split of " in out, argv
        assert "holds 0 tokens in 0 documents, fewer than one sample of 18 tokens" in out, argv
        assert len(run["loss"]) == 4 and len(run["val"]) == 2, argv
    tiny = _dataset(tmp_path, "tiny_text_document", 200, 380, docs=1)  # 40 tokens
    message = _error(BASE + ["--data-path", a, tiny, "--split", "50,50,0"])
    assert message.startswith(f"the train split of {tiny} holds 0 tokens in 0 documents"), message
    assert "give this split more weight in --split (50,50,0)" in message


def test_mid_level_dataset_surplus_reaches_the_blend(data, tmp_path):
    """--mid-level-dataset-surplus 1: each part of a weighted --data-path blend builds twice
    its share of the 6 training samples (big samples of 2 x 9 tokens: 2 superposition steps
    of 2 bag-2 rows, then 2 steps of 2 rows: 12 units; 3 from each part), not 0.5% more (4)."""
    a, b = data
    seen = _run(BASE + ["--data-path", "0.5", a, "0.5", b, "--mid-level-dataset-surplus", "1"],
                str(tmp_path / "m.jsonl"))  # fmt: skip
    assert [d.num_samples for d in seen["datasets"][0].datasets] == [6, 6]


def test_per_dataset_sequences_path_as_megatron_lm_writes_and_reads_it(data, tmp_path):
    """tools/build_sequences_per_dataset.py writes {prefix: [sequences, document boundaries]}
    for the prefixes the data flags name, the counts megatron-core's own index reader reads
    from each header, and megatron-core's reader given them (Megatron-LM's fast path, which
    skips the header) reads the same documents. pretrain_tst.py with the file trains the same
    run exactly; a stale file, a missing prefix or a malformed file is one line naming it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, _IndexReader

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from build_sequences_per_dataset import main as build_counts

    a, b = data
    out = str(tmp_path / "seq.json")
    counts = build_counts(["--train-data-path", a, "--valid-data-path", "0.5", b, "0.5", a,
                           "--per-dataset-sequences-path", out])  # fmt: skip
    with open(out) as f:
        assert json.load(f) == counts and list(counts) == [a, b]
    for prefix in (a, b):
        reader = _IndexReader(prefix + ".idx", False)
        assert counts[prefix] == [reader.sequence_count, reader.document_count] == [30, 31]
        fast = IndexedDataset(prefix, sequences_per_dataset=tuple(counts[prefix]), dtype_code=8)
        slow = IndexedDataset(prefix)
        assert all(np.array_equal(fast[i], slow[i]) for i in range(30))
    split = tmp_path / "splits.json"
    split.write_text(json.dumps({"train": [a], "valid": None, "test": [b]}))
    assert list(build_counts(["--per-split-data-args-path", str(split),
                              "--per-dataset-sequences-path", out])) == [a, b]  # fmt: skip

    argv = BASE + ["--train-data-path", a, "--valid-data-path", b]
    plain = _run(argv, str(tmp_path / "1.jsonl"))
    listed = _run(argv + ["--per-dataset-sequences-path", out], str(tmp_path / "2.jsonl"))
    assert listed["loss"] == plain["loss"] and listed["val"] == plain["val"]

    def refused(content) -> str:
        bad = tmp_path / "bad.json"
        bad.write_text(content if isinstance(content, str) else json.dumps(content))
        return _error(argv + ["--per-dataset-sequences-path", str(bad)])

    message = refused({a: [30, 31], b: [29, 30]})
    assert message.startswith(f"--per-dataset-sequences-path lists {b} with [29, 30] "), message
    assert "its .idx holds [30, 31]: the file is stale" in message
    assert "tools/build_sequences_per_dataset.py" in message
    assert f"does not list {b} " in refused({a: [30, 31]})
    assert "is not JSON (line 1" in refused("{")
    assert f"{a!r} must map to [sequences, document boundaries]" in refused({a: [30]})
    assert "holds a list, not an object" in refused([a])
    with pytest.warns(UserWarning, match="--mock-data reads none, ignoring it"):
        pretrain_tst.parse_args(BASE + ["--mock-data", "--per-dataset-sequences-path", out])
