#!/usr/bin/env python
"""Memory of activation recomputation and step time of communication overlap, in one run.

    python bench/bench_megatron_features.py [--iters 6] [--repeats 2] [--sections 1 2 3 4 5 6 7]

1. Peak memory (the process's peak RSS, from the kernel) of a model whose activations
   dominate (16 layers, hidden 256, 2,048 positions, micro-batch 4, a 512-entry vocabulary),
   with full (uniform, 1 layer per group; block, all layers) and selective recomputation vs
   none, both phases (bag 4, switch mid-run). Each configuration is a fresh process; the
   table gives the peak and its ratio to no recomputation.
2. Step time at DP 2 (two gloo ranks on this machine) with and without
   ``--overlap-grad-reduce`` (small buckets, so reduction can start during the backward),
   and with the distributed optimizer with and without ``--overlap-param-gather``: median
   step time of the steps after the first two, ABBA-ordered repeats, ratio to the plain run.

3. PyTorch FSDP2 (``--use-torch-fsdp2``) at DP 2 against DDP and the distributed
   optimizer, on a model whose weights dominate (16 layers, hidden 512, 64 positions; untied
   embeddings, fp32): median step time (ABBA repeats) and the peak RSS of the largest
   process of the run (a rank; glibc's mmap threshold fixed at 1 MiB, see
   :func:`step_times_and_peak`), with ratios to DDP.
4. Optimizer CPU offload (``--optimizer-cpu-offload``, megatron-core's hybrid optimizer) on
   the same model in bf16 against the distributed optimizer it wraps: all offloaded, half,
   and half with one optimizer per parameter (``--overlap-cpu-optimizer-d2h-h2d``). On a
   CPU-only machine nothing leaves a GPU: the ratios are the machinery's own cost (the
   gradient and weight copies, torch's fused AdamW per part) and the host memory its copies
   take; the GPU memory it frees is the dry run's table.

5. The step-time cost of ``--log-max-attention-logit`` and ``--qk-clip`` (the largest logit
   per head read from the unfused attention's scores, reduced after each step; the clip's
   weight scaling) and of ``--fine-grained-activation-offloading`` of the five dense modules
   (every tensor: ``--min-offloaded-tensor-size 0``) on a model whose attention scores
   dominate (8 layers, hidden 256, 512 positions), against the same unfused attention
   without them, at DP 2. On CPU the offload's copies stay in one memory: its row is the
   machinery's cost, and its peak the host pool added.

6. The step-time cost of ``--reset-attention-mask`` (a ``[micro-batch, 1, L, L]`` document
   mask built per micro-batch and applied in every layer) on the same model, with
   megatron-core's unfused attention and with the fused (SDPA) local one (which must leave
   its causal kernel for a masked one), each against itself without the mask.

7. Context parallelism (``--context-parallel-size 2``: each of the two ranks holds half of
   every sequence; the local spec's CP attention all-gathers keys and values) against data
   parallelism at DP 2 (each rank whole sequences) at the same global batch, on a model
   whose sequence dominates (4 layers, hidden 256, 2,048 positions), both with the fused
   (SDPA) attention: step time and the peak RSS of the largest rank.

Run it with nothing else on the machine: two CPU cores shared with another process slow
torch down 10-40x and make the timings meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = [
    "--mock-data", "--vocab-size", "512", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--swiglu", "--lr", "1e-3", "--lr-decay-style", "constant",
    "--log-interval", "1", "--eval-iters", "0", "--tst-bag-size", "4", "--peak-tflops", "1",
]  # fmt: skip
MEMORY_MODEL = [
    "--num-layers", "16", "--hidden-size", "256", "--num-attention-heads", "4",
    "--seq-length", "2048", "--micro-batch-size", "4", "--global-batch-size", "4",
]  # fmt: skip
RECOMPUTE = {
    "none": [],
    "selective (core_attn)": ["--recompute-granularity", "selective"],
    "full, uniform, 1 layer": ["--recompute-granularity", "full", "--recompute-method",
                               "uniform", "--recompute-num-layers", "1"],
    "full, block, 16 layers": ["--recompute-granularity", "full", "--recompute-method", "block",
                               "--recompute-num-layers", "16"],
}  # fmt: skip
TIME_MODEL = [
    "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
    "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "16",
]  # fmt: skip
OVERLAP = {
    "DDP": [],
    "DDP + overlap-grad-reduce": ["--overlap-grad-reduce", "--ddp-bucket-size", "100000"],
    "distributed optimizer": ["--use-distributed-optimizer"],
    "dist. opt. + overlap grad + param": [
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--ddp-bucket-size", "100000",
    ],
}  # fmt: skip


def _clean_env() -> dict:
    keep = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    return {**keep, "OMP_NUM_THREADS": keep.get("OMP_NUM_THREADS", "2")}


def peak_rss_mib(argv: list[str]) -> float:
    """Run pretrain_tst.py in a fresh process; its peak resident memory (MiB)."""
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_tst.py"), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_clean_env(), cwd=ROOT)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # Linux reports KiB


SHARDING_MODEL = [
    "--num-layers", "16", "--hidden-size", "512", "--num-attention-heads", "8",
    "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--untie-embeddings-and-output-weights", "--no-gradient-accumulation-fusion",
]  # fmt: skip
SHARDING = {
    "DDP": [],
    "distributed optimizer": ["--use-distributed-optimizer"],
    "FSDP2": ["--use-torch-fsdp2"],
    "FSDP2, no reshard after forward": ["--use-torch-fsdp2",
                                        "--torch-fsdp2-no-reshard-after-forward"],
}  # fmt: skip


OFFLOAD = {
    "distributed optimizer": ["--use-distributed-optimizer"],
    "offload, all": ["--use-distributed-optimizer", "--use-precision-aware-optimizer",
                     "--optimizer-cpu-offload"],
    "offload, half": ["--use-distributed-optimizer", "--use-precision-aware-optimizer",
                      "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"],
    "offload, half, d2h-h2d overlap": [
        "--use-distributed-optimizer", "--use-precision-aware-optimizer",
        "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5",
        "--overlap-cpu-optimizer-d2h-h2d",
    ],
}  # fmt: skip


LOGIT_MODEL = [
    "--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "8",
    "--seq-length", "512", "--micro-batch-size", "2", "--global-batch-size", "8",
]  # fmt: skip
_UNFUSED = ["--attention-backend", "unfused"]
LOGITS = {
    "unfused attention": _UNFUSED,
    "+ log-max-attention-logit": [*_UNFUSED, "--log-max-attention-logit"],
    "+ qk-clip (threshold 100)": [*_UNFUSED, "--qk-clip"],
    "+ activation offload, 5 modules": [
        *_UNFUSED, "--fine-grained-activation-offloading", "--min-offloaded-tensor-size", "0",
        "--offload-modules", "attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm",
    ],
}  # fmt: skip


DOC_MASK = {
    "unfused attention": _UNFUSED,
    "+ reset-attention-mask": [*_UNFUSED, "--reset-attention-mask"],
    "SDPA attention": ["--attention-backend", "flash"],
    "SDPA + reset-attention-mask": ["--attention-backend", "flash", "--reset-attention-mask"],
}  # fmt: skip


CP_MODEL = [
    "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
    "--seq-length", "2048", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--attention-backend", "flash",
]  # fmt: skip
CONTEXT = {
    "DP 2": [],
    "CP 2": ["--context-parallel-size", "2"],
}


def step_times_and_peak(argv: list[str], skip: int = 2,
                        memory: bool = False) -> tuple[list[float], float]:  # fmt: skip
    """Seconds per step of a 2-rank torchrun run (rank 0's log), the first ``skip`` dropped,
    and the peak RSS (MiB) of the run's largest process; ``memory``: with glibc's mmap
    threshold fixed (for the peak, not the times)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", os.path.join(ROOT, "pretrain_tst.py"), *argv,
               "--metrics-file", metrics]  # fmt: skip
        # glibc keeps freed blocks below its (self-raising) mmap threshold in its arenas, and
        # FSDP2 allocates and frees each layer's gathered weights and gradients at every
        # micro-batch: RSS then counts memory that is free (measured: FSDP2 1.86x DDP's peak
        # by default, 0.77x with the threshold fixed). A fixed 1 MiB threshold returns large
        # blocks to the system when freed, for every row alike; it also makes each such
        # allocation a fresh mapping (page faults), so the times come from runs without it.
        env = {**_clean_env(), "OMP_NUM_THREADS": "1"}
        if memory:
            env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)  # fmt: skip
        # torchrun waits for its ranks, so its rusage holds their peak (the largest).
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
        with open(metrics) as f:
            records = [json.loads(line) for line in f]
    seq = int(argv[argv.index("--seq-length") + 1])
    times = [r["batch_size"] * seq / r["positions_per_s"] for r in records
             if "positions_per_s" in r]  # fmt: skip
    return times[skip:], usage.ru_maxrss / 1024


