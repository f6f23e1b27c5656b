"""Training records: stdout, TensorBoard and a JSON-lines file, written by rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from tst.errors import InputError

_WANDB = "0.31.0"  # the version requirements.txt pins (tested in offline mode)

__all__ = [
    "MetricsWriter",
    "check_wandb",
    "cpu_peak_tflops",
    "flops_per_position",
    "git_hash",
    "library_versions",
    "measure_cpu_peak_tflops",
]


def flops_per_position(cfg, vocab_size: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) for one position of one sample.

    Forward: 2 FLOPs per active weight of the decoder layers' GEMMs (attention, dense or
    routed-expert MLPs with their top-k, shared experts, routers; from the dry run's
    closed-form count, so MLA shapes and --moe-layer-freq dense layers are counted as built),
    the output layer's ``2 h V`` (``vocab_size`` padded), and attention scores and values
    (``2 L heads (d_qk + d_v)`` per layer, the full square as Megatron-LM counts it). Each
    MTP depth adds its projection, layer, output layer and attention. Norms, biases and the
    bag average on the input (a gather, not a GEMM) are left out, so a superposition step
    costs what a recovery step costs. ``tests/unit/test_metrics_flops.py`` checks this against
    torch's FLOP counter on built models.
    """
    from tst.dry_run import parameter_counts

    m = cfg.model
    h, seq, heads = m.hidden_size, m.seq_length, m.num_attention_heads
    counts = parameter_counts(cfg, vocab_size)
    if cfg.mla.multi_latent_attention:
        a = cfg.mla
        head_dims = a.qk_head_dim + a.qk_pos_emb_head_dim + a.v_head_dim
    else:
        head_dims = 2 * m.resolved_kv_channels
    attention = 2 * seq * heads * head_dims  # per layer
    depths = cfg.mtp.mtp_num_layers or 0
    forward = (
        2 * counts["non_embedding_active"] + m.num_layers * attention + 2 * h * vocab_size
        + 2 * counts["mtp_active"] + depths * (attention + 2 * h * vocab_size)
    )  # fmt: skip
    return 3.0 * forward


def measure_cpu_peak_tflops(
    sizes=(256, 512, 1024), repeats: int = 2, seconds: float = 0.05
) -> float:
    """This machine's best fp32 GEMM rate (TFLOP/s) with torch's threads.

    The best of several sizes and repeats, so that it is an upper bound even when other
    processes share the cores at the moment it is measured (a rate measured under load
    made MFU read above 100%). :class:`PeakRate` raises it when a window beats it.
    """
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        for _ in range(repeats):
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                runs += 1
            best = max(best, 2 * size**3 * runs / (time.perf_counter() - start) / 1e12)
    return best


_MEASURED_PEAK: dict[int, float] = {}  # torch's CPU threads -> best GEMM rate seen


def cpu_peak_tflops(again: bool = False) -> float:
    """:func:`measure_cpu_peak_tflops`, measured once per process and thread count: a process
    that trains again (a test world, an in-process restart) reuses its best. ``again``
    measures once more (the two larger sizes) and keeps the better: a rate measured while
    other processes shared the cores is the lower one."""
    threads = torch.get_num_threads()
    best = _MEASURED_PEAK.get(threads)
    if best is None or again:
        rate = measure_cpu_peak_tflops(sizes=(512, 1024)) if again else measure_cpu_peak_tflops()
        best = _MEASURED_PEAK[threads] = max(best or 0.0, rate)
    return best


class PeakRate:
    """The peak MFU is measured against: given (--peak-tflops, 989 on CUDA), or measured on
    CPU (by the rank that logs); raised whenever a window runs faster, so that MFU never
    reads above 100%, and the log says so."""

    def __init__(self, given: float | None, device_type: str, measure: bool = True):
        if given:
            self.value, self.source = given, "--peak-tflops"
        elif device_type == "cuda":
            self.value, self.source = 989.0, "dense bf16 peak of an H100 / H200"
        else:
            self.value = cpu_peak_tflops() if measure else 1.0
            self.source = "measured fp32 GEMM, best of 3 sizes x 2 repeats"
        self.measured = not given and device_type != "cuda"

    def mfu(self, tflops: float) -> float:
        if tflops > self.value:
            again = cpu_peak_tflops(again=True) if self.measured else 0.0
            self.value = max(tflops, again)
            self.source += "; raised: a training window beat it"
        return tflops / self.value

    def describe(self) -> str:
        return f"MFU against a peak of {self.value:.3f} TFLOP/s per device ({self.source})"


