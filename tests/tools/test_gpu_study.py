"""bench/gpu_study.sh end to end in its CPU dry mode (``DRY_RUN=1``): the GPU study's every
step at tiny sizes (corpus from installed packages' sources, tokenizer, preprocessing,
gpu_check's dry run, calibration, baseline and TST arms at equal steps, the summary and the
archive), plus ``--dry-run`` of the GPU-sized command lines (a ~110M model).

The study runs bench/gpu_check.sh in its dry mode (``DRY_RUN=1``: the script's own
``pretrain_tst.py`` command lines with ``--dry-run``, the model built on the meta device, no
GPU, no data, for the bf16 run and the FP8 one); its log in the archive is checked here too,
so the check's command lines are tested without a second run of their own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(script: str, tmp_path, timeout: int):
    """bench/SCRIPT in its CPU dry mode into tmp_path/out: (the output folder, the log)."""
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, WORK=str(tmp_path / "work"))
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / script), str(out)],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    return out, log


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return _dry_run("gpu_study.sh", tmp_path_factory.mktemp("gpu_study"), 900)


def test_gpu_study_dry_run_end_to_end(study):
    out, log = study
    assert sorted(os.listdir(out)) == ["results.tar.gz", "study.log", "summary.json", "summary.md"]
    assert "== done in" in (out / "study.log").read_text()

    # Data made on the spot, with the project's own tools.
    assert re.search(r"corpus: [\d,]+ files", log)
    assert "trained a huggingface bpe tokenizer" in log
    assert re.search(r"done in [\d.]+ s: [\d,]+ documents", log)  # the preprocessor's summary

    summary = json.loads((out / "summary.json").read_text())
    arms = summary["arms"]
    assert set(arms) == {"calibration", "baseline", "tst", "multistage"}
    base, tst, multi = arms["baseline"], arms["tst"], arms["multistage"]
    assert base["steps"] == tst["steps"] == multi["steps"] == 10  # equal steps
    # --tst-schedule 6:0.15,3:0.15,1 of 10 steps: 2 steps of bag 6, 1 of bag 3, 7 plain.
    assert multi["raw_tokens"] == base["raw_tokens"] * (2 * 6 + 1 * 3 + 7) // 10
    assert "Multi-stage --tst-schedule 6:0.15,3:0.15,1" in "\n".join(summary["notes"])
    assert tst["raw_tokens"] > 2 * base["raw_tokens"]  # bag 6 for 30% of the steps
    assert set(tst["phases"]) == {"superposition", "recovery"} and set(base["phases"]) == {
        "recovery"
    }
    for arm in (base, tst):
        assert arm["final_eval_iteration"] == 10 and 0 < arm["final_val_loss"] < 10
        assert arm["peak_memory"]["host_max_rss_gib"] > 0.1
        for phase in arm["phases"].values():
            assert phase["positions_per_s"] > 0 and phase["mfu"] >= 0
    table = (out / "summary.md").read_text()
    assert "| arm | steps | raw tokens | final held-out next-token loss" in table
    assert "at equal steps" in table and "3,000 steps at context 2,048" in table

    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    for name in ("calibration", "baseline", "tst", "multistage"):
        for suffix in (".jsonl", ".memory.json", ".wall"):
            assert f"results/metrics/{name}{suffix}" in names
        assert f"results/logs/{name}.log" in names
    assert {"results/logs/gpu_check.log", "results/tokenizer.json"} <= names

    # The GPU arms' command lines pass --dry-run: a ~110M-parameter model, both phases.
    total = float(re.search(r"parameters \(built on the meta device\): total ([\d.]+)M", log)[1])
    assert 90 <= total <= 130, total
    assert re.search(r"superposition\s+0\.\.89\s+6", log)  # r 0.3 of 300 steps, bag 6
    # The multi-stage arm's: bag 6 for 0.15 of 300 steps, then bag 3 for 0.15.
    assert re.search(r"0 superposition\s+0\.\.44\s+6", log)
    assert re.search(r"1 superposition\s+45\.\.89\s+3", log)


def test_gpu_check_dry_run(study):
    """bench/gpu_check.sh's dry run inside the study: the GPU command lines are accepted as
    they stand (a ~350M model, bf16 and FP8, both phases, the optimizer offload), and a dry
    run writes nothing."""
    out, _ = study
    with tarfile.open(out / "results.tar.gz") as tar:
        check = tar.extractfile("results/logs/gpu_check.log").read().decode()
        written = [m.name for m in tar.getmembers()
                   if m.name.startswith("results/gpu_check/") and m.isfile()]  # fmt: skip
    assert "gpu_check failed" not in (out / "study.log").read_text(), check
    assert "== bf16 (dry run)" in check and "== fp8 (dry run)" in check, check
    total = float(re.search(r"total ([\d.]+)M", check).group(1))
    assert 330 <= total <= 400, f"the check wants a ~350M model, got {total}M"
    assert "superposition" in check and "recovery" in check
    assert "bf16 + FP8 (hybrid" in check
    # The optimizer offload arm against the distributed optimizer: its Adam state in host memory.
    assert "== dist_opt (dry run)" in check and "== offload (dry run)" in check, check
    assert "--optimizer-cpu-offload: 100% of Adam's state in host memory" in check, check
    # Fine-grained activation offloading against the same run without it.
    assert "== act_offload (dry run)" in check, check
    assert "activations offloaded to host: attn_norm, qkv_linear, core_attn" in check, check
    # The document mask against the same run without it.
    assert "== doc_mask (dry run)" in check, check
    assert "within each document (--reset-attention-mask)" in check, check
    assert written == [], f"a dry run writes nothing: {written}"


def test_gpu_mode_without_a_gpu_stops_at_the_device_check_and_says_so(tmp_path):
    """The GPU mode (no DRY_RUN) on a machine without CUDA gets through its set-up, writes
    study.log and stops at the device check with that reason: no silent exit before any
    output (a `[[ ]] && echo` in an assignment once ended the script under `set -e`)."""
    out = tmp_path / "study"
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "WORK")}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_study.sh"), str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    assert "work /tmp/tst_gpu_study," in log and "dry run 0" in log
    assert "no CUDA device" in log
    assert "== gpu_study:" in (out / "study.log").read_text()


def _profile_summary():
    sys.path.insert(0, str(ROOT / "bench"))
    import profile_summary

    return profile_summary


def test_profile_summary_sums_gpu_kernels_by_name_and_kind(tmp_path):
    """A hand-made CUDA trace of 2 steps: kernels summed by name and kind, per step; the span
    runs from the first kernel's start to the last one's end; CPU ops are ignored once GPU
    kernels are there."""
    ps = _profile_summary()
    events = [
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 0, "dur": 600},
        {"ph": "X", "cat": "kernel", "name": "softmax_warp_forward<bf16>", "ts": 700, "dur": 200},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 1000, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 1500, "dur": 600},
        {"ph": "X", "cat": "kernel", "name": "vectorized_elementwise_kernel<8, add>", "ts": 3900, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 99999},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 0, "dur": 900},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 20, "dur": 10},
    ]  # fmt: skip
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = ps.summarise(str(path), steps=2, top=2)
    assert s["device"] == "cuda"
    assert s["busy_ms_per_step"] == pytest.approx(1.6 / 2)  # 1,600 us busy over 2 steps
    assert s["span_ms_per_step"] == pytest.approx(4.0 / 2)
    assert {k: round(v["share"], 6) for k, v in s["kinds"].items()} == {
        "matmul": 0.75, "attention": 0.125, "memory": 0.0625, "elementwise": 0.0625}  # fmt: skip
    assert [(t["name"], t["calls_per_step"]) for t in s["top"]] == [
        ("nvjet_sm90_tst_256x128", 1.0), ("softmax_warp_forward<bf16>", 0.5)]  # fmt: skip
    # The host's CUDA runtime calls, busiest first.
    assert [(r["name"], r["ms_per_step"], r["calls_per_step"]) for r in s["cuda_runtime"]] == [
        ("cudaStreamSynchronize", 0.45, 0.5), ("cudaLaunchKernel", 0.01, 1.0)]  # fmt: skip
    table = ps.render(s, "recovery")
    assert "| matmul | 0.60 | 75.0% |" in table and "40% busy" in table
    assert "| `cudaStreamSynchronize` | 0.45 | 0.5 |" in table
    # A trace with neither kernels nor aten:: ops is an error naming the cause.
    path.write_text(json.dumps({"traceEvents": [{"ph": "i", "name": "marker", "ts": 0}]}))
    assert ps.main([str(path), "--steps", "2"]) == 1


def test_profile_summary_splits_host_time_and_gpu_idle_by_the_trainers_ranges(tmp_path):
    """One step by hand, in microseconds: the trainer's ranges cover [0, 100) reading data,
    [100, 700) forward-backward, [700, 800) the optimizer; [800, 1000) lies outside them.
    Kernels run [150, 400) and [380, 650) (overlapping streams: busy [150, 650)) and
    [720, 780). GPU idle: [0, 150) (100 in read data, 50 in forward-backward), [650, 720)
    (50 forward-backward, 20 optimizer), [780, 1000) (20 optimizer, 200 outside). An
    aten::copy_ over [60, 130) waits 70 of them; aten::item over [850, 900) 50."""
    ps = _profile_summary()

    def x(cat, name, ts, dur, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [
        x("user_annotation", "tst: read data", 0, 100),
        x("user_annotation", "tst: forward-backward", 100, 600),
        x("user_annotation", "tst: optimizer", 700, 100),
        x("user_annotation", "ProfilerStep#5", 0, 1000),  # not the trainer's: ignored
        x("kernel", "nvjet_gemm", 150, 250, tid=7), x("kernel", "softmax", 380, 270, tid=8),
        x("kernel", "multi_tensor_adam", 720, 60, tid=7),
        x("cpu_op", "aten::copy_", 60, 70), x("cpu_op", "aten::item", 850, 50),
        x("cpu_op", "aten::_local_scalar_dense", 860, 30),  # inside aten::item: not counted
    ]  # fmt: skip
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = ps.summarise(str(path), steps=1)
    assert s["window_ms_per_step"] == pytest.approx(1.0)
    assert s["gpu_idle_ms_per_step"] == pytest.approx(0.44)
    got = {r["name"]: (round(r["host_ms_per_step"], 6), round(r["gpu_idle_ms_per_step"], 6))
           for r in s["regions"]}  # fmt: skip
    assert got == {"forward-backward": (0.6, 0.1), ps.OUTSIDE: (0.2, 0.2),
                   "read data": (0.1, 0.1), "optimizer": (0.1, 0.04)}  # fmt: skip
    assert [r["name"] for r in s["regions"]][0] == "forward-backward"  # most host time first
    assert [(o["name"], round(o["ms_per_step"], 6)) for o in s["idle_ops"]] == [
        ("aten::copy_", 0.07), ("aten::item", 0.05)]  # fmt: skip
    table = ps.render(s, "superposition")
    assert "| read data | 0.10 | 0.10 |" in table and "the GPU idle 0.4 ms of it" in table
    assert "| `aten::copy_` | 0.07 |" in table
    # A trace without the trainer's ranges (an older trainer's) has no such tables.
    path.write_text(json.dumps({"traceEvents": events[3:]}))
    s = ps.summarise(str(path), steps=1)
    assert "regions" not in s and "trainer's ranges" not in ps.render(s)


def test_profile_summary_on_cpu_counts_only_outermost_aten_ops(tmp_path):
    """On CPU the nested aten:: ops (aten::linear inside a module, aten::mm inside it) are
    counted once, through the outermost op, per thread."""
    ps = _profile_summary()
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 10, "dur": 80, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 150, "dur": 50, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mul", "ts": 20, "dur": 30, "tid": 2},
        {"ph": "X", "cat": "python_function", "name": "forward", "ts": 0, "dur": 500, "tid": 1},
    ]  # fmt: skip
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = ps.summarise(str(path), steps=1)
    assert s["device"] == "cpu"
    assert sorted((t["name"], t["ms_per_step"]) for t in s["top"]) == [
        ("aten::add", 0.05), ("aten::linear", 0.1), ("aten::mul", 0.03)]  # fmt: skip


def test_gpu_profile_dry_run_profiles_both_phases_and_both_attentions(tmp_path):
    """bench/gpu_profile.sh in its CPU dry mode: the recovery phase with megatron-core's
    unfused attention and with the fused one, the superposition phase with the fused one;
    each run's --profile trace of steps [3, 5) summed (the dry mode's; [5, 7) on the GPU),
    and the steady step times compared."""
    out, _ = _dry_run("gpu_profile.sh", tmp_path, 600)
    text = (out / "profile.md").read_text()
    for label in ("recovery_unfused (bag 1, --attention-backend unfused)",
                  "recovery (bag 1, --attention-backend flash)",
                  "superposition (bag 6, --attention-backend flash)"):  # fmt: skip
        assert f"{label}: outermost aten:: operators (CPU)" in text
    for name in ("recovery_unfused", "recovery", "superposition"):
        s = json.loads((out / f"profile_{name}.json").read_text())
        assert s["steps"] == 2 and 0 < s["busy_ms_per_step"] <= s["span_ms_per_step"]
        assert sum(k["share"] for k in s["kinds"].values()) == pytest.approx(1.0)
        assert "matmul" in s["kinds"]
        assert re.search(rf"\| {name} \| [\d.]+ \| [\d.]+x \|", text)
        # The trainer's ranges split each profiled step's host time (on CPU the whole of it):
        # they and the work between steps add up to the window.
        regions = {r["name"]: r["host_ms_per_step"] for r in s["regions"]}
        assert {"read data", "forward-backward", "loss and checks", "optimizer"} <= set(regions)
        assert regions["forward-backward"] == max(regions.values())
        assert sum(regions.values()) == pytest.approx(s["window_ms_per_step"], rel=1e-6)
    # The fused attention's trace has torch's SDPA, the unfused one's megatron-core's softmax.
    fused = json.loads((out / "profile_recovery.json").read_text())
    unfused = json.loads((out / "profile_recovery_unfused.json").read_text())
    assert any("scaled_dot_product" in t["name"] for t in fused["top"])
    assert not any("scaled_dot_product" in t["name"] for t in unfused["top"])
    # Every profiled step of the superposition run is a superposition step.
    assert re.search(r"iter +5/6 \| superposition", (out / "superposition.log").read_text())
    assert "profile_rank0_steps3-5.json" in (out / "superposition.log").read_text()


def test_step_times_compare_one_step_windows_in_the_range(tmp_path):
    ps = _profile_summary()
    paths = []
    for name, per_step in (("base", 2.0), ("fast", 0.5)):
        records = [{"phases": []}]  # the header record holds no timing
        elapsed = 0.0
        for i in range(1, 9):
            elapsed += 30.0 if i == 1 else per_step * (3 if i == 6 else 1)  # start-up; a slow step
            records.append({"iteration": i, "elapsed_s": elapsed, "positions_per_s": 1.0})
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records))
        paths.append(str(path))
    assert ps.steady_step_seconds(paths[0], 1, 8) == pytest.approx(2.0)  # median past the slow one
    assert ps.steady_step_seconds(paths[0], 5, 6) == pytest.approx(6.0)  # only (5, 6]
    table = ps.render_step_times(paths, 1, 8)
    assert "| base | 2.000 | 1.00x |" in table and "| fast | 0.500 | 4.00x |" in table
    with pytest.raises(ValueError, match="no one-step logging window"):
        ps.steady_step_seconds(paths[0], 9, 12)


def test_megatron_wheel_helper_finds_the_install_or_names_the_missing_wheel(tmp_path):
    """bench/megatron_wheel.sh (sourced by the three device scripts): with megatron-core
    installed it does nothing; without it (a Python that sees no site-packages) and no
    wheel, it fails naming the folder it looked in."""
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    script = "source bench/megatron_wheel.sh && ensure_megatron_core && echo found"
    for python, wheels, rc, said in ((sys.executable, "/nonexistent", 0, "found"),
                                     (str(bare), str(tmp_path / "no-wheels"), 1, "no wheel is in")):  # fmt: skip
        result = subprocess.run(
            ["bash", "-c", script], env=dict(os.environ, PYTHON=python, WHEELS=wheels),
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == rc, result.stderr
        assert said in result.stdout + result.stderr
        if rc:
            assert str(tmp_path / "no-wheels") in result.stderr


def test_dry_runs_checks_every_queued_command_line_and_fails_on_any(tmp_path, capsys):
    """bench/dry_runs.py (the GPU scripts' dry modes, one process for all their command
    lines): every queued run is tried in order, its last N output lines kept; a bad command
    line fails the whole with the trainer's own message, after the others ran; a malformed
    queue file is an error naming it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dry_runs

    small = ["--dry-run", "--num-layers", "2", "--num-attention-heads", "4", "--seq-length",
             "16", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3",
             "--mock-data", "--vocab-size", "512"]  # fmt: skip
    queue = tmp_path / "queue"
    queue.mkdir()
    runs = [("== bad", "0", ["--hidden-size", "30"]), ("== good", "1", ["--hidden-size", "32"])]
    for i, (header, keep, extra) in enumerate(runs):
        (queue / f"{i:02d}").write_bytes("".join(f"{a}\0" for a in [header, keep, *small, *extra])
                                         .encode())  # fmt: skip
    assert dry_runs.main([str(queue)]) == 1
    out, err = capsys.readouterr()
    assert out.index("== bad") < out.index("== good")
    assert out.split("== good\n")[1].startswith("raw tokens read:")  # its last line only
    assert "--hidden-size 30 must be divisible by --num-attention-heads 4" in err
    assert "dry run failed (exit 2): == bad" in err and "== good" not in err
    (queue / "00").unlink()
    assert dry_runs.main([str(queue)]) == 0
    (queue / "02").write_bytes(b"no fields")
    with pytest.raises(ValueError, match="02: not"):
        dry_runs.main([str(queue)])
