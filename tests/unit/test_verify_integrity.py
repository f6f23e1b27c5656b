"""--verify-integrity (Megatron-LM 0.19): every checkpoint file hashed at the save and checked
at the load; --no-ckpt-load-validate-sharding-integrity reaches megatron-core's load.

The hashes are checked against hashlib over the files as written (an independent reference);
the hashing limit is lowered to 0 so that the tiny checkpoints here stand for large ones
(whose files carry only their size without the flag)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import pretrain_tst
from tst import checkpointing
from tst.checkpointing import MANIFEST, CheckpointError, verify, verify_megatron_lm

ARGS = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "4",
    "--train-iters", "4", "--tst-bag-size", "3", "--tst-iters", "1", "--lr", "3e-3",
    "--eval-interval", "1000", "--eval-iters", "1", "--save-interval", "2",
]  # fmt: skip
STOP = ["--exit-interval", "2"]  # the first run saves at step 2 and stops


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


@pytest.fixture
def no_small_files(monkeypatch):
    """Every file counts as large (over the 64 MiB below which files are always hashed)."""
    monkeypatch.setattr(checkpointing, "_HASH_LIMIT", 0)


def test_every_file_hashed_and_a_changed_byte_refused_at_load(tmp_path, no_small_files):
    ckpt = str(tmp_path / "ckpt")
    assert pretrain_tst.main([*ARGS, *STOP, "--save", ckpt, "--verify-integrity"]) == 0
    path = os.path.join(ckpt, "iter_0000002")
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["hashed"] == "all"
    files = sorted(n for d, _, ns in os.walk(path) for n in
                   [os.path.relpath(os.path.join(d, x), path) for x in ns] if n != MANIFEST)  # fmt: skip
    assert sorted(manifest["files"]) == files and len(files) >= 3
    for name in files:  # the hashes are the files' own
        assert manifest["files"][name]["sha256"] == _sha256(os.path.join(path, name))
    shard = os.path.join(path, next(n for n in files if n.endswith(".distcp")))
    _flip_last_byte(shard)  # the same size: only a hash sees it
    verify(path)  # without the flag a large file is checked by its size only
    resume = [*ARGS, "--load", ckpt, "--verify-integrity"]
    with pytest.raises(CheckpointError, match=rf"failed its integrity check.*{shard} "
                                              r"\(contents changed\)"):  # fmt: skip
        pretrain_tst.main(resume)
    _flip_last_byte(shard)  # restored: the run resumes
    assert pretrain_tst.main(resume) == 0


def test_a_checkpoint_saved_without_the_flag_is_refused_by_a_load_with_it(tmp_path, no_small_files):
    ckpt = str(tmp_path / "ckpt")
    assert pretrain_tst.main([*ARGS, *STOP, "--save", ckpt]) == 0
    path = os.path.join(ckpt, "iter_0000002")
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["hashed"] == "small"
    assert not any("sha256" in entry for entry in manifest["files"].values())
    with pytest.raises(CheckpointError, match="was saved without it"):
        pretrain_tst.main([*ARGS, "--load", ckpt, "--verify-integrity"])


def test_megatron_lm_integrity_manifest_is_checked(tmp_path):
    """A checkpoint Megatron-LM 0.19 saved with --verify-integrity carries integrity.json
    ({"algorithm": "sha256", "files": {name: hex digest}}): it is checked file by file."""
    path = tmp_path / "iter_0000010"
    path.mkdir()
    for name, data in (("__0_0.distcp", b"\x00" * 300), ("common.pt", b"abc"),
                       ("metadata.json", b"{}")):  # fmt: skip
        (path / name).write_bytes(data)
    digests = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in os.listdir(path)}
    (path / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": digests}))
    verify_megatron_lm(str(path))
    _flip_last_byte(str(path / "__0_0.distcp"))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp \(contents changed\)"):
        verify_megatron_lm(str(path))
    (path / "common.pt").unlink()
    with pytest.raises(CheckpointError, match=r"common\.pt \(missing\)"):
        verify_megatron_lm(str(path))
    (path / "integrity.json").unlink()
    with pytest.raises(CheckpointError, match="without its integrity manifest"):
        verify_megatron_lm(str(path))


def test_sharding_integrity_check_is_megatron_cores_and_can_be_skipped(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    seen = []
    load = dist_checkpointing.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("validate_access_integrity"))
        return load(*args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "load", spy)
    ckpt = str(tmp_path / "ckpt")
    assert pretrain_tst.main([*ARGS, *STOP, "--save", ckpt]) == 0
    resume = [*ARGS, "--load", ckpt]
    assert pretrain_tst.main(resume) == 0
    assert pretrain_tst.main([*resume, "--no-ckpt-load-validate-sharding-integrity",
                              "--save", str(tmp_path / "other")]) == 0  # fmt: skip
    assert seen == [True, False]


def test_async_strategy_names_the_writer(tmp_path):
    """--async-strategy (Megatron-LM 0.19): mcore is the writer --async-save runs here, so it
    saves as without the flag, silently; nvrx (NVIDIA's resiliency-extension writer, not
    wired here) warns that megatron-core's writer wrote; without --async-save neither warns."""
    import warnings

    for strategy, warns in ((None, False), ("mcore", False), ("nvrx", True)):
        ckpt = str(tmp_path / f"ckpt-{strategy}")
        extra = [] if strategy is None else ["--async-strategy", strategy]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert pretrain_tst.main([*ARGS, *STOP, "--save", ckpt, "--async-save", *extra]) == 0
        said = any("--async-strategy nvrx" in str(w.message) for w in seen)
        assert said == warns, strategy
        verify(os.path.join(ckpt, "iter_0000002"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert pretrain_tst.main([*ARGS, *STOP, "--async-strategy", "nvrx"]) == 0
    assert not any("--async-strategy" in str(w.message) for w in seen)
