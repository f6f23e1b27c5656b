"""Runs that meet the unexpected: a killed run's metrics file, an empty validation split,
Ctrl-C, a full disk during a save, and an MFU peak measured under load.

One process, mock or tiny real data; each test names the behaviour a user relies on.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from flags import SMALL_GPT

import pretrain_tst
from tst.checkpointing import CheckpointError, latest_iteration
from tst.metrics import MetricsWriter, PeakRate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = [
    "--mock-data", "--vocab-size", "384", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--train-iters", "6", "--tst-bag-size", "2", "--tst-iters", "2", "--lr", "1e-2",
    "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--peak-tflops", "1",
    *SMALL_GPT,
]  # fmt: skip


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_leaves_a_metrics_file_the_tools_read(tmp_path, capsys):
    """A run killed mid-write leaves a cut last line and records past its checkpoint; the
    resumed run drops the cut line, moves those records aside, and the tools read the file.
    A stop at a --save-interval step saves it once (as Megatron-LM), not twice."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from run_metrics import read_metrics

    metrics, ckpt = tmp_path / "m.jsonl", str(tmp_path / "ckpt")
    argv = BASE + ["--metrics-file", str(metrics), "--save", ckpt]
    assert pretrain_tst.main(argv + ["--save-interval", "2", "--exit-interval", "4"]) == 0
    assert latest_iteration(ckpt) == 4
    saves = re.findall(r"saved checkpoint \S+ \(iteration (\d+)\)", capsys.readouterr().out)
    assert saves == ["2", "4"]
    # As if the run had gone on past its last checkpoint (iteration 4) and been killed
    # while writing: a record of iteration 5, then half a line.
    with open(metrics, "a") as f:
        f.write(json.dumps({"iteration": 5, "phase": "recovery", "loss": 9.9}) + "\n")
        f.write('{"iteration": 6, "phase": "recov')
    assert pretrain_tst.main(argv + ["--load", ckpt]) == 0
    records = _records(metrics)  # every line parses
    iterations = [r["iteration"] for r in records if "loss" in r]
    assert iterations == [1, 2, 3, 4, 5, 6]  # each once: the stale 5 moved out
    assert 9.9 not in [r["loss"] for r in records if "loss" in r]
    assert "9.9" in (tmp_path / "m.jsonl.superseded").read_text()
    run = read_metrics(str(metrics))
    assert run.switch_iteration == 2


def test_an_empty_validation_split_skips_evaluation_with_a_message(tmp_path, capsys):
    prefix = _tiny_dataset(tmp_path)
    argv = [a for a in BASE if a != "--mock-data"] + [
        "--data-path", prefix, "--split", "100,0,0", "--tokenizer-type", "NullTokenizer",
        "--metrics-file", str(tmp_path / "m.jsonl"),
    ]  # fmt: skip
    assert pretrain_tst.main(argv) == 0
    assert "evaluation is skipped" in capsys.readouterr().out
    assert not [r for r in _records(tmp_path / "m.jsonl") if "val_loss" in r]


def _tiny_dataset(tmp_path) -> str:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "tiny_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(60):
        builder.add_document(rng.integers(0, 380, 40).tolist(), [40])
    builder.finalize(prefix + ".idx")
    return prefix


