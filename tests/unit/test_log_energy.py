"""--log-energy (Megatron-LM's): energy per iteration per GPU and power per GPU, and the log
window's clock, both without evaluations and checkpoint saves.

NVML needs a GPU (``bench/gpu_check.sh`` reads the real counter); here the trainer's clock
and the energy counter are driven by the run's own events: each training step takes 1 s at
300 W, each evaluation 50 s at 100 W and each save 20 s at 50 W. Megatron-LM stops its
interval timer and its energy monitor around evaluations and saves, so every logged window
must read exactly 300 J per iteration, 300 W, and a throughput of its positions over its
training seconds; counting the evaluation or the save would read 25x lower.
"""

from __future__ import annotations

import json
import time
import types

import pytest
from flags import SMALL_GPT

import pretrain_tst
import tst.energy
import tst.trainer
from tst.energy import EnergyMeter

BASE = [
    "--mock-data", "--vocab-size", "384", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "6", "--tst-bag-size", "2", "--tst-iters", "2",
    "--lr", "1e-3", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
    "--peak-tflops", "1", "--num-workers", "0", *SMALL_GPT,
]  # fmt: skip


def test_meter_counts_only_unpaused_spans():
    counter = [1_000]
    meter = EnergyMeter(lambda: counter[0])
    meter.resume()
    counter[0] += 70
    meter.pause()
    counter[0] += 1_000  # paused: not counted
    meter.pause()  # a second pause changes nothing
    meter.resume()
    counter[0] += 30
    assert meter.lap_mj() == 100
    counter[0] += 5
    assert meter.lap_mj() == 5 and meter.lap_mj() == 0


def test_log_energy_and_throughput_leave_out_evaluations_and_saves(tmp_path, monkeypatch):
    clock = {"s": 1000.0, "mj": 0}

    def spend(seconds: float, watts: float) -> None:
        clock["s"] += seconds
        clock["mj"] += round(seconds * watts * 1000)

    fake_time = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    fake_time.time = lambda: clock["s"]
    monkeypatch.setattr(tst.trainer, "time", fake_time)
    monkeypatch.setattr(tst.energy, "nvml_energy_reader", lambda device: lambda: clock["mj"])
    monkeypatch.setattr(pretrain_tst, "check_launchable", lambda cfg: None)  # no GPU here
    for name, seconds, watts in (("train_step", 1, 300), ("_evaluate_valid_split", 50, 100),
                                 ("save", 20, 50)):  # fmt: skip
        original = getattr(tst.trainer.Trainer, name)

        def timed(self, *args, _original=original, _seconds=seconds, _watts=watts):
            out = _original(self, *args)
            spend(_seconds, _watts)
            return out

        monkeypatch.setattr(tst.trainer.Trainer, name, timed)
    metrics = tmp_path / "m.jsonl"
    argv = BASE + ["--log-energy", "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                   "--metrics-file", str(metrics)]  # fmt: skip
    assert pretrain_tst.main(argv) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if "energy_j_per_iter_per_device" in r]
    assert [r["iteration"] for r in train] == [2, 4, 6]
    assert sum("val_loss" in r for r in records) == 3
    for r in train:
        assert r["energy_j_per_iter_per_device"] == pytest.approx(300, rel=1e-9)
        assert r["power_w_per_device"] == pytest.approx(300, rel=1e-9)
        assert r["positions_per_s"] == pytest.approx(2 * 4 * 8 / 2, rel=1e-9)  # 2 steps, 2 s
    # Without the flag: no energy figures, the same clock.
    metrics.unlink()
    assert pretrain_tst.main(BASE + ["--metrics-file", str(metrics)]) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert not any("energy_j_per_iter_per_device" in r for r in records)
    assert [r["positions_per_s"] for r in records if "positions_per_s" in r] == [32.0] * 3


def test_log_energy_is_refused_without_a_gpu():
    with pytest.raises(ValueError) as info:
        pretrain_tst.main(BASE + ["--log-energy"])
    assert str(info.value) == ("--log-energy reads each GPU's energy counter (NVML), and this "
                               "machine has no GPU: drop it")  # fmt: skip
