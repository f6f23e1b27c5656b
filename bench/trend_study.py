#!/usr/bin/env python
"""The CPU trend of TST's gap to the baseline: with bytes, training length, model size.

    python bench/trend_study.py --dry                    # every part at tiny sizes (~1-2 min)
    python bench/trend_study.py --only bytes             # one part (estimates printed first)
    python bench/trend_study.py                          # all four parts, many hours
    python bench/trend_study.py --plots-dir docs         # also write the PNGs there

Four parts on the State of the Union corpus (``tools/get_corpus.py``; a 4,096-entry
SentencePiece tokenizer, or UTF-8 bytes), every arm a child ``pretrain_tst.py`` run:

========  ========================================================================================
bytes     a 1.9M byte-level model (seq 128): baseline vs TST bags 2 / 3 at r 0.2 / 0.3 and a
          multi-stage arm (--tst-schedule 4:0.1,2:0.2,1), at 1k, 3k and 10k steps, 3 seeds
length    a 0.95M tied 2-layer d 128 subword model: baseline vs TST bag 4 r 0.2 and the multi-stage
          arm at 3k, 10k and 20k steps, 2 seeds; baselines at 1.5x and 2x steps for iso-loss
size      baseline vs TST bag 4 r 0.2 at 1M, 3.3M, 10M and 23M parameters, 2 seeds, the same
          tokens per parameter (--size-tpp) unless an arm would pass --size-max-minutes
controls  the 0.95M shape untied, 3k steps, 2 seeds: TST bag 4 r 0.2 with the embedding and
          output layer re-initialised at the switch, only the input embedding, only the output
========  ========================================================================================

Each run writes ``WORK/PART/MODEL/stepsN/ARM/seedK/metrics.jsonl`` and a ``done`` marker; a
rerun skips finished runs and resumes interrupted ones from their last checkpoint (see
``bench/reproduce.py``, whose helpers this reuses). A finished run also gets a line in the
ledger (``--ledger``, default ``docs/trend_runs.jsonl``, kept in the repository): its flags,
held-out losses and final loss. A run the ledger holds with the same flags counts as finished
and is reported from the ledger, so a study spread over machines whose run folders do not
survive picks up where the last one stopped. Held-out loss is next-token loss on (nearly)
the whole validation split, the same tokens for every arm of a data kind. The gap is the arm's
final loss minus the baseline's at equal steps, paired by seed; iso-loss steps interpolate the
baselines at 1x / 1.5x / 2x in log-steps. Writes ``WORK/results.json``, ``WORK/summary.md`` and
``trend_{bytes,length,size}.png`` (gap vs steps, gap vs parameters; at the end and before the
LR decay).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import reproduce as rp  # noqa: E402
from run_metrics import read_metrics  # noqa: E402

PARTS = ("bytes", "length", "size", "controls")
SCHEDULE = "4:0.1,2:0.2,1"  # the multi-stage arm: bag 4, then bag 2, then next-token
# Step-time model behind the estimates (seconds per step = overhead + 6 N T / throughput):
# docs/RESULTS.md measured 0.15 s/step for the 3.3M quickstart model at T = 1,024 positions,
# i.e. about 0.15 TFLOP/s of 6NT-counted work on 2 cores once 15 ms of per-step overhead is off.
# Each child also pays about 10 s to start (importing megatron-core) and build its data.
EFFECTIVE_FLOPS, STEP_OVERHEAD_S, RUN_START_S = 0.15e12, 0.015, 10.0

_COMMON = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
           "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0"]  # fmt: skip


@dataclass(frozen=True)
class Model:
    data: str  # "sp" (subword) or "bytes"
    layers: int
    hidden: int
    ffn: int
    heads: int
    seq: int
    tied: bool = False
    lr: float = 3e-3

    def args(self) -> list[str]:
        return ["--num-layers", str(self.layers), "--hidden-size", str(self.hidden),
                "--ffn-hidden-size", str(self.ffn), "--num-attention-heads", str(self.heads),
                "--seq-length", str(self.seq), *_COMMON,
                *([] if self.tied else ["--untie-embeddings-and-output-weights"])]  # fmt: skip


MODELS = {
    "bytes1.9m": Model("bytes", 4, 192, 512, 6, 128),  # the quickstart shape on bytes
    "d128x2": Model("sp", 2, 128, 384, 4, 64, tied=True),  # 0.95M, the tied shape
    "d128x2u": Model("sp", 2, 128, 384, 4, 64),  # untied, for the switch controls
    "q3.3m": Model("sp", 4, 192, 512, 6, 64),  # examples/quickstart_cpu.sh's model
    "d320x6": Model("sp", 6, 320, 864, 5, 64, lr=2e-3),  # 10M
    "d448x8": Model("sp", 8, 448, 1216, 7, 64, lr=1.5e-3),  # 23M
}
DRY_MODELS = {
    "bytes1.9m": Model("bytes", 1, 32, 64, 2, 32),
    "d128x2": Model("sp", 1, 32, 64, 2, 16, tied=True),
    "d128x2u": Model("sp", 1, 32, 64, 2, 16),
    "d320x6": Model("sp", 2, 48, 96, 2, 16),  # the size part's second size
}


@dataclass(frozen=True)
class Arm:
    name: str
    flags: tuple[str, ...] = ()
    length: float = 1.0  # steps, as a multiple of the group's equal-steps length
    data_bag: int = 1  # units per big data sample (the lcm of the run's bag sizes)

    @property
    def baseline(self) -> bool:
        return self.name.startswith("baseline")


def _tst(bag: int, fraction: float, *control: str, name: str | None = None) -> Arm:
    flags = ("--tst-bag-size", str(bag), "--tst-fraction", str(fraction), *control)
    return Arm(name or f"tst_b{bag}_r{fraction}", flags, data_bag=bag)


BASE = Arm("baseline", ("--tst-bag-size", "1"))
MULTI = Arm("tst_multistage", ("--tst-schedule", SCHEDULE), data_bag=4)
ISO = [Arm("baseline_1.5x", BASE.flags, 1.5), Arm("baseline_2x", BASE.flags, 2.0)]
ARMS = {
    "bytes": [BASE, *[_tst(b, r) for b in (2, 3) for r in (0.2, 0.3)], MULTI],
    "length": [BASE, *ISO, _tst(4, 0.2), MULTI],
    "size": [BASE, _tst(4, 0.2)],
    "controls": [BASE, _tst(4, 0.2),
                 _tst(4, 0.2, "--tst-reinit-embeddings-at-switch", name="reinit_both"),
                 _tst(4, 0.2, "--tst-reinit-input-embedding-at-switch", name="reinit_input"),
                 _tst(4, 0.2, "--tst-reinit-output-layer-at-switch", name="reinit_output")],
}  # fmt: skip
DRY_ARMS = {  # one of each kind of arm, so every code path runs (the reinit flags: the plan's test)
    "bytes": [BASE, _tst(2, 0.3)],
    "length": [BASE, *ISO, MULTI],
    "size": ARMS["size"],
    "controls": [BASE, *ARMS["controls"][2:4]],
}


@dataclass(frozen=True)
class Run:
    part: str
    model: str
    steps: int  # the group's equal-steps length
    arm: Arm
    seed: int

    @property
    def iters(self) -> int:
        return round(self.arm.length * self.steps)

    def dir(self, work: str) -> str:
        return os.path.join(work, self.part, self.model, f"steps{self.steps}", self.arm.name,
                            f"seed{self.seed}")  # fmt: skip


# ---------------------------------------------------------------- the plan


def params(model: Model, vocab: int) -> int:
    """Exact parameter count (tst.dry_run.parameter_counts) at the padded vocabulary."""
    from tst.config import parse_args
    from tst.dry_run import parameter_counts

    padded = -(-vocab // 128) * 128
    cfg = parse_args([*model.args(), "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1",
                      "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                      str(vocab)])  # fmt: skip
    return parameter_counts(cfg, padded)["total"]


def step_seconds(n_params: int, model: Model, batch: int) -> float:
    """The estimate's seconds per training step (see EFFECTIVE_FLOPS)."""
    return STEP_OVERHEAD_S + 6 * n_params * batch * model.seq / EFFECTIVE_FLOPS