class MetricsWriter:
    """Writes each record to stdout (formatted), JSON lines, TensorBoard and Weights & Biases
    (rank 0 only). Training scalars go to TensorBoard / W&B every ``tensorboard_interval``
    iterations (Megatron-LM's --tensorboard-log-interval), except the keys in
    ``tensorboard_skip`` (e.g. the loss scale under --no-log-loss-scale-to-tensorboard); the
    metrics file gets them all."""

    def __init__(
        self,
        enabled: bool,
        metrics_file: str | None,
        tensorboard_dir: str | None,
        tensorboard_interval: int = 1,
        wandb: dict | None = None,
        tensorboard_skip: frozenset[str] = frozenset(),
    ):
        self.enabled = enabled
        self.path = metrics_file
        self.interval = tensorboard_interval
        self.tensorboard_skip = tensorboard_skip  # record keys kept out of TensorBoard / W&B
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._drop_cut_line(metrics_file)
            self._file = open(metrics_file, "a", buffering=1)  # noqa: SIM115 (lives with the run)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
        if wandb and wandb.get("project"):
            self._wandb = _start_wandb(wandb)

    @property
    def tensorboard(self):
        """The TensorBoard ``SummaryWriter`` (rank 0 with --tensorboard-dir), else None."""
        return self._tb

    @property
    def wandb_module(self):
        """The ``wandb`` module while this writer's run is active (rank 0), else None."""
        if self._wandb is None:
            return None
        import wandb

        return wandb

    @staticmethod
    def _drop_cut_line(path: str) -> None:
        """A run killed mid-write leaves a last line without its newline: drop it."""
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            content = f.read()
            keep = content[: content.rfind(b"\n") + 1]
            f.seek(0)
            f.truncate(len(keep))
        print(f"{path}: dropped a cut last line (a run stopped while writing it)", flush=True)

    def resume_at(self, iteration: int) -> None:
        """Mark records past a resume point: the resumed run writes those iterations again.

        Records of iterations after ``iteration`` (written after the checkpoint, before the
        run stopped) are moved out to ``<file>.superseded`` so the file reads as one run;
        nothing is deleted.
        """
        if not self.enabled or not self.path or not os.path.isfile(self.path):
            return
        self._file.close()
        with open(self.path) as f:
            lines = f.readlines()
        keep, moved = [], []
        for line in lines:
            try:
                it = json.loads(line).get("iteration")
            except json.JSONDecodeError:
                it = None
            (moved if isinstance(it, int) and it > iteration else keep).append(line)
        if moved:
            with open(self.path + ".superseded", "a") as f:
                f.writelines(moved)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
            print(f"{self.path}: {len(moved)} records after iteration {iteration} (written "
                  f"after the checkpoint) moved to {self.path}.superseded", flush=True)  # fmt: skip
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115

    def write(self, record: dict, prefix: str) -> None:
        if not self.enabled:
            return
        if self._file:
            self._file.write(json.dumps(record) + "\n")
        step = record.get("iteration", 0)
        if prefix == "train" and step % self.interval:
            return
        scalars = {
            f"{prefix}/{key}": value for key, value in _flatten(record).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and key != "iteration" and key not in self.tensorboard_skip
        }  # fmt: skip
        if self._tb:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb and scalars:
            self._wandb.log(scalars, step=step)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def _flatten(record: dict, prefix: str = "") -> dict:
    """Nested records (the routing records: phase -> layer -> value) as ``a/b/c`` keys."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_wandb(project: str | None) -> None:
    """With ``--wandb-project``, refuse at start (before any process group) when the optional
    ``wandb`` package is missing, naming the fix."""
    if not project:
        return
    try:
        import wandb

        wandb.__version__  # noqa: B018 (runs the package where its import was deferred: tst.megatron_import)
    except ImportError:
        raise InputError(
            f"--wandb-project {project} needs the wandb package: pip install wandb=={_WANDB} "
            "(or drop the --wandb-* flags)"
        ) from None


def _start_wandb(options: dict):
    """A Weights & Biases run (offline when WANDB_MODE=offline, files under --wandb-save-dir);
    the package is optional (:func:`check_wandb`)."""
    check_wandb(options["project"])
    import wandb

    save_dir = options.get("save_dir")
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    return wandb.init(
        project=options["project"], name=options.get("name"), dir=save_dir,
        entity=options.get("entity"), config=options.get("config"),
    )  # fmt: skip


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
