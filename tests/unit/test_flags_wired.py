"""Model-shape, checkpoint, data, logging and memory flags through pretrain_tst.py, each at its
default and at another value, and Weights & Biases in offline mode.

Two runs carry every flag (one with the defaults, one with all of them changed), so each
check is a difference a flag that is not wired could not make: parameter shapes
(--kv-channels), RoPE frequencies against megatron-core's own formula (--rotary-percent,
--use-rope-scaling / --rope-scaling-factor), the norms' epsilon (--norm-epsilon), the
checkpoint's keys (--no-save-optim), the bin-file reader (--no-mmap-bin-files), TensorBoard
event counts (--tensorboard-log-interval), a logged parameter norm equal to the model's
(--log-params-norm), the local spec's core attention (--attention-backend), garbage collection (--manual-gc / --manual-gc-interval) and the points
where cached device memory is released (--empty-unused-memory-level). The W&B run's offline
files are read back (wandb's transaction log, parsed here as the LevelDB-style log it is) and
hold the run's own metrics.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from flags import SMALL_GPT

import pretrain_tst

BASE = [
    "--vocab-size", "384", "--tokenizer-type", "NullTokenizer", "--num-layers", "2",
    "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
    "--micro-batch-size", "2", "--train-iters", "4", "--tst-bag-size", "2", "--tst-iters", "2",
    "--lr", "1e-2", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
    "--peak-tflops", "1", "--num-workers", "0", "--save-interval", "1", "--qk-layernorm",
    *SMALL_GPT,
]  # fmt: skip
CHANGED = [
    "--kv-channels", "16", "--rotary-percent", "0.5", "--use-rope-scaling",
    "--rope-scaling-factor", "16", "--norm-epsilon", "1e-3", "--no-save-optim",
    "--no-mmap-bin-files", "--tensorboard-log-interval", "2", "--log-params-norm",
    "--manual-gc", "--manual-gc-interval", "2", "--empty-unused-memory-level", "2",
    "--attention-backend", "flash", "--save-retain-interval", "2", "--log-memory-interval", "2",
    "--train-sync-interval", "2", "--apply-wd-to-qk-layernorm", "--log-device-memory-used",
    "--timing-log-level", "1", "--log-timers-to-tensorboard", "--padded-vocab-size", "400",
]  # fmt: skip


def _dataset(path, seed: int = 0) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(path / ("d_text_document" if seed == 0 else f"d{seed}_text_document"))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(seed)
    for _ in range(40):
        builder.add_document(rng.integers(0, 380, 40).tolist(), [40])
    builder.finalize(prefix + ".idx")
    return prefix


def _run(argv: list[str], out) -> dict:
    """pretrain_tst.main in this process, watching what the flags should change."""
    from tst.trainer import Trainer

    seen: dict = {"gc_enabled": set(), "collects": 0, "releases": [], "syncs": []}
    train, step, empty = Trainer.train, Trainer.train_step, Trainer._empty_cache
    synchronize = Trainer._synchronize_device
    collect = gc.collect

    def watch_train(self):
        model = self.raw_chunks[0]
        seen["config"] = self.config
        seen["shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters()}
        seen["inv_freq"] = model.rotary_pos_emb.inv_freq.clone()
        seen["eps"] = {m.eps for m in model.modules() if hasattr(m, "eps")}
        seen["core_attention"] = {
            type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers
        }
        seen["bin_reader"] = type(self.train_stream.dataset.dataset.bin_reader).__name__
        seen["trainer"] = self
        names = {id(p): n for n, p in model.named_parameters()}
        seen["wd_mult"] = {names[id(p)]: group["wd_mult"]
                           for group in self.optimizer.param_groups for p in group["params"]}  # fmt: skip
        return train(self)

    def watch_step(self, phase):
        seen["gc_enabled"].add(gc.isenabled())
        return step(self, phase)

    def watch_empty(self, level):
        # Where the trainer would hand cached CUDA blocks back (it does only on CUDA).
        if self.cfg.training.empty_unused_memory_level >= level:
            seen["releases"].append((self.iteration, level))
        return empty(self, level)

    def watch_synchronize(self):
        seen["syncs"].append(self.iteration)
        return synchronize(self)

    def count_collect(*args, **kwargs):
        # Not settled_imports' collection, made only where main imports something new
        # (which depends on what this worker imported before), nor tst.platform.shutdown's,
        # made once this process's threads pile up (which depends on the tests before).
        caller = sys._getframe(1).f_code.co_filename
        if not caller.endswith(("megatron_import.py", "platform.py")):
            seen["collects"] += 1
        return collect(*args, **kwargs)

    Trainer.train, Trainer.train_step, Trainer._empty_cache = watch_train, watch_step, watch_empty
    Trainer._synchronize_device = watch_synchronize
    gc.collect = count_collect
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert pretrain_tst.main(argv + [
                "--metrics-file", str(out / "m.jsonl"), "--save", str(out / "ckpt"),
                "--tensorboard-dir", str(out / "tb"),
            ]) == 0  # fmt: skip
    finally:
        sys.stdout.write(stdout.getvalue())
        seen["stdout"] = stdout.getvalue()
        Trainer.train, Trainer.train_step, Trainer._empty_cache = train, step, empty
        Trainer._synchronize_device = synchronize
        gc.collect = collect
        gc.enable()
    with open(out / "m.jsonl") as f:
        seen["records"] = [json.loads(line) for line in f]
    return seen


def _checkpoint_keys(ckpt) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    with open(ckpt / "latest_checkpointed_iteration.txt") as f:
        iteration = int(f.read())
    folder = ckpt / f"iter_{iteration:07d}"
    return list(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def _tensorboard(folder) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _rope_inv_freq(dim: int, rotary_percent: float, scaling: float | None) -> torch.Tensor:
    """megatron-core's RotaryEmbedding frequencies, rebuilt from its own scaling helper."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(dim, rotary_percent, rope_scaling=scaling is not None,
                           rope_scaling_factor=scaling or 8.0, use_cpu_initialization=True)  # fmt: skip
    return rope.inv_freq


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("flags")
    prefix = _dataset(path)
    (path / "d").mkdir()
    (path / "n").mkdir()
    default = _run(BASE + ["--data-path", prefix], path / "d")
    os.environ["WANDB_MODE"] = "offline"
    try:
        changed = _run(BASE + CHANGED + ["--data-path", prefix, "--wandb-project", "tst-tests",
                                         "--wandb-exp-name", "changed", "--wandb-save-dir",
                                         str(path / "n" / "wandb")], path / "n")  # fmt: skip
    finally:
        del os.environ["WANDB_MODE"]
    return default, changed, path