def plan_runs(a, models: dict, sizes: dict[str, int]) -> list[Run]:
    """Every run of the selected parts in the order they train: part, group (model and steps,
    as listed), seed, arm; so a partial study has whole groups of its first seeds."""
    runs = []
    for part in a.only:
        arms = (DRY_ARMS if a.dry else ARMS)[part]
        seeds = a.seeds or ([1] if a.dry else [1, 2, 3] if part == "bytes" else [1, 2])
        if part == "bytes":
            groups = [("bytes1.9m", s) for s in a.bytes_steps]
        elif part == "length":
            groups = [("d128x2", s) for s in a.length_steps]
        elif part == "controls":
            groups = [("d128x2u", a.controls_steps)]
        else:
            groups = []
            for name in ("d128x2", "q3.3m", "d320x6", "d448x8"):
                if name not in models:
                    continue
                per_step = a.batch * models[name].seq
                cap = a.size_max_minutes * 60 / step_seconds(sizes[name], models[name], a.batch)
                groups.append((name, max(20, round(min(a.size_tpp * sizes[name] / per_step,
                                                       cap)))))  # fmt: skip
        arms = [arm for arm in arms if not a.arms or arm.name in a.arms]
        runs += [Run(part, m, s, arm, seed) for m, s in groups for seed in seeds for arm in arms]
    return runs