def step_times(argv: list[str], skip: int = 2) -> list[float]:
    """Seconds per step of a 2-rank torchrun run (rank 0's log), the first ``skip`` dropped."""
    return step_times_and_peak(argv, skip)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=6, help="steps per memory run")
    parser.add_argument("--time-iters", type=int, default=12, help="steps per timing run")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA repeats of the timings")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7],
                        help="which parts to run (1 recomputation, 2 overlap, 3 FSDP2, "
                        "4 optimizer offload, 5 attention logits and activation offload, "
                        "6 document mask, 7 context parallelism)")  # fmt: skip
    args = parser.parse_args(argv)
    if 1 in args.sections:
        _recomputation(args)
    if 2 in args.sections:
        _overlap(args)
    if 3 in args.sections:
        _sharding(args)
    if 4 in args.sections:
        _compare("optimizer offload at DP 2 (gloo, 2 ranks), 16L h512 L64, bf16", OFFLOAD,
                 [*SHARDING_MODEL, "--bf16"], args)  # fmt: skip
    if 5 in args.sections:
        _compare("attention logits and activation offload at DP 2 (gloo, 2 ranks), 8L h256 "
                 "L512, fp32", LOGITS, LOGIT_MODEL, args)  # fmt: skip
    if 6 in args.sections:
        _compare("document mask at DP 2 (gloo, 2 ranks), 8L h256 L512, fp32", DOC_MASK,
                 LOGIT_MODEL, args)  # fmt: skip
    if 7 in args.sections:
        _compare("context parallelism vs data parallelism (gloo, 2 ranks), 4L h256 L2048, "
                 "global batch 4, SDPA attention, fp32", CONTEXT, CP_MODEL, args)  # fmt: skip
    return 0