def test_model_shape_and_numerics_flags(runs):
    default, changed, _ = runs
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    # --kv-channels: 4 heads x 8 (hidden / heads) by default, 4 x 16 when given.
    assert default["config"].kv_channels == 8 and changed["config"].kv_channels == 16
    assert default["shapes"][qkv] == (3 * 4 * 8, 32) and changed["shapes"][qkv] == (3 * 4 * 16, 32)
    assert default["shapes"][proj] == (32, 32) and changed["shapes"][proj] == (32, 64)
    # --padded-vocab-size: the vocabulary's rows as given (by default the tokenizer's 384,
    # a multiple of --make-vocab-size-divisible-by's 128; 400 is none; tied output layer).
    table = "embedding.word_embeddings.weight"
    assert default["shapes"][table] == (384, 32) and changed["shapes"][table] == (400, 32)
    # --rotary-percent / --use-rope-scaling / --rope-scaling-factor: the frequencies.
    assert torch.equal(default["inv_freq"], _rope_inv_freq(8, 1.0, None))
    assert torch.equal(changed["inv_freq"], _rope_inv_freq(16, 0.5, 16.0))
    assert changed["inv_freq"].numel() == 4 and default["inv_freq"].numel() == 4
    assert not torch.equal(changed["inv_freq"], _rope_inv_freq(16, 0.5, None))  # scaled
    # --norm-epsilon: megatron-core's field and every norm module.
    assert default["config"].layernorm_epsilon == 1e-5 and default["eps"] == {1e-5}
    assert changed["config"].layernorm_epsilon == 1e-3 and changed["eps"] == {1e-3}

    # --apply-wd-to-qk-layernorm: the query / key norms decay too; other norms and 1-D
    # parameters never, matrices always (megatron-core's parameter groups).
    def decayed(run):
        return sorted(n.split(".", 3)[-1] for n, m in run["wd_mult"].items() if m == 1.0
                      and n.startswith("decoder.layers.0.") and "norm" in n)  # fmt: skip

    assert decayed(default) == []
    assert decayed(changed) == [
        "self_attention.k_layernorm.weight",
        "self_attention.q_layernorm.weight",
    ]
    assert changed["wd_mult"]["decoder.layers.0.mlp.linear_fc1.weight"] == 1.0
    # --attention-backend: auto is megatron-core's attention on CPU; flash the fused one.
    assert default["core_attention"] == {"DotProductAttention"}
    assert changed["core_attention"] == {"SDPAttention"}


def test_checkpoint_data_and_memory_flags(runs):
    default, changed, path = runs
    # --no-save-optim: the model is saved, Adam's state is not.
    keys_d, keys_n = _checkpoint_keys(path / "d" / "ckpt"), _checkpoint_keys(path / "n" / "ckpt")
    assert any("optimizer" in k for k in keys_d) and not any("optimizer" in k for k in keys_n)
    assert {k for k in keys_d if "optimizer" not in k} == set(keys_n)

    # --save-retain-interval: a checkpoint every step; by default all stay, with 2 the odd
    # one is deleted when the next is complete (the latest stays whatever its iteration).
    def saved(run):
        return sorted(p.name for p in (path / run / "ckpt").iterdir() if p.name.startswith("iter"))

    assert saved("d") == [f"iter_000000{i}" for i in (1, 2, 3, 4)]
    assert saved("n") == ["iter_0000002", "iter_0000004"]
    # --no-mmap-bin-files: megatron-core's file reader instead of the memory map.
    assert default["bin_reader"] == "_MMapBinReader" and changed["bin_reader"] == "_FileBinReader"
    # --empty-unused-memory-level: none by default; 2 = after the forward/backward and after
    # the optimizer step (Megatron-LM's points), at every one of the 4 steps.
    # --train-sync-interval: a wait for the device after every 2nd step (none by default).
    assert default["syncs"] == [] and changed["syncs"] == [2, 4]
    assert default["releases"] == []
    assert sorted(changed["releases"]) == sorted(
        [(i, 2) for i in range(4)] + [(i, 1) for i in range(4)]
    )