def eval_iters(prefix: str, seq: int, batch: int, split: str, bags: list[int]) -> int:
    """Evaluation batches reading (nearly) all of the validation split under every data bag:
    a sample is ``bag * (seq + 1)`` tokens (as ``rp.validation_eval_iters``)."""
    import contextlib
    import io

    import inspect_dataset

    with contextlib.redirect_stdout(io.StringIO()):
        report = inspect_dataset.main(["--data-prefix", prefix, "--split", split,
                                       "--seq-length", str(seq), "--num-samples", "0"])  # fmt: skip
    tokens = report["splits"]["valid"]["tokens"]
    units = min((tokens - 1) // (b * (seq + 1)) * b for b in bags)
    if units < batch:
        raise SystemExit(f"{prefix}: the validation split holds {tokens} tokens, under one "
                         f"batch of {batch} x bag {max(bags)} x {seq + 1}: use more documents")  # fmt: skip
    return units // batch


def prepare_data(
    data_dir: str, python: str, docs: int | None, vocab: int, kinds=("sp", "bytes")
) -> dict[str, str]:
    """The corpus as JSONL (the first ``docs`` addresses when given), a SentencePiece
    tokenizer on it, and the .bin/.idx datasets of ``kinds`` (subword ``sp``, ``bytes``); each
    step skipped when its file is there."""
    os.makedirs(data_dir, exist_ok=True)
    jsonl, tok = os.path.join(data_dir, "sotu.jsonl"), os.path.join(data_dir, "tokenizer")
    out = {"sp": os.path.join(data_dir, "sp_text_document"),
           "bytes": os.path.join(data_dir, "bytes_text_document"), "tokenizer": tok + ".model"}  # fmt: skip
    pre = ["tools/preprocess_data.py", "--input", jsonl, "--append-eod", "--workers", "2"]
    steps = [(jsonl, ["tools/get_corpus.py", "--output", jsonl])]
    if "sp" in kinds:
        steps += [
            (tok + ".model", ["tools/train_tokenizer.py", "--input", jsonl, "--model-prefix", tok,
                              "--vocab-size", str(vocab)]),
            (out["sp"] + ".idx", [*pre, "--output-prefix", out["sp"][: -len("_text_document")],
                                  "--tokenizer-type", "SentencePieceTokenizer",
                                  "--tokenizer-model", tok + ".model"]),
        ]  # fmt: skip
    if "bytes" in kinds:
        steps.append((out["bytes"] + ".idx", [*pre, "--output-prefix",
                      out["bytes"][: -len("_text_document")], "--tokenizer-type", "ByteTokenizer"]))  # fmt: skip
    for target, step in steps:
        if os.path.exists(target):
            continue
        print(f"preparing the data: {step[0]}", flush=True)
        subprocess.run([python, *step], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        if docs and target == jsonl:
            with open(jsonl) as f:
                kept = [next(f) for _ in range(docs)]
            with open(jsonl, "w") as f:
                f.writelines(kept)
    return out


# ---------------------------------------------------------------- running


def save_interval(a, run: Run) -> int | None:
    """Checkpoints for resuming an interrupted run: 5 a run unless given (none in dry mode)."""
    return a.save_interval or (None if a.dry else max(1, run.iters // 5))


def decay_iters(iters: int) -> int:
    """The WSD schedule's decay: the last 10% of a run's ``iters`` steps."""
    return max(1, iters // 10)


def run_argv(a, run: Run, model: Model, data: dict, evals: dict[str, int]) -> list[str]:
    out = run.dir(a.work)
    tokenizer = (["--tokenizer-type", "ByteTokenizer"] if model.data == "bytes" else
                 ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                  data["tokenizer"]])  # fmt: skip
    argv = [
        *model.args(), *run.arm.flags, "--data-path", data[model.data], "--split", a.split,
        *tokenizer, "--data-cache-path", os.path.join(a.work, "index-cache"),
        "--micro-batch-size", str(a.batch), "--global-batch-size", str(a.batch),
        "--lr", str(model.lr), "--min-lr", str(model.lr / 10), "--lr-decay-style", "WSD",
        "--lr-wsd-decay-style", "linear", "--adam-beta2", "0.95", "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--train-iters", str(run.iters), "--seed", str(run.seed),
        "--lr-warmup-iters", str(max(1, round(0.05 * run.steps))),
        "--lr-wsd-decay-iters", str(decay_iters(run.iters)),
        "--log-interval", str(max(1, run.iters // 20)),
        "--eval-interval", str(max(1, run.iters // a.evals)), "--eval-iters", str(evals[model.data]),
        "--metrics-file", os.path.join(out, "metrics.jsonl"),
    ]  # fmt: skip
    if save_interval(a, run):
        argv += ["--save", os.path.join(out, "ckpt"), "--save-interval", str(save_interval(a, run))]
    return argv


def _forked_child(argv: list[str], env: dict, log_path: str) -> None:
    """A run's child, forked from a server that imported the trainer already: what
    ``python pretrain_tst.py ARGV`` would do, with its environment, working directory and
    output file."""
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    if env.get("OMP_NUM_THREADS"):  # the thread pool is set at import: as the env would set it
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = list(argv)
    import pretrain_tst

    code = pretrain_tst.main(argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class _PreloadedChild:
    """``subprocess.Popen``'s interface (poll, returncode, wait, terminate, kill) over a child
    forked from a multiprocessing forkserver that imported pretrain_tst once (--children
    fork): each dry-mode run skips the seconds of importing torch and megatron-core that a
    fresh ``python pretrain_tst.py`` pays."""

    _context = None

    def __init__(self, argv: list[str], env: dict, log_path: str):
        if _PreloadedChild._context is None:
            import multiprocessing

            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["pretrain_tst", "tst.trainer"])
            _PreloadedChild._context = context
        self._process = _PreloadedChild._context.Process(
            target=_forked_child, args=(argv, env, log_path), daemon=False
        )
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self):
        return self._process.exitcode  # None while running; -N after signal N, as Popen's

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(["pretrain_tst.py"], timeout)
        return self.returncode

    def terminate(self):
        self._process.terminate()

    def kill(self):
        self._process.kill()


def _start(a, run: Run, argv: list[str], tag: str) -> tuple[subprocess.Popen, rp._MetricsEcho]:
    """Start one run's child (resuming from its checkpoint when it has one)."""
    out = run.dir(a.work)
    os.makedirs(out, exist_ok=True)
    argv += rp._prepare_resume(SimpleNamespace(save_interval=save_interval(a, run)), out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if a.jobs > 1:  # the cores shared out: two 2-thread runs on 2 cores slow each other 10x+
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.jobs))
    with open(os.path.join(out, "command.json"), "w") as f:
        json.dump({"argv": argv, "git": rp._git_hash(), "OMP_NUM_THREADS":
                   env.get("OMP_NUM_THREADS")}, f, indent=1)  # fmt: skip
    print(f"{tag} training", flush=True)
    log_path = os.path.join(out, "train.log")
    if a.children == "fork":
        child = _PreloadedChild(argv[1:], env, log_path)
    else:
        with open(log_path, "a") as log:
            child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return child, rp._MetricsEcho(os.path.join(out, "metrics.jsonl"), tag, time.time(), run.iters)


def _done(a, run: Run) -> str:
    """The marker a run's folder gets when it trained to its end."""
    return os.path.join(run.dir(a.work), "done")


# Flags whose values name this machine's files, not the run: left out of the ledger's record.
_LOCAL_FLAGS = ("--data-path", "--tokenizer-model", "--data-cache-path", "--metrics-file",
                "--save", "--save-interval", "--load")  # fmt: skip


def run_key(run: Run) -> str:
    return f"{run.part}/{run.model}/steps{run.steps}/{run.arm.name}/seed{run.seed}"


def portable_flags(argv: list[str]) -> list[str]:
    """A run's training flags without the local paths (what makes two runs the same run)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _LOCAL_FLAGS:
            skip = True
        else:
            out.append(arg)
    return out


def read_ledger(path: str) -> dict[str, dict]:
    """The ledger's records by run key (a later line for the same run wins)."""
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    records[record["run"]] = record
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SystemExit(f"{path}:{n}: not a ledger record ({e}): fix or remove "
                                     "the line") from e  # fmt: skip
    return records


def ledger_record(a, run: Run, flags: list[str]) -> dict | None:
    """The ledger's record of ``run`` if it was made with the same flags (else None, with a
    warning: the run trains again)."""
    record = a.ledger_records.get(run_key(run))
    if record is None:
        return None
    if record["flags"] != flags:
        changed = sorted(set(record["flags"]) ^ set(flags))[:6]
        print(f"ledger: {run_key(run)} was trained with other flags ({changed}): trained "
              "again here", flush=True)  # fmt: skip
        return None
    return record


def write_ledger_record(a, run: Run, flags: list[str]) -> None:
    """Append a finished run to the ledger: its flags, every held-out loss, the final one."""
    r = read_metrics(os.path.join(run.dir(a.work), "metrics.jsonl"), run.arm.name)
    record = {"run": run_key(run), "iterations": run.iters, "flags": flags,
              "final_val_loss": final_loss(a, run),
              "val_loss": [[e["iteration"], e["val_loss"]] for e in r.evals],
              "git": rp._git_hash(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    os.makedirs(os.path.dirname(a.ledger) or ".", exist_ok=True)
    with open(a.ledger, "a") as f:
        f.write(json.dumps(record) + "\n")
    a.ledger_records[record["run"]] = record


def trained_flags(a, run: Run) -> list[str] | None:
    """The flags a run folder's run was trained with (its command.json), if recorded."""
    path = os.path.join(run.dir(a.work), "command.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return portable_flags(json.load(f)["argv"][2:])  # after python and pretrain_tst.py


def finished(a, run: Run, flags: list[str]) -> bool:
    return os.path.exists(_done(a, run)) or ledger_record(a, run, flags) is not None


def train_all(a, runs: list[Run], models: dict, data: dict, evals: dict[str, int]) -> None:
    """Train every unfinished run, ``a.jobs`` child processes at a time (1 for timings).

    On a failure or an interruption (Ctrl-C, or SIGTERM: see ``reproduce._terminated``) the
    children are stopped with SIGTERM: the trainer saves a checkpoint at its next step and
    exits; a rerun resumes from it. A child that exits 0 short of its last iteration (stopped by a
    signal) is not marked done."""
    flags = {r: portable_flags(run_argv(a, r, models[r.model], data, evals)) for r in runs}
    for run in runs:  # finished before the ledger had them (or in another ledger's study)
        if os.path.exists(_done(a, run)) and ledger_record(a, run, flags[run]) is None:
            write_ledger_record(a, run, trained_flags(a, run) or flags[run])
    todo = [r for r in runs if not finished(a, r, flags[r])]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished earlier: skipped", flush=True)
    active: list[tuple[Run, subprocess.Popen, rp._MetricsEcho]] = []
    count = 0
    try:
        while todo or active:
            while todo and len(active) < a.jobs:
                run = todo.pop(0)
                count += 1
                tag = f"[{count} {run.part} {run.model} {run.arm.name} {run.iters} seed {run.seed}]"
                argv = [a.python, "pretrain_tst.py",
                        *run_argv(a, run, models[run.model], data, evals)]  # fmt: skip
                with rp.signals_deferred():  # a signal now would orphan the child
                    active.append((run, *_start(a, run, argv, tag)))
            time.sleep(0.2 if a.dry else 1.0)
            for item in list(active):
                run, child, echo = item
                echo.poll()
                if child.poll() is None:
                    continue
                active.remove(item)
                if child.returncode != 0:
                    raise SystemExit(f"{run.dir(a.work)} failed: see its train.log")
                final_loss(a, run)  # stopped short of its end: refused, resumed by a rerun
                shutil.rmtree(os.path.join(run.dir(a.work), "ckpt"), ignore_errors=True)
                open(_done(a, run), "w").close()
                if ledger_record(a, run, flags[run]) is None:
                    write_ledger_record(a, run, flags[run])
    finally:
        rp.stop_children([child for _, child, _ in active])


# ---------------------------------------------------------------- analysis


def val_curve(a, run: Run, flags: list[str] | None = None) -> list[tuple[int, float]]:
    """The run's held-out losses, (iteration, loss), the last at its end: from the ledger when
    it holds the run with these flags, else from the run folder's metrics."""
    record = ledger_record(a, run, flags) if flags is not None else None
    if record is not None:
        return [(int(i), float(v)) for i, v in record["val_loss"]]
    r = read_metrics(os.path.join(run.dir(a.work), "metrics.jsonl"), run.arm.name)
    if r.evals[-1]["iteration"] != run.iters:
        raise SystemExit(f"{run.dir(a.work)}: last evaluation at {r.evals[-1]['iteration']}, "
                         f"not at its end ({run.iters}): stopped early; rerun to resume it")  # fmt: skip
    return [(e["iteration"], e["val_loss"]) for e in r.evals]


def final_loss(a, run: Run, flags: list[str] | None = None) -> float:
    return val_curve(a, run, flags)[-1][1]


def pre_decay_gap(arm: list[tuple[int, float]], base: list[tuple[int, float]], start: int):
    """(iteration, arm's loss minus the baseline's) at the last evaluation both runs made at or
    before ``start``, the LR decay's first step; None without one. The decay of the last 10%
    moves every arm's loss by more than the gaps it is compared with, and not by the same
    amount (docs/RESULTS.md: on bytes it makes most of the final gap's spread; the multi-stage
    lead at 10k-20k subword steps appears in it), so both gaps are reported."""
    arm_at, base_at = dict(arm), dict(base)
    common = [i for i in arm_at if i <= start and i in base_at]
    if not common:
        return None
    it = max(common)
    return it, arm_at[it] - base_at[it]


def _spread(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def analyse(
    a, runs: list[Run], models: dict, sizes: dict[str, int], flags: dict[Run, list[str]]
) -> list[dict]:
    """One row per (part, model, steps, arm): final loss over seeds, the paired gap to the
    group's baseline, and iso-loss steps where the group has baselines at several lengths."""
    groups: dict[tuple, dict[str, dict]] = {}
    for run in runs:
        arms = groups.setdefault((run.part, run.model, run.steps), {})
        row = arms.setdefault(run.arm.name, {"arm": run.arm, "curve": {}})
        row["curve"][run.seed] = val_curve(a, run, flags[run])
    rows = []
    for (part, model, steps), arms in groups.items():
        base = arms["baseline"]["curve"] if "baseline" in arms else {}
        points = [(round(v["arm"].length * steps),
                   statistics.fmean(c[-1][1] for c in v["curve"].values()),
                   _spread([c[-1][1] for c in v["curve"].values()]))
                  for v in arms.values() if v["arm"].baseline]  # fmt: skip
        for name, v in arms.items():
            arm, curves = v["arm"], v["curve"]
            losses = {s: c[-1][1] for s, c in curves.items()}
            iters = round(arm.length * steps)
            row = {"part": part, "model": model, "params": sizes[model], "steps": steps,
                   "iterations": iters, "tokens_per_param": iters * a.batch * models[model].seq
                   / sizes[model], "arm": name, "flags": list(arm.flags),
                   "seeds": sorted(losses), "final_val_loss": [losses[s] for s in sorted(losses)],
                   "final_val_loss_mean": statistics.fmean(losses.values()),
                   "final_val_loss_std": _spread(list(losses.values()))}  # fmt: skip
            paired = [s for s in sorted(losses) if s in base]
            gaps = [losses[s] - base[s][-1][1] for s in paired]
            if not arm.baseline and gaps:  # none where the group's baseline has not run
                row.update(gap=gaps, gap_mean=statistics.fmean(gaps), gap_std=_spread(gaps))
                start = iters - decay_iters(iters)
                pre = [pre_decay_gap(curves[s], base[s], start) for s in paired]
                if all(p is not None for p in pre):
                    pre_gaps = [g for _, g in pre]
                    row.update(pre_decay_iteration=max(i for i, _ in pre), pre_decay_gap=pre_gaps,
                               pre_decay_gap_mean=statistics.fmean(pre_gaps),
                               pre_decay_gap_std=_spread(pre_gaps))  # fmt: skip
                if len(points) >= 2:
                    row.update(iso_reading(points, row["final_val_loss_mean"], iters))
            rows.append(row)
    return rows


def _level(shorter: tuple[int, float, float | None], longer: tuple[int, float, float | None]):
    """The larger seed spread of two baselines (steps, mean loss, spread) where the longer one's
    loss is not below the shorter one's by more than it (more steps bought nothing the seeds
    can tell), else None (also where neither has a spread: one seed each)."""
    spreads = [s for s in (shorter[2], longer[2]) if s is not None]
    if spreads and shorter[1] - longer[1] <= max(spreads):
        return max(spreads)
    return None


def iso_reading(baselines: list[tuple[int, float, float | None]], loss: float, iters: int) -> dict:
    """The baseline steps that reach ``loss`` (:func:`reproduce.iso_loss` over the baselines'
    (steps, mean loss, seed spread)), and the speed-up over ``iters``; None with a note where
    the baselines cannot say: their losses flat within the seeds' spread from the shortest to
    the longest (a data-limited model: more steps no longer lower its held-out loss), a reading
    extrapolated along two baselines that are level within their spread, or one extrapolated
    beyond half the shortest or twice the longest baseline."""
    pts = sorted(baselines)
    (x0, y0, _), (x1, y1, _) = pts[0], pts[-1]
    none = {"iso_loss_steps": None, "iso_extrapolated": False, "speedup": None}
    spread = _level(pts[0], pts[-1])
    if spread is not None:
        return {**none, "iso_note": f"baselines flat: {y0:.4f} at {x0:,} steps, {y1:.4f} at "
                f"{x1:,} (seed spread {spread:.4f})"}  # fmt: skip
    iso = rp.iso_loss([(x, y) for x, y, _ in pts], loss)
    steps = iso["iterations"]
    if iso["extrapolated"]:  # along the nearest segment: it must have a slope to extend
        above = loss > y0
        (xa, ya, _), (xb, yb, _) = segment = pts[:2] if above else pts[-2:]
        if _level(*segment) is not None:
            bound = f"< {x0:,}" if above else f"> {x1:,}"
            return {**none, "iso_note": f"{bound} steps (the {'shortest' if above else 'longest'}"
                    f" two baselines are level, {ya:.4f} at {xa:,} and {yb:.4f} at {xb:,}: no "
                    "slope to extend)"}  # fmt: skip
    if steps is not None and iso["extrapolated"] and not x0 / 2 <= steps <= 2 * x1:
        bound = f"> {2 * x1:,}" if steps > x1 else f"< {x0 // 2:,}"
        return {**none, "iso_note": f"{bound} steps (beyond the baselines' reach)"}
    return {"iso_loss_steps": steps, "iso_extrapolated": iso["extrapolated"],
            "speedup": steps / iters if steps else None}  # fmt: skip


def _fmt(mean: float | None, std: float | None, sign: str = "") -> str:
    if mean is None:
        return "-"
    return f"{mean:{sign}.4f}" + (f" ± {std:.4f}" if std is not None else "")


def summary_markdown(rows: list[dict]) -> str:
    lines = []
    for part in PARTS:
        mine = [r for r in rows if r["part"] == part]
        if not mine:
            continue
        lines += [f"### {part}", "", "| model | params | steps | arm | iterations | tokens/param | "
                  "seeds | final held-out loss | gap to baseline (equal steps) | "
                  "gap before the LR decay (step) | iso-loss baseline steps (speed-up) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mine:
            iso = r.get("iso_note", "-")
            if r.get("iso_loss_steps"):
                mark = ", extrap." if r["iso_extrapolated"] else ""
                iso = f"{r['iso_loss_steps']:.0f} ({r['speedup']:.2f}x{mark})"
            pre = "-"
            if "pre_decay_gap_mean" in r:
                pre = (f"{_fmt(r['pre_decay_gap_mean'], r['pre_decay_gap_std'], '+')} "
                       f"({r['pre_decay_iteration']})")  # fmt: skip
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['arm']} | "
                f"{r['iterations']} | {r['tokens_per_param']:.2f} | {len(r['seeds'])} | "
                f"{_fmt(r['final_val_loss_mean'], r['final_val_loss_std'])} | "
                f"{_fmt(r.get('gap_mean'), r.get('gap_std'), '+')} | {pre} | {iso} |"
            )
        lines.append("")
    return "\n".join(lines) + (
        "\nmean ± standard deviation over seeds; the gaps are paired by seed. The gap before "
        "the LR decay is at the last evaluation before the WSD schedule's final 10%.\n"
    )


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # a new --plots-dir
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: list[dict], plots_dir: str) -> list[str]:
    """Gap to the baseline at equal steps against steps (bytes, length) or parameters (size),
    at the end and before the LR decay; the switch controls' final gaps as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for part, x, label in (("bytes", "steps", "steps"), ("length", "steps", "steps"),
                           ("size", "params", "parameters")):  # fmt: skip
        mine = [r for r in rows if r["part"] == part and "gap_mean" in r]
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for arm in dict.fromkeys(r["arm"] for r in mine):
            own = sorted((r for r in mine if r["arm"] == arm), key=lambda r: r[x])
            final = ax.errorbar([r[x] for r in own], [r["gap_mean"] for r in own],
                                yerr=[r["gap_std"] or 0.0 for r in own], marker="o", capsize=3,
                                label=arm)  # fmt: skip
            pre = [r for r in own if "pre_decay_gap_mean" in r]
            if pre:  # the same arm before the decay: hollow markers, dashed, the same colour
                ax.errorbar([r[x] for r in pre], [r["pre_decay_gap_mean"] for r in pre],
                            yerr=[r["pre_decay_gap_std"] or 0.0 for r in pre], marker="o",
                            markerfacecolor="none", linestyle="--", capsize=3,
                            color=final.lines[0].get_color(),
                            label=f"_{arm}, before the LR decay")  # fmt: skip
            # (a label starting with "_" stays out of the legend: the title says the styles)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss minus the baseline's (nats)")
        ax.set_title(f"TST's gap to the baseline at equal steps ({part})\n"
                     "filled: at the end; hollow: before the LR decay", fontsize=10)  # fmt: skip
        ax.legend(fontsize=7)
        written.append(_save(fig, os.path.join(plots_dir, f"trend_{part}.png")))
    controls = [r for r in rows if r["part"] == "controls" and "gap_mean" in r]
    if controls:  # one model and length: a bar per arm
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        names = [r["arm"] for r in controls]
        ax.bar(names, [r["gap_mean"] for r in controls], capsize=4,
               yerr=[r["gap_std"] or 0.0 for r in controls])  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel("final held-out loss minus baseline's (nats)")
        r = controls[0]
        ax.set_title(f"Switch controls: {r['params']:,} parameters, {r['steps']} steps, "
                     f"{len(r['seeds'])} seeds", fontsize=10)  # fmt: skip
        ax.tick_params(axis="x", labelsize=8)
        written.append(_save(fig, os.path.join(plots_dir, "trend_controls.png")))
    return written


# ---------------------------------------------------------------- main


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny sizes and steps, every code path")
    p.add_argument("--only", nargs="+", choices=PARTS, help="parts to run (default all)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 3 for bytes, else 2)")
    p.add_argument("--arms", nargs="+", metavar="ARM",
                   help="only these arms of the selected parts, e.g. baseline tst_multistage "
                        "(default all; a run folder's arm name)")  # fmt: skip
    p.add_argument("--work", help="run folder (default runs/trend, or runs/trend-dry)")
    p.add_argument("--data-dir", help="corpus, tokenizer and datasets, made there when absent "
                   "(default runs/trend-data, or WORK/data with --dry)")  # fmt: skip
    p.add_argument("--bytes-steps", type=int, nargs="+", help="default 1000 3000 10000")
    p.add_argument("--length-steps", type=int, nargs="+", help="default 3000 10000 20000")
    p.add_argument("--controls-steps", type=int, help="default 3000")
    p.add_argument("--size-tpp", type=float, help="tokens per parameter (default 1)")
    p.add_argument("--size-max-minutes", type=float, default=15.0, help="estimated, per arm")
    p.add_argument("--save-interval", type=int, help="default: 5 checkpoints a run")
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at once, the cores shared out among them (default 1; 2 with --dry)",
    )
    p.add_argument("--report", action="store_true",
                   help="train nothing: the table and plots of the runs finished so far")  # fmt: skip
    p.add_argument("--plots-dir", help="where the PNGs go (default: the run folder)")
    p.add_argument("--ledger", help="the finished runs' record, JSON lines (default "
                   "docs/trend_runs.jsonl; with --dry, WORK/ledger.jsonl)")  # fmt: skip
    p.add_argument("--python", default=sys.executable)
    p.add_argument(
        "--children", choices=["spawn", "fork"],
        help="how each run's process starts: spawn (`python pretrain_tst.py`, the default) or "
        "fork (from a server that imported the trainer once: no import per run; the default "
        "with --dry)",
    )  # fmt: skip
    a = p.parse_args(argv)
    a.children = a.children or ("fork" if a.dry else "spawn")
    dry = a.dry
    a.only = a.only or list(PARTS)
    known = {arm.name for part in a.only for arm in (DRY_ARMS if dry else ARMS)[part]}
    if a.arms and set(a.arms) - known:
        p.error(
            f"--arms: {sorted(set(a.arms) - known)} is not an arm of {a.only}; "
            f"the arms are {sorted(known)}"
        )
    a.work = os.path.abspath(a.work or os.path.join(ROOT, "runs", "trend-dry" if dry else "trend"))
    default_data = os.path.join(a.work, "data") if dry else os.path.join(ROOT, "runs", "trend-data")
    a.data_dir = os.path.abspath(a.data_dir or default_data)
    default_ledger = (
        os.path.join(a.work, "ledger.jsonl")
        if dry
        else os.path.join(ROOT, "docs", "trend_runs.jsonl")
    )
    a.ledger = os.path.abspath(a.ledger or default_ledger)
    a.ledger_records = read_ledger(a.ledger)
    a.bytes_steps = a.bytes_steps or ([20] if dry else [1000, 3000, 10000])
    a.length_steps = a.length_steps or ([20] if dry else [3000, 10000, 20000])
    a.controls_steps = a.controls_steps or (20 if dry else 3000)
    a.size_tpp = a.size_tpp or (0.02 if dry else 1.0)
    a.jobs = a.jobs or (2 if dry else 1)
    a.batch, a.split = (4, "95,5,0") if dry else (16, "98,2,0")
    a.evals = 2 if dry else 10  # evaluations per run (the last at its end)
    return a


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    a = get_args(argv)
    started = time.time()
    os.makedirs(a.work, exist_ok=True)
    models = DRY_MODELS if a.dry else MODELS
    vocab = {"sp": 512 if a.dry else 4096, "bytes": 257}
    sizes = {name: params(m, vocab[m.data]) for name, m in models.items()}
    runs = plan_runs(a, models, sizes)
    kinds = {models[r.model].data for r in runs}
    data = prepare_data(a.data_dir, a.python, 40 if a.dry else None, vocab["sp"], kinds)
    evals = {}
    for kind in ("sp", "bytes"):
        mine = [r for r in runs if models[r.model].data == kind]
        if mine:
            seq = models[mine[0].model].seq
            bags = sorted({r.arm.data_bag for r in mine})
            evals[kind] = eval_iters(data[kind], seq, a.batch, a.split, bags)
            if a.dry:  # a path check, not a measurement: a few batches, not the whole split
                evals[kind] = min(evals[kind], 4)
    flags = {r: portable_flags(run_argv(a, r, models[r.model], data, evals)) for r in runs}
    total = 0.0
    print("estimated training time (stated step-time model, evaluations included):")
    for part in a.only:
        mine = [r for r in runs if r.part == part]
        left = [r for r in mine if not finished(a, r, flags[r])]
        secs = sum(RUN_START_S + step_seconds(sizes[r.model], models[r.model], a.batch)
                   * (r.iters + a.evals * evals[models[r.model].data] / 3) for r in left)  # fmt: skip
        total += secs
        print(f"  {part:<9} {len(mine)} runs ({len(left)} to train), "
              f"{sum(r.iters for r in left):,} steps: {_duration(secs)}", flush=True)  # fmt: skip
    at_once = "one run at a time" if a.jobs == 1 else f"summed over runs, {a.jobs} at a time"
    print(f"  all       {_duration(total)}, {at_once}", flush=True)
    print(
        "  (a floor: 1.6x to 4x low on the 2-core machines measured; each run's progress "
        "lines say the time it has left at its own pace)",
        flush=True,
    )
    if a.report:  # a long study's interim figures (a group without its baseline has no gap)
        runs = [r for r in runs if finished(a, r, flags[r])]
        print(f"--report: the {len(runs)} finished runs, nothing trained", flush=True)
    else:
        train_all(a, runs, models, data, evals)
    rows = analyse(a, runs, models, sizes, flags)
    plots = plot(rows, a.plots_dir or a.work)
    report = {"plan": {"parts": a.only, "dry": a.dry, "finished_runs_only": a.report,
                       "batch": a.batch, "split": a.split, "ledger": a.ledger,
                       "eval_iters": evals, "schedule": SCHEDULE, "size_tpp": a.size_tpp,
                       "models": {n: vars(m) | {"params": sizes[n]} for n, m in models.items()}},
              "rows": rows, "plots": plots, "git": rp._git_hash(),
              "wall_s": round(time.time() - started, 1)}  # fmt: skip
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = summary_markdown(rows)
    with open(os.path.join(a.work, "summary.md"), "w") as f:
        f.write(text)
    print(text + f"\nwrote {a.work}/results.json, summary.md and {plots} "
          f"in {report['wall_s']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, rp._terminated)  # through train_all's clean-up
    os.setpriority(os.PRIO_PROCESS, 0, max(10, os.getpriority(os.PRIO_PROCESS, 0)))
    sys.exit(main())