def test_ctrl_c_saves_and_a_second_one_exits_at_once(tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = [a for a in BASE]
    argv[argv.index("--train-iters") + 1] = "100000"
    argv[argv.index("--tst-iters") + 1] = "2"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_tst.py"), *argv, "--save", str(ckpt),
           "--metrics-file", str(tmp_path / "m.jsonl")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _wait_for_lines(tmp_path / "m.jsonl", 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert b"stopping at iteration" in out and latest_iteration(str(ckpt)) >= 3
    # Twice: the second Ctrl-C ends the run at once, exit 130, the checkpoint untouched.
    saved = latest_iteration(str(ckpt))
    os.remove(tmp_path / "m.jsonl")
    proc = subprocess.Popen(cmd + ["--load", str(ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)  # fmt: skip
    _wait_for_lines(tmp_path / "m.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two at once would merge into one (standard signals don't queue)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and b"second Ctrl-C" in err
    assert latest_iteration(str(ckpt)) >= saved


def _wait_for_lines(path, n: int, timeout: float = 120.0) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= n:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not reach {n} lines")


def test_a_full_disk_during_a_save_is_named_and_cleaned_up(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    ckpt = str(tmp_path / "ckpt")
    argv = BASE + ["--save", ckpt, "--save-interval", "2"]
    real = dist_checkpointing.save
    calls = {"n": 0}

    def save(state, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save: the disk is full
            os.makedirs(path, exist_ok=True)
            open(os.path.join(path, "partial.distcp"), "w").close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save)
    with pytest.raises(CheckpointError, match=r"no space left on the device of .*ckpt") as error:
        pretrain_tst.main(argv)
    assert "the previous checkpoint is intact" in str(error.value)
    assert latest_iteration(ckpt) == 2
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "latest_checkpointed_iteration.txt",
                                        "run_manifest.json"]  # fmt: skip


@pytest.mark.parametrize(
    "error, cause, fix",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device",
         "free space or point --save elsewhere"),
        (PermissionError(errno.EACCES, "Permission denied"), "PermissionError",
         "writable for this user"),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "BrokenPipeError",
         "a checkpoint writer process ended early"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error",
         "check the file system of"),
        (RuntimeError("writer 3 failed"), "RuntimeError: writer 3 failed",
         "the error above is the writer's own"),
    ],
)  # fmt: skip
def test_a_failed_save_names_the_fix_for_its_cause(tmp_path, error, cause, fix):
    """Only a full disk is told to free space; a dead writer or a permission problem gets
    its own advice (the one message said "free space" for every cause)."""
    from tst.checkpointing import _save_failure

    message = _save_failure(str(tmp_path), str(tmp_path / "iter_0000004.tmp"), error)
    assert cause in message and fix in message, message
    assert "the previous checkpoint is intact" in message
    if "no space" not in cause:
        assert "free space" not in message, message


def test_mfu_never_reads_above_one_hundred_percent():
    peak = PeakRate(None, "cpu")
    measured = peak.value
    assert peak.mfu(measured * 0.5) == pytest.approx(0.5)
    # A faster window raises the peak: to the window's rate, or to a new measurement above
    # it (the first may have been taken while other processes shared the cores).
    assert peak.mfu(measured * 3) <= 1.0
    assert peak.value >= measured * 3 and "raised" in peak.describe()
    given = PeakRate(2.0, "cpu")
    assert given.mfu(1.0) == 0.5 and given.mfu(4.0) == 1.0


def test_the_cpu_peak_is_measured_once_per_process_and_only_raised(monkeypatch):
    """A process that trains again (a test world's ranks, an in-process restart) measured
    the GEMM peak at every run's start (a third of a small run's time); now once, each
    later measurement (a window beat it) keeping the better of the two."""
    from tst import metrics

    rates, calls = iter([1.0, 0.5, 3.0]), []

    def measure(sizes=(256, 512, 1024)):
        calls.append(sizes)
        return next(rates)

    monkeypatch.setattr(metrics, "measure_cpu_peak_tflops", measure)
    monkeypatch.setattr(metrics, "_MEASURED_PEAK", {})
    assert PeakRate(None, "cpu").value == 1.0 and PeakRate(None, "cpu").value == 1.0
    assert calls == [(256, 512, 1024)]
    assert metrics.cpu_peak_tflops(again=True) == 1.0  # measured 0.5 under load: kept 1.0
    assert metrics.cpu_peak_tflops(again=True) == 3.0 and PeakRate(None, "cpu").value == 3.0
    assert calls[1:] == [(512, 1024)] * 2


def test_writer_keeps_a_clean_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n{"itera')
    writer = MetricsWriter(True, str(path), None)
    writer.write({"iteration": 3}, "train")
    writer.close()
    assert [r["iteration"] for r in _records(path)] == [1, 2, 3]