def test_a_checkpoint_without_optimizer_state_resumes_with_no_load_optim(runs, tmp_path):
    """A --no-save-optim checkpoint resumed as it is: one line naming --no-load-optim (it was a
    KeyError from deep inside torch's checkpoint reader); with the flag it resumes. Its
    --padded-vocab-size is needed to resume (or read by --use-checkpoint-args)."""
    from tst.checkpointing import CheckpointError

    _, _, path = runs
    argv = BASE + [a for a in CHANGED if a not in ("--no-save-optim", "--log-params-norm")] + [
        "--data-path", str(path / "d_text_document"), "--load", str(path / "n" / "ckpt"),
        "--train-iters", "5", "--metrics-file", str(tmp_path / "m.jsonl"),
        "--override-opt_param-scheduler"]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"iter_0000004 holds no optimizer state \(saved "
                                              r"with --no-save-optim\): pass --no-load-optim"):  # fmt: skip
        pretrain_tst.main(argv)
    assert pretrain_tst.main(argv + ["--no-load-optim"]) == 0
    # Its 400-row vocabulary (--padded-vocab-size): without the flag the shapes differ, and the
    # error names the flag; --use-checkpoint-args takes it from the checkpoint.
    at = argv.index("--padded-vocab-size")
    argv = [*argv[:at], *argv[at + 2 :], "--no-load-optim"]
    with pytest.raises(CheckpointError, match=r"the padded vocabulary differs \(400 rows saved\)"
                                              r".*give --padded-vocab-size 400"):  # fmt: skip
        pretrain_tst.main(argv)
    assert pretrain_tst.main(argv + ["--use-checkpoint-args"]) == 0


def test_logging_and_gc_flags(runs):
    default, changed, path = runs
    # --tensorboard-log-interval: training scalars every step by default, every 2nd here;
    # evaluation records are written whenever they happen.
    tb_d, tb_n = _tensorboard(path / "d" / "tb"), _tensorboard(path / "n" / "tb")
    assert tb_d["train/loss"] == [1, 2, 3, 4] and tb_n["train/loss"] == [2, 4]
    assert tb_d["eval/val_loss"] == tb_n["eval/val_loss"] == [2, 4]
    # --log-params-norm: logged at every step, and the last one is the final model's norm.
    train_d = [r for r in default["records"] if r.get("loss") is not None]
    train_n = [r for r in changed["records"] if r.get("loss") is not None]
    assert not any("params_norm" in r for r in train_d) and len(train_n) == 4
    model = changed["trainer"].raw_chunks[0]
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    assert train_n[-1]["params_norm"] == pytest.approx(norm, rel=1e-9)
    # --manual-gc / --manual-gc-interval: automatic collection off while training; a
    # collection at start, at steps 2 and 4 and twice around each of the 2 evaluations.
    assert default["gc_enabled"] == {True} and default["collects"] == 0
    assert changed["gc_enabled"] == {False}
    assert changed["collects"] == 1 + 2 + 2 * 2
    # Memory: after the first logged steps (1 and 2 at --log-interval 1, as Megatron-LM), and
    # every --log-memory-interval steps; on CPU the process's resident memory, in MiB.
    memory = re.compile(r"\[Rank 0\] \(after (\d+) iterations\) memory \(MB\) \| "
                        r"resident: ([\d.]+) \| max resident: ([\d.]+)")  # fmt: skip
    reports = {name: [m.groups() for m in memory.finditer(run["stdout"])]
               for name, run in (("default", default), ("changed", changed))}  # fmt: skip
    assert [r[0] for r in reports["default"]] == ["1", "2"]
    assert [r[0] for r in reports["changed"]] == ["1", "2", "4"]
    assert all(50 < float(now) <= float(peak) < 2**20 for _, now, peak in reports["changed"])
    # --log-device-memory-used: the whole machine's used memory too (the host's on CPU), in
    # every report.
    whole = re.compile(r"max resident: [\d.]+ \| total host memory used: ([\d.]+)\n")
    assert "total host memory used" not in default["stdout"]
    used = [float(m.group(1)) for m in whole.finditer(changed["stdout"])]
    assert len(used) == 3 and all(50 < mib < 2**30 for mib in used), used


