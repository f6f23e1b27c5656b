"""Training records: stdout, TensorBoard and a JSON-lines file, written by rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

__all__ = [
    "MetricsWriter",
    "flops_per_position",
    "git_hash",
    "library_versions",
    "measure_cpu_peak_tflops",
]


def flops_per_position(cfg, vocab_size: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) for one position of one sample.

    Dense GEMMs: 2 x (active non-embedding parameters) per forward, plus the output layer and
    attention scores/values (4 x layers x hidden x seq). The bag average on the input is a
    gather, not a GEMM, so a superposition step costs what a recovery step costs.
    """
    m = cfg.model
    h, layers, seq = m.hidden_size, m.num_layers, m.seq_length
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    kv = h // heads * groups
    attn = h * (h + 2 * kv) + h * h
    ffn = m.resolved_ffn_hidden_size
    mlp_mult = 3 if m.swiglu else 2
    if m.num_experts:
        expert_ffn = m.moe_ffn_hidden_size or ffn
        mlp = mlp_mult * h * expert_ffn * m.moe_router_topk + h * m.num_experts
        if m.moe_shared_expert_intermediate_size:
            mlp += mlp_mult * h * m.moe_shared_expert_intermediate_size
    else:
        mlp = mlp_mult * h * ffn
    forward = 2 * layers * (attn + mlp) + 2 * h * vocab_size + 4 * layers * h * seq
    return 3.0 * forward


def measure_cpu_peak_tflops(size: int = 1024, seconds: float = 0.5) -> float:
    """This machine's fp32 GEMM rate (TFLOP/s) with torch's threads, measured now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e12


class MetricsWriter:
    """Writes each record to stdout (formatted), TensorBoard and JSON lines (rank 0 only)."""

    def __init__(self, enabled: bool, metrics_file: str | None, tensorboard_dir: str | None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._file = open(metrics_file, "a", buffering=1)  # noqa: SIM115 (lives with the run)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict, prefix: str) -> None:
        if not self.enabled:
            return
        if self._file:
            self._file.write(json.dumps(record) + "\n")
        if self._tb:
            step = record["iteration"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
            self._tb.flush()

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


def git_hash() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.check_output(
            ["git", "-C", root, "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def library_versions() -> dict:
    import megatron.core

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "megatron-core": getattr(megatron.core, "__version__", "unknown"),
    }
