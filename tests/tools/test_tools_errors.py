"""The tools' error handling and the preprocessor / reader defects of one issue:

- one ``TSTError`` hierarchy, caught in one place (``tools/_cli.run_main``) by every tool;
- preprocessing progress that follows the documents written (it sat at 0% until the end);
- empty input refused by the preprocessor, and an empty ``.bin/.idx`` by the reader and the
  trainer, each naming the file (training used to fail with "cannot mmap an empty file");
- a metrics file cut short by a kill: its last line is dropped with a note, a damaged line
  in the middle still refused;
- ``convert_to_hf.py --output`` inside the checkpoint folder refused.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from data_support import ROOT, load_tool, write_jsonl

from tst.data.indexed import AtomicIndexedWriter, IndexedDatasetError, check_indexed_dataset
from tst.errors import NonFiniteLossError, TSTError

TOOLS = os.path.join(ROOT, "tools")
_cli = load_tool("_cli")
run_metrics = load_tool("run_metrics")


def _tool(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(TOOLS, name), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _one_line_error(res: subprocess.CompletedProcess, tool: str) -> str:
    assert res.returncode == _cli.EXIT_ERROR, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"{tool}: error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


# ---------------------------------------------------------------- one hierarchy, one catcher


def test_error_classes_form_one_hierarchy():
    from tst.data.corpus import CorpusError
    from tst.data.preprocess import PreprocessError
    from tst.data.tokenizers import TokenizerFileError, TokenizerInputError
    from tst.export import ExportError

    for cls in (CorpusError, PreprocessError, TokenizerFileError, TokenizerInputError,
                IndexedDatasetError, ExportError, run_metrics.MetricsFileError):  # fmt: skip
        assert issubclass(cls, TSTError) and issubclass(cls, ValueError), cls
    # A failed run keeps its own family (pretrain_tst.py exits 3 for it, 2 for ValueError).
    assert issubclass(NonFiniteLossError, RuntimeError)
    assert not issubclass(NonFiniteLossError, ValueError)


def test_every_tool_ends_in_run_main():
    for name in sorted(os.listdir(TOOLS)):
        if not name.endswith(".py") or name.startswith("_") or name == "run_metrics.py":
            continue
        with open(os.path.join(TOOLS, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n)]
        assert len(mains) == 1, name
        body = ast.unparse(mains[0])
        assert "run_main(main" in body and "except" not in body, (name, body)


def test_run_main_exit_codes(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["some_tool.py"])

    def fails():
        raise TSTError("data/x.jsonl: something to fix\nsecond line")

    with pytest.raises(SystemExit) as info:
        _cli.run_main(fails)
    assert info.value.code == 1
    assert (
        capsys.readouterr().err
        == "some_tool.py: error: data/x.jsonl: something to fix second line\n"
    )

    class Other(RuntimeError):
        pass

    def other():
        raise Other("named by the tool")

    with pytest.raises(SystemExit) as info:
        _cli.run_main(other, Other)
    assert info.value.code == 1 and "named by the tool" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug keeps its traceback
        _cli.run_main(lambda: {}["missing"])
    with pytest.raises(SystemExit) as info:
        _cli.run_main(lambda: 7)
    assert info.value.code == 0


# ---------------------------------------------------------------- preprocessing progress


def _progress_lines(err: str) -> list[tuple[float, int]]:
    found = re.findall(r"^\[\s*([\d.]+)%\] ([\d,]+) docs", err, flags=re.M)
    return [(float(p), int(d.replace(",", ""))) for p, d in found]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_progress_follows_the_documents_written(tmp_path, capsys, workers):
    # 237 equal documents of ~4 KB on one line each, as the State of the Union corpus: the
    # progress sat at 0.0% until the file ended (the reader's position moved every 256 lines).
    docs = [f"address {i:03d} " + "word " * 800 for i in range(237)]
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), docs)
    preprocess_data = load_tool("preprocess_data")
    preprocess_data.main(["--input", corpus, "--output-prefix", str(tmp_path / "o"),
                          "--tokenizer-type", "ByteTokenizer", "--workers", workers,
                          "--chunk-records", "8", "--log-interval", "0"])  # fmt: skip
    lines = _progress_lines(capsys.readouterr().err)
    assert len(lines) >= 237 // 8 and lines[-1] == (100.0, 237)
    assert [p for p, _ in lines] == sorted(p for p, _ in lines)  # never goes back
    for percent, written in lines:
        # Equal documents: percent of bytes == percent of documents, to the line's rounding.
        assert abs(percent - 100 * written / 237) < 0.2, (percent, written)
    assert lines[0][0] > 0


def test_progress_of_a_gzip_file_moves_before_the_end(tmp_path, capsys):
    import gzip

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(2000)]  # compresses little
    docs = [" ".join(rng.choice(words, 3000)) for _ in range(100)]
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    load_tool("preprocess_data").main(["--input", str(path), "--output-prefix",
                                       str(tmp_path / "o"), "--tokenizer-type", "ByteTokenizer",
                                       "--chunk-records", "4", "--log-interval", "0"])  # fmt: skip
    lines = _progress_lines(capsys.readouterr().err)
    assert lines[-1] == (100.0, 100)
    midway = [p for p, d in lines if d == 48]
    assert midway and 10 < midway[0] < 90  # compressed bytes read: ahead, but moving


# ---------------------------------------------------------------- empty input and datasets


def test_empty_input_is_refused_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    prefix = str(tmp_path / "out")
    res = _tool("preprocess_data.py", "--input", str(empty), "--output-prefix", prefix,
                "--tokenizer-type", "ByteTokenizer")  # fmt: skip
    line = _one_line_error(res, "preprocess_data.py")
    assert f"--input {empty}: no documents to write: it holds no text" in line
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]  # nothing written


def test_input_of_only_empty_documents_is_refused(tmp_path):
    from tst.data.preprocess import PreprocessError

    preprocess_data = load_tool("preprocess_data")
    blank = write_jsonl(str(tmp_path / "blank.jsonl"), ["", "   ", "\n\t"])
    with pytest.raises(PreprocessError, match=r"blank.jsonl: no documents.*\(3 skipped\)"):
        preprocess_data.main(["--input", blank, "--output-prefix", str(tmp_path / "o"),
                              "--tokenizer-type", "ByteTokenizer"])  # fmt: skip
    # One JSON key with text, another always empty: that key's dataset would be empty.
    keys = tmp_path / "keys.jsonl"
    keys.write_text("".join(json.dumps({"text": f"t{i}", "title": ""}) + "\n" for i in range(3)))
    with pytest.raises(PreprocessError, match=r"no documents to write under json key 'title'"):
        preprocess_data.main(["--input", str(keys), "--output-prefix", str(tmp_path / "k"),
                              "--tokenizer-type", "ByteTokenizer", "--json-keys", "text",
                              "title"])  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["blank.jsonl", "keys.jsonl"]


def _write_empty_dataset(prefix: str, lengths: list[int]) -> None:
    with AtomicIndexedWriter(prefix, np.uint16) as w:
        for n in lengths:
            w.add_document(np.zeros(n, dtype=np.uint16))
        w.commit()


@pytest.mark.parametrize("lengths, held", [([], "no documents"), ([0, 0], "2 document")])
def test_empty_dataset_is_refused_naming_the_file(tmp_path, lengths, held):
    prefix = str(tmp_path / "empty_text_document")
    _write_empty_dataset(prefix, lengths)
    with pytest.raises(IndexedDatasetError, match=rf"{prefix}.bin / .idx is an empty dataset"
                       rf" \({held}.*tools/preprocess_data.py"):  # fmt: skip
        check_indexed_dataset(prefix)
    res = _tool("inspect_dataset.py", "--data-prefix", prefix)
    assert "is an empty dataset" in _one_line_error(res, "inspect_dataset.py")


def test_training_on_an_empty_dataset_names_it(tmp_path):
    import pretrain_tst

    prefix = str(tmp_path / "empty_text_document")
    _write_empty_dataset(prefix, [])
    tiny = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3",
            "--tokenizer-type", "ByteTokenizer", "--data-path", prefix]  # fmt: skip
    with pytest.raises(IndexedDatasetError, match=rf"{prefix}.bin / .idx is an empty dataset"):
        pretrain_tst.main(tiny)


# ---------------------------------------------------------------- metrics files


def _records(n: int) -> list[str]:
    out = [json.dumps({"phases": [{"name": "recovery", "start": 0}], "train_iters": n})]
    for it in range(1, n + 1):
        out.append(json.dumps({"iteration": it, "phase": "recovery", "loss": 5.0 - it / 10,
                               "loss_name": "lm", "elapsed_s": it, "raw_tokens": 64 * it}))  # fmt: skip
        out.append(json.dumps({"iteration": it, "val_loss": 5.1 - it / 10, "elapsed_s": it,
                               "raw_tokens": 64 * it, "note": "é"}, ensure_ascii=False))  # fmt: skip
    return out


@pytest.mark.parametrize("cut", [9, 20, -3])  # inside JSON, mid-way, inside the "é" bytes
def test_a_cut_last_line_is_dropped_with_a_note(tmp_path, capsys, cut):
    lines = _records(4)
    last = lines[-1].encode("utf-8")
    cut_at = last.index("é".encode()) + 1 if cut == -3 else cut  # half a UTF-8 character
    path = tmp_path / "m.jsonl"
    path.write_bytes(("\n".join(lines[:-1]) + "\n").encode() + last[:cut_at])
    run = run_metrics.read_metrics(str(path))
    assert len(run.train) == 4 and len(run.evals) == 3  # the cut evaluation is dropped
    assert run.meta == [json.loads(lines[0])]  # the run's header: no step
    err = capsys.readouterr().err
    assert f"{path}:9: dropped the last line, cut short" in err


def test_a_damaged_line_elsewhere_is_refused(tmp_path):
    lines = _records(3)
    path = tmp_path / "m.jsonl"
    damaged = lines[:2] + [lines[2][:15]] + lines[3:]
    path.write_text("\n".join(damaged) + "\n")
    with pytest.raises(run_metrics.MetricsFileError, match=rf"{path}:3: not a JSON record"):
        run_metrics.read_metrics(str(path))
    # A last line written whole (newline and all) that does not parse is damage, not a kill.
    path.write_text("\n".join(lines[:-1] + ["{not json"]) + "\n")
    with pytest.raises(run_metrics.MetricsFileError, match=rf"{path}:7: not a JSON record"):
        run_metrics.read_metrics(str(path))
    with pytest.raises(run_metrics.MetricsFileError, match="cannot read the metrics file"):
        run_metrics.read_metrics(str(tmp_path / "missing.jsonl"))


def test_compare_and_plot_read_a_killed_run(tmp_path, capsys):
    lines = _records(4)
    base, cut = tmp_path / "base.jsonl", tmp_path / "cut.jsonl"
    base.write_text("\n".join(lines) + "\n")
    cut.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    res = _tool("compare_runs.py", "--baseline", str(base), "--candidate", str(cut), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["candidate_iterations"] == 3
    assert f"{cut}:9: dropped the last line" in res.stderr
    plot_runs = load_tool("plot_runs")
    out = str(tmp_path / "p.png")
    assert plot_runs.main(["--runs", f"base={base}", f"cut={cut}", "--output", out]) == 0
    assert os.path.getsize(out) > 0 and "dropped the last line" in capsys.readouterr().err
    middle = tmp_path / "middle.jsonl"
    middle.write_text("\n".join(lines[:3] + ['{"iteration": 2, "val_'] + lines[3:]) + "\n")
    res = _tool("compare_runs.py", "--baseline", str(base), "--candidate", str(middle))
    assert f"{middle}:4: not a JSON record" in _one_line_error(res, "compare_runs.py")
    res = _tool("plot_runs.py", "--runs", f"m={middle}", "--output", out)
    assert f"{middle}:4: not a JSON record" in _one_line_error(res, "plot_runs.py")


# ---------------------------------------------------------------- export destination


def test_export_inside_the_checkpoint_is_refused(tmp_path):
    from tst.export import ExportError, refuse_output_inside_checkpoint

    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    for load, output in [(ckpt, ckpt), (ckpt, ckpt / "hf"), (ckpt, ckpt / "iter_0000003" / "x"),
                         (ckpt / "iter_0000003", ckpt / "hf"),
                         (ckpt / "iter_0000003", ckpt / "iter_0000003")]:  # fmt: skip
        with pytest.raises(ExportError, match="is inside the checkpoint folder"):
            refuse_output_inside_checkpoint(str(load), str(output))
    for output in (tmp_path / "ckpt_hf", tmp_path / "ckpt2", tmp_path / "hf"):
        refuse_output_inside_checkpoint(str(ckpt), str(output))  # beside it: fine
    res = _tool("convert_to_hf.py", "--load", str(ckpt), "--output", str(ckpt / "hf"))
    line = _one_line_error(res, "convert_to_hf.py")
    assert f"--output {ckpt / 'hf'} is inside the checkpoint folder {ckpt}" in line
    assert f"e.g. {ckpt}_hf" in line
    assert sorted(os.listdir(ckpt)) == ["iter_0000003"]  # nothing written there