def _wandb_records(run_dir) -> list:
    """The records of a W&B run's ``.wandb`` file: wandb writes them as a LevelDB-style log
    (a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks: crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2

    (name,) = [n for n in os.listdir(run_dir) if n.endswith(".wandb")]
    with open(os.path.join(run_dir, name), "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_metrics(runs):
    _, changed, path = runs
    root = path / "n" / "wandb" / "wandb"
    (run_dir,) = [root / n for n in os.listdir(root) if n.startswith("offline-run-")]
    records = _wandb_records(run_dir)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "tst-tests" and run.display_name == "changed"
    history: dict[int, dict] = {}
    for r in records:
        if r.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}  # fmt: skip
            history.setdefault(items.get("_step"), {}).update(items)
    # Every --tensorboard-log-interval (2) step's training scalars, and both evaluations.
    train_n = {r["iteration"]: r for r in changed["records"] if r.get("loss") is not None}
    evals = {r["iteration"]: r["val_loss"] for r in changed["records"] if "val_loss" in r}
    # 0: the run plan's record (train_iters); the training scalars every 2 steps; the timers
    # (--log-timers-to-tensorboard) at every log, as Megatron-LM writes them to W&B too.
    assert sorted(history) == [0, 1, 2, 3, 4]
    assert sorted(s for s, h in history.items() if "train/loss" in h) == [2, 4]
    assert all(history[s]["forward-backward-time"] > 0 for s in (1, 2, 3, 4))
    assert history[0]["plan/train_iters"] == 4
    for step in (2, 4):
        assert history[step]["train/loss"] == pytest.approx(train_n[step]["loss"], rel=1e-12)
        assert history[step]["train/params_norm"] == pytest.approx(train_n[step]["params_norm"])
        assert history[step]["eval/val_loss"] == pytest.approx(evals[step], rel=1e-12)
    # The run's resolved config, as the run record carries it.
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["kv_channels"] == 16 and config["log"]["manual_gc_interval"] == 2


def test_wandb_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError) as info:
        pretrain_tst.main(BASE + ["--mock-data", "--wandb-project", "p"])
    assert str(info.value) == (
        "--wandb-project p needs the wandb package: pip install wandb==0.31.0 (or drop the "
        "--wandb-* flags)"
    )


def test_full_validation_reads_the_whole_validation_split(tmp_path):
    """--full-validation: 40 documents of 40 tokens, --split 36,4,0: the validation split is
    4 documents, 160 tokens, 8 big samples of 2 x 9 tokens (160 // 18), 16 sequences: 8 global
    batches of 2 per evaluation whatever --eval-iters says. The same loss as --eval-iters 8
    reading those batches (rel 1e-6: the same rows). A weighted validation blend (which
    megatron-core cannot size whole) and a split smaller than a batch (1 document: 4 sequences of 9
    tokens) are refused by name."""
    from tst.errors import ConfigError

    prefix = _dataset(tmp_path)
    data = ["--data-path", prefix, "--split", "36,4,0"]
    (tmp_path / "f").mkdir()
    (tmp_path / "e").mkdir()
    full = _run(BASE + data + ["--full-validation"], tmp_path / "f")
    assert "--full-validation: each evaluation reads 8 global batches, 16 of the validation " \
           "split's 16 sequences\n" in full["stdout"]  # fmt: skip
    eight = list(BASE)
    eight[eight.index("--eval-iters") + 1] = "8"
    by_iters = _run(eight + data, tmp_path / "e")
    got = [(r["iteration"], r["val_loss"]) for r in full["records"] if "val_loss" in r]
    want = [(r["iteration"], r["val_loss"]) for r in by_iters["records"] if "val_loss" in r]
    assert [i for i, _ in got] == [i for i, _ in want] == [2, 4]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    with pytest.raises(ConfigError, match=r"--full-validation reads the validation split whole, "
                       r"but --data-path gives its datasets weights"):  # fmt: skip
        pretrain_tst.main(BASE + ["--data-path", "1.0", prefix, "--full-validation"])
    with pytest.raises(ValueError, match=r"--full-validation: the validation split holds 4 "
                       r"sequences of 9 tokens, fewer than one global batch \(6\)"):  # fmt: skip
        pretrain_tst.main(BASE + ["--data-path", prefix, "--split", "39,1,0", "--full-validation",
                                  "--global-batch-size", "6", "--tst-bag-size", "1"])  # fmt: skip


def test_multiple_validation_sets_score_each_prefix(tmp_path):
    """--multiple-validation-sets with --full-validation and two --valid-data-path prefixes of
    40 documents of 40 tokens each: val_loss-0 and val_loss-1 are what --full-validation
    gives on each prefix alone (rel 1e-6), val_loss their mean (equal sizes: the same
    number of targets), in the metrics file and TensorBoard."""
    from tst.errors import ConfigError

    first, second = _dataset(tmp_path), _dataset(tmp_path, seed=1)
    train = ["--train-data-path", first, "--full-validation"]
    runs = {}
    for name, valid in (("both", [first, second]), ("first", [first]), ("second", [second])):
        (tmp_path / name).mkdir()
        extra = ["--multiple-validation-sets"] if name == "both" else []
        runs[name] = _run(BASE + train + ["--valid-data-path", *valid, *extra], tmp_path / name)

    def evals(name, key):
        return [(r["iteration"], r[key]) for r in runs[name]["records"] if key in r]

    assert [i for i, _ in evals("both", "val_loss-1")] == [2, 4]
    for (_, a), (_, b) in zip(evals("both", "val_loss-0"), evals("first", "val_loss"), strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    for (_, a), (_, b) in zip(
        evals("both", "val_loss-1"), evals("second", "val_loss"), strict=True
    ):
        assert a == pytest.approx(b, rel=1e-6)
    for (_, a), (_, b), (_, c) in zip(evals("both", "val_loss"), evals("first", "val_loss"),
                                      evals("second", "val_loss"), strict=True):  # fmt: skip
        assert a == pytest.approx((b + c) / 2, rel=1e-6)
    assert "of validation set 1 (" + second in runs["both"]["stdout"]
    assert _tensorboard(tmp_path / "both" / "tb")["eval/val_loss-1"] == [2, 4]
    # --validation-set-names (Megatron-LM 0.19) names them: the same losses under the names.
    (tmp_path / "named").mkdir()
    named = _run(
        BASE
        + train
        + [
            "--valid-data-path",
            first,
            second,
            "--multiple-validation-sets",
            "--validation-set-names",
            "wiki",
            "code-py",
        ],
        tmp_path / "named",
    )
    got = [(r["iteration"], r["val_loss-wiki"], r["val_loss-code-py"])
           for r in named["records"] if "val_loss" in r]  # fmt: skip
    want = [(i, a, b) for (i, a), (_, b) in zip(evals("both", "val_loss-0"),
                                                 evals("both", "val_loss-1"), strict=True)]  # fmt: skip
    assert got == want
    assert "set code-py " in named["stdout"]
    with pytest.raises(ValueError, match="--validation-set-names gives 1 names for 2"):
        pretrain_tst.main(BASE + train + ["--valid-data-path", first, second,
                                          "--multiple-validation-sets",
                                          "--validation-set-names", "wiki"])  # fmt: skip
    with pytest.raises(ConfigError, match="--validation-set-names names the sets of "
                                          "--multiple-validation-sets"):  # fmt: skip
        pretrain_tst.main(BASE + train + ["--valid-data-path", first,
                                          "--validation-set-names", "wiki"])  # fmt: skip


def test_dry_run_counts_the_optimizer_state_per_rank_as_it_is_sharded(tmp_path):
    """The dry run's Adam bytes per rank: all of it without the distributed optimizer, 1 /
    (DP x CP) with it, N / (DP x CP) with --num-distributed-optimizer-instances N."""
    argv = [a for a in BASE if a != "--qk-layernorm"] + ["--mock-data", "--dry-run",
                                                          "--dry-run-world-size", "8"]  # fmt: skip

    def adam_bytes(*extra):
        report = str(tmp_path / "report.json")
        with contextlib.redirect_stdout(io.StringIO()):
            assert pretrain_tst.main(argv + list(extra) + ["--dry-run-report", report]) == 0
        with open(report) as f:
            (stage,) = json.load(f)["stages"]
        return stage["parameters"], stage["bytes"]["optimizer"]

    n, whole = adam_bytes()
    assert whole == 8 * n  # fp32: Adam's two moments
    distopt = ["--use-distributed-optimizer"]
    assert adam_bytes(*distopt) == (n, 8 * n / 8)
    assert adam_bytes(*distopt, "--num-distributed-optimizer-instances", "2") == (n, 8 * n / 4)
    n_tp, adam = adam_bytes(*distopt, "--tensor-model-parallel-size", "2")  # DP 4
    assert n_tp < n and adam == 8 * n_tp / 4
    assert adam_bytes(*distopt, "--context-parallel-size", "2") == (n, 8 * n / 8)  # DP 4 x CP 2


def test_dry_run_moves_offloaded_activations_to_the_host_column(tmp_path):
    """--fine-grained-activation-offloading in the dry run: per layer and micro-batch in
    flight, the offloaded modules' inputs (here all five dense ones of a multi-head attention
    layer: norm input, QKV input, Q, K, V, attention output, MLP norm input = 7 h per
    position) leave the activation column for the host column, one layer's kept (PP 2,
    stage 0 holds 2 micro-batches of its 2 layers at the 1F1B peak); below
    --min-offloaded-tensor-size nothing moves."""
    argv = [a for a in BASE if a != "--qk-layernorm"] + [
        "--mock-data", "--dry-run", "--dry-run-world-size", "2", "--pipeline-model-parallel-size",
        "2", "--num-layers", "4", "--global-batch-size", "8"]  # fmt: skip
    offload = ["--fine-grained-activation-offloading", "--min-offloaded-tensor-size", "0",
               "--offload-modules", "attn_norm", "qkv_linear", "core_attn", "attn_proj",
               "mlp_norm"]  # fmt: skip

    def stage0(*extra):
        report = str(tmp_path / "report.json")
        with contextlib.redirect_stdout(io.StringIO()):
            assert pretrain_tst.main(argv + list(extra) + ["--dry-run-report", report]) == 0
        with open(report) as f:
            return json.load(f)["stages"][0]["bytes"]

    plain, moved = stage0(), stage0(*offload)
    per_layer = 7 * 32 * 8 * 2 * 4  # 7 h x seq x micro-batch, fp32
    held = 2 * 2  # micro-batches in flight x layers
    assert moved["host_activations"] == (held - 1) * per_layer
    assert moved["activations"] == plain["activations"] - (held - 1) * per_layer
    assert plain["host_activations"] == 0
    assert (
        stage0(
            *offload[:-6],
            "--offload-modules",
            "core_attn",
            "--min-offloaded-tensor-size",
            str(32 * 8 * 2 * 3 + 1),
        )["host_activations"]
        == 0
    )


def test_dataloader_cache_flags_read_the_indices_a_run_built(tmp_path):
    """--dataloader-fast-cache-load and --dataloader-defer-npy-index-mmap (Megatron-LM's) take
    the sample indices from the cache a run without them built: the same losses, training
    and validation (rel 1e-6). Without the cache each is refused at start, naming the missing
    file and the fix (the deferred one would fail at its first sample, in a loader worker);
    the fast path with --data-path is refused as in Megatron-LM."""
    from tst.errors import InputError

    first, second = _dataset(tmp_path), _dataset(tmp_path, seed=1)
    cache = str(tmp_path / "cache")
    data = ["--train-data-path", first, "--valid-data-path", second, "--data-cache-path", cache]
    flags = ["--dataloader-fast-cache-load", "--dataloader-defer-npy-index-mmap"]
    runs = {}
    for name, extra in (("built", []), ("cached", flags)):
        (tmp_path / name).mkdir()
        runs[name] = _run(BASE + data + extra, tmp_path / name)
    for key in ("loss", "val_loss"):
        got = [(r["iteration"], r[key]) for r in runs["cached"]["records"] if key in r]
        want = [(r["iteration"], r[key]) for r in runs["built"]["records"] if key in r]
        assert [i for i, _ in got] == [i for i, _ in want] and got, key
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, rel=1e-6), key
    for flag in flags:
        fresh = [*data[:-1], str(tmp_path / f"empty{flag}")]
        with pytest.raises(InputError, match=rf"{flag} read\(s\) the sample indices from the "
                           r"cache, but \S+\.npy is not there: run once without the flag"):  # fmt: skip
            pretrain_tst.main(BASE + fresh + [flag])
    with pytest.raises(ValueError, match=r"--dataloader-fast-cache-load reads per-split blends"):
        pretrain_tst.main(BASE + ["--data-path", first, "--dataloader-fast-cache-load"])


def test_init_model_with_meta_device_trains_the_same_model(tmp_path, monkeypatch):
    """--init-model-with-meta-device: megatron-core builds every parameter on the meta device
    and the trainer's layout-independent initialisation draws each one on the host: the same
    weights, so the same losses, exactly (an MoE model, both phases)."""
    import tst.model

    prefix = _dataset(tmp_path)
    built, build = [], tst.model.build_gpt

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        built.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(tst.model, "build_gpt", spy)
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16"]
    losses = {}
    for name, extra in (("plain", []), ("meta", ["--init-model-with-meta-device"])):
        metrics = tmp_path / f"{name}.jsonl"
        argv = BASE + moe + extra + ["--data-path", prefix, "--metrics-file", str(metrics)]
        assert pretrain_tst.main(argv) == 0
        with open(metrics) as f:
            losses[name] = [(r["iteration"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
    assert built == [{"cpu"}, {"meta"}]
    assert len(losses["plain"]) == 4 and losses["meta"] == losses["plain"]


def _train_records(argv: list[str], metrics) -> list[dict]:
    assert pretrain_tst.main(argv + ["--metrics-file", str(metrics)]) == 0
    with open(metrics) as f:
        return [r for r in map(json.loads, f) if r.get("loss") is not None]


def test_decrease_batch_size_if_needed_follows_megatron_lms_rule(tmp_path):
    """--decrease-batch-size-if-needed: a global batch of 5 in micro-batches of 2 trains 4
    samples a step (the same losses as a batch of 4, exactly, at a constant LR) and counts 1
    skipped; the LR schedule counts the samples trained against lengths of steps x 5
    (Megatron-LM's rule: linear decay reaches 4/5 of its way by the last step). A resume with
    micro-batches of 1 trains the whole 5 from there, the counts continuing from the
    checkpoint's. Without the flag the batch is refused, naming it."""
    from tst.errors import ConfigError

    prefix = _dataset(tmp_path)
    base = [a for a in BASE if a != "--qk-layernorm"] + [
        "--data-path", prefix, "--train-iters", "6", "--tst-iters", "2", "--eval-interval", "6",
        "--save-interval", "6", "--lr-warmup-iters", "0", "--min-lr", "0"]  # fmt: skip
    constant = ["--lr-decay-style", "constant"]
    want = _train_records(base + constant + ["--global-batch-size", "4"], tmp_path / "four.jsonl")
    with pytest.warns(UserWarning, match=r"decreasing the global batch from 5 to 4 .* 1 "
                                         r"samples a step are skipped"):  # fmt: skip
        got = _train_records(base + constant + ["--global-batch-size", "5",
                                                "--decrease-batch-size-if-needed"],
                             tmp_path / "five.jsonl")  # fmt: skip
    assert [r["loss"] for r in got] == [r["loss"] for r in want] and len(got) == 6
    assert [r["skipped_samples"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["positions"] for r in got] == [4 * 8 * i for i in range(1, 7)]
    assert "skipped_samples" not in want[-1]
    with pytest.raises(ConfigError, match="--global-batch-size 5 is not divisible by "
                                          "--micro-batch-size 2 x data-parallel size 1 "
                                          r"\(--decrease-batch-size-if-needed"):  # fmt: skip
        pretrain_tst.main(base + ["--global-batch-size", "5"])

    # Linear decay over 6 x 5 samples, stepped by the 4 trained: lr(i) = lr0 (1 - 4 i / 30).
    ckpt = str(tmp_path / "ckpt")
    five = base + ["--global-batch-size", "5", "--decrease-batch-size-if-needed",
                   "--lr-decay-style", "linear", "--save", ckpt, "--exit-interval", "3"]  # fmt: skip
    with pytest.warns(UserWarning, match="by --train-iters it has run 80.0% of them"):
        first = _train_records(five, tmp_path / "a.jsonl")
    lr0 = float(BASE[BASE.index("--lr") + 1])
    for r in first:
        assert r["lr"] == pytest.approx(lr0 * (1 - 4 * r["iteration"] / 30), rel=1e-6), r
    i = five.index("--micro-batch-size")
    ones = five[:i] + ["--micro-batch-size", "1"] + five[i + 2 :] + ["--load", ckpt]
    resumed = _train_records(ones, tmp_path / "b.jsonl")
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert [r["positions"] // 8 for r in resumed] == [12 + 5, 12 + 10, 12 + 15]
    assert [r["skipped_samples"] for r in resumed] == [3, 3, 3]
    for r in resumed:  # the schedule's samples continue from 12 trained, 5 a step
        assert r["lr"] == pytest.approx(lr0 * (1 - (12 + 5 * (r["iteration"] - 3)) / 30),
                                        rel=1e-6), r  # fmt: skip


def test_phase_transition_iterations_save_and_exit_at_each_data_phase(tmp_path, capsys):
    """--phase-transition-iterations 2,4: the run saves and exits at step 2, its relaunch at 4,
    the next runs to the end: the same losses as the unbroken run (rel 1e-6). A relaunch with
    another global batch is refused (each data phase needs the same), as is a ramp-up."""
    from tst.checkpointing import CheckpointError
    from tst.config import parse_args
    from tst.errors import ConfigError
    from tst.plan import validate

    prefix = _dataset(tmp_path)
    base = [a for a in BASE if a not in ("--qk-layernorm",)] + [
        "--data-path", prefix, "--train-iters", "6", "--save-interval", "100"]  # fmt: skip
    want = _train_records(base, tmp_path / "full.jsonl")
    ckpt = str(tmp_path / "ckpt")
    phased = base + ["--phase-transition-iterations", "4, 2", "--save", ckpt, "--load", ckpt]
    got = []
    for part in range(3):
        capsys.readouterr()
        got += _train_records(phased, tmp_path / f"part{part}.jsonl")
        if part < 2:
            assert (f"stopping at iteration {2 * part + 2}: --phase-transition-iterations"
                    in capsys.readouterr().out)  # fmt: skip
    assert [r["iteration"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g, w)
    with pytest.raises(CheckpointError, match="trained with a global batch of 2, this run's is "
                                              "4; every data phase needs the same"):  # fmt: skip
        pretrain_tst.main(phased + ["--global-batch-size", "4", "--train-iters", "8"])
    with pytest.raises(ConfigError, match="does not support --rampup-batch-size"):
        sampled = list(base)
        while "--train-iters" in sampled:
            i = sampled.index("--train-iters")
            del sampled[i : i + 2]
        i = sampled.index("--tst-iters")
        sampled[i : i + 2] = ["--tst-fraction", "0.5"]
        validate(parse_args(sampled + ["--phase-transition-iterations", "2", "--train-samples",
                                       "12", "--rampup-batch-size", "2", "2", "4"]), 1, 384)  # fmt: skip
    with pytest.raises(ConfigError, match="give comma-separated steps >= 1"):
        parse_args(base + ["--phase-transition-iterations", "2,x"])


def test_dump_param_to_param_group_map_names_each_parameters_group(tmp_path):
    """--dump-param-to-param-group-map DIR: megatron-core's map of every parameter to its
    optimizer group, read back here; a weight-decayed matrix and an undecayed norm are in
    different groups, every parameter of the model is in it, and the groups are the
    optimizer's (an MoE model: the experts' groups come after the dense ones)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tst.trainer import Trainer

    prefix = _dataset(tmp_path)
    seen, train = {}, Trainer.train

    def spy(self):
        seen["names"] = {n for c in self.raw_chunks for n, _ in c.named_parameters()}
        seen["groups"] = sum(len(o.param_groups) for o in self.optimizer.chained_optimizers)
        return train(self)

    Trainer.train = spy
    try:
        argv = BASE + ["--data-path", prefix, "--train-iters", "2", "--num-experts", "2",
                       "--moe-router-topk", "1", "--moe-router-pre-softmax",
                       "--dump-param-to-param-group-map", str(tmp_path / "map")]  # fmt: skip
        assert pretrain_tst.main(argv) == 0
    finally:
        Trainer.train = train
    dcp_to_torch_save(str(tmp_path / "map"), str(tmp_path / "map.pt"))
    groups = torch.load(tmp_path / "map.pt", weights_only=False)
    by_name = {name.removeprefix("module."): group for name, group in groups.items()}
    assert set(by_name) == seen["names"]
    weight = by_name["decoder.layers.0.self_attention.linear_qkv.weight"]
    norm = by_name["decoder.final_layernorm.weight"]
    expert = by_name["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
    assert weight != norm and expert > max(weight, norm)
    assert set(groups.values()) == set(range(seen["groups"]))


def test_dry_run_offloads_the_experts_inputs_as_megatron_core_keeps_them(tmp_path):
    """expert_fc1 / moe_act offloading (grouped-GEMM experts): the routed copies (k h) and
    the experts' FC1 output (k x 2 f with SwiGLU) per position move to the host column;
    megatron-core offloads the FC1 output under "moe_act" recomputation too (the recompute
    reloads it), and under "moe" recomputation the experts keep nothing to move."""
    argv = [
        "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "10", "--lr", "1e-3",
        "--tst-bag-size", "2", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-ffn-hidden-size", "32", "--moe-grouped-gemm", "--disable-bias-linear",
        "--swiglu", "--fine-grained-activation-offloading", "--offload-modules",
        "expert_fc1", "moe_act", "--min-offloaded-tensor-size", "0", "--dry-run",
        "--dry-run-world-size", "1",
    ]  # fmt: skip

    def host(*extra):
        report = str(tmp_path / "report.json")
        with contextlib.redirect_stdout(io.StringIO()):
            assert pretrain_tst.main(argv + list(extra) + ["--dry-run-report", report]) == 0
        with open(report) as f:
            return json.load(f)["stages"][0]["bytes"]["host_activations"]

    positions = 32 * 2
    per_layer = positions * (2 * 64 + 2 * 2 * 32) * 4  # (k h + k 2 f) per position, fp32
    selective = ["--recompute-granularity", "selective", "--recompute-modules"]
    # Two layers, one micro-batch in flight: one layer's offloaded, one kept.
    assert host() == per_layer
    assert host(*selective, "moe_act") == per_layer
    assert host(*selective, "moe") == 0


def test_profiler_call_stacks(tmp_path):
    """--pytorch-profiler-collect-callstack (Megatron-LM 0.19) makes --profile's trace record
    each operator's Python call stack (the torch profiler's python_function events); without
    it the trace has none. The operators are the same either way. --pytorch-profiler-collect-
    chakra adds torch's execution trace of the same steps."""
    argv = ["--mock-data", *BASE, "--save-interval", "1000", "--profile",
            "--profile-step-start", "2", "--profile-step-end", "3"]  # fmt: skip

    def categories(name, *extra):
        out = tmp_path / name
        with contextlib.redirect_stdout(io.StringIO()):
            assert pretrain_tst.main([*argv, "--tensorboard-dir", str(out), *extra]) == 0
        with open(out / "profile_rank0_steps2-3.json") as f:
            events = json.load(f)["traceEvents"]
        return collections.Counter(e.get("cat") for e in events)

    plain = categories("plain")
    stacks = categories("stacks", "--pytorch-profiler-collect-callstack")
    assert plain["python_function"] == 0 and stacks["python_function"] > 100
    assert plain["cpu_op"] == stacks["cpu_op"] > 100
    # --pytorch-profiler-collect-chakra: torch's execution trace of the same steps beside it,
    # holding the operators the Chrome trace times (its matrix products, one node each).
    chakra = categories("chakra", "--pytorch-profiler-collect-chakra")
    assert not (tmp_path / "plain" / "chakra_rank0_steps2-3.json").exists()
    with open(tmp_path / "chakra" / "chakra_rank0_steps2-3.json") as f:
        nodes = collections.Counter(node["name"] for node in json.load(f)["nodes"])
    with open(tmp_path / "chakra" / "profile_rank0_steps2-3.json") as f:
        ops = collections.Counter(e["name"] for e in json.load(f)["traceEvents"]
                                  if e.get("cat") == "cpu_op")  # fmt: skip
    for name in ("aten::mm", "aten::matmul"):
        assert nodes[name] == ops[name] > 10, name
    assert chakra["cpu_op"] == plain["cpu_op"]


def test_step_batch_size_schedule_counts_samples_as_stepping_through_it_does():
    """The plan's samples-before-step under --step-batch-size-schedule (computed entry by
    entry) equals stepping through the schedule one step at a time (Megatron-LM 0.19's
    calculator: each step's batch is the last entry whose threshold the samples read so far
    reached), over 2,000 random schedules; and the flag's thresholds are tokens."""
    import random

    from tst.config import step_batch_schedule
    from tst.plan import _scheduled_batch, _scheduled_samples

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 5)
        thresholds = [0] + sorted(rng.sample(range(1, 200), n - 1))
        schedule = tuple(zip(thresholds, [rng.randint(1, 30) for _ in range(n)], strict=True))
        consumed = 0
        for step in range(60):
            assert _scheduled_samples(schedule, step) == consumed, (schedule, step)
            consumed += [b for t, b in schedule if consumed >= t][-1]
            assert _scheduled_batch(schedule, consumed) == [b for t, b in schedule
                                                            if consumed >= t][-1]  # fmt: skip
    assert step_batch_schedule("0:384 200B:768 400B:1152", 4096) == (
        (0, 384), (200 * 10**9 // 4096, 768), (400 * 10**9 // 4096, 1152))  # fmt: skip
    assert step_batch_schedule("1.5K:8, 0:4", 1) == ((0, 4), (1500, 8))


def test_rampup_counts_samples_as_stepping_through_it_does():
    """The plan's samples-before-step under --rampup-batch-size (stepped through once and
    kept) equals stepping by Megatron-LM's ramp-up rule at every step, over 200 random
    ramp-ups (start, increment, ramp length, global batch)."""
    import random

    from tst.config import parse_args
    from tst.plan import _rampup_batch, validate

    rng = random.Random(1)
    base = ["--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
            "--lr", "1e-3", "--train-samples", "2000"]  # fmt: skip
    for _ in range(200):
        start, increment = 2 * rng.randint(1, 5), 2 * rng.randint(1, 4)
        gbs, samples = start + increment * rng.randint(0, 6), rng.randint(0, 400)
        plan = validate(parse_args([*base, "--global-batch-size", str(gbs), "--rampup-batch-size",
                                    str(start), str(increment), str(samples)]), 1, 512)  # fmt: skip
        consumed = 0
        for step in range(120):
            assert plan.samples_before(step) == consumed, (start, increment, gbs, samples, step)
            consumed += _rampup_batch((start, increment, samples), gbs, consumed)


def test_no_pad_vocab_size_keeps_the_tokenizers_size(runs, tmp_path):
    """--no-pad-vocab-size (Megatron-LM 0.19): the tokenizer's 390 ids as they are, not
    padded to 512 (--make-vocab-size-divisible-by 128); the default run pads 384 to 384."""
    _, _, path = runs
    argv = [a if a != "384" else "390" for a in BASE]  # --vocab-size 390
    got = _run(
        argv + ["--data-path", str(path / "d_text_document"), "--no-pad-vocab-size"], tmp_path
    )
    assert got["shapes"]["embedding.word_embeddings.weight"] == (390, 32)
    assert [r["iteration"] for r in got["records"] if "loss" in r] == [1, 2, 3, 4]


def test_nvtx_ranges_switch_megatron_cores_markers_while_recording(monkeypatch, tmp_path):
    """--nvtx-ranges (Megatron-LM 0.19): megatron-core's NVTX markers on from the first
    profiled step until the trace is written (configure_nvtx_profiling, spied here: NVTX
    needs CUDA); on a CPU run pretrain_tst.py refuses it by name."""
    from megatron.core import utils as mcore_utils

    from tst.config import parse_args
    from tst.trainer import _Profiler

    calls = []
    monkeypatch.setattr(mcore_utils, "configure_nvtx_profiling", calls.append)
    argv = ["--mock-data", *BASE, "--profile", "--profile-step-start", "2",
            "--profile-step-end", "3", "--tensorboard-dir", str(tmp_path)]  # fmt: skip
    log = parse_args([*argv, "--nvtx-ranges"]).log
    profiler = _Profiler(log, 0, None)
    with contextlib.redirect_stdout(io.StringIO()):
        for iteration in range(4):
            profiler.step_start(iteration)
            assert calls == ([] if iteration < 2 else [True] if iteration == 2 else [True, False])
    assert (tmp_path / "profile_rank0_steps2-3.json").exists()
    plain = _Profiler(parse_args(argv).log, 0, None)
    with contextlib.redirect_stdout(io.StringIO()):
        for iteration in range(4):
            plain.step_start(iteration)
    assert calls == [True, False]
    from trainer_runs import main_error

    message = main_error([*argv, "--nvtx-ranges"], str(tmp_path / "m.jsonl"), (ValueError,))
    assert "--nvtx-ranges marks megatron-core's NVTX ranges" in message and "drop" in message