def _recomputation(args) -> None:
    mem_args = [*COMMON, *MEMORY_MODEL, "--train-iters", str(args.iters),
                "--tst-iters", str(args.iters // 2)]  # fmt: skip
    print("peak memory (RSS, MiB), 16L h256 L2048 mbs4, both phases:")
    peaks = {}
    for name, extra in RECOMPUTE.items():
        peaks[name] = peak_rss_mib(mem_args + extra)
        ratio = peaks[name] / peaks["none"]
        print(f"  {name:<26} {peaks[name]:>8.0f}  ({ratio:.2f} x none)", flush=True)


def _overlap(args) -> None:
    time_args = [*COMMON, *TIME_MODEL, "--train-iters", str(args.time_iters),
                 "--tst-iters", str(args.time_iters // 2)]  # fmt: skip
    print("step time at DP 2 (gloo, 2 ranks), median s/step:")
    samples: dict[str, list[float]] = {name: [] for name in OVERLAP}
    order = list(OVERLAP)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else reversed(order):  # ABBA
            samples[name] += step_times(time_args + OVERLAP[name])
    base = {"DDP": "DDP", "DDP + overlap-grad-reduce": "DDP",
            "distributed optimizer": "distributed optimizer",
            "dist. opt. + overlap grad + param": "distributed optimizer"}  # fmt: skip
    for name in OVERLAP:
        med = statistics.median(samples[name])
        ratio = med / statistics.median(samples[base[name]])
        print(f"  {name:<34} {med:.4f}  ({ratio:.3f} x {base[name]})", flush=True)


def _sharding(args) -> None:
    _compare("FSDP2 at DP 2 (gloo, 2 ranks), 16L h512 L64, fp32", SHARDING, SHARDING_MODEL, args)


def _compare(title: str, rows: dict[str, list[str]], model: list[str], args) -> None:
    """Median step time (ABBA repeats) and peak RSS of each row, with ratios to the first."""
    run_args = [*COMMON, *model, "--train-iters", str(args.time_iters),
                "--tst-iters", str(args.time_iters // 2)]  # fmt: skip
    print(f"{title}: median s/step, peak RSS (MiB):")
    times: dict[str, list[float]] = {name: [] for name in rows}
    peaks: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else reversed(order):  # ABBA
            times[name] += step_times_and_peak(run_args + rows[name])[0]
    for name in order:
        peaks[name].append(step_times_and_peak(run_args + rows[name], memory=True)[1])
    base = order[0]
    for name in rows:
        med, peak = statistics.median(times[name]), max(peaks[name])
        print(f"  {name:<32} {med:.4f}  ({med / statistics.median(times[base]):.3f} x {base})"
              f"   {peak:>7.0f}  ({peak / max(peaks[base]):.2f} x {base})", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
