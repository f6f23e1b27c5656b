"""Resumable checkpoints through megatron-core ``dist_checkpointing``, written atomically.

Layout under ``--save``::

    iter_0000100/                 one complete checkpoint (dist_checkpointing format)
    latest_checkpointed_iteration.txt   the newest complete one, replaced atomically
    non_persistent/               --non-persistent-ckpt-type global: the same layout, the
                                  newest checkpoint only


A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed into place only after every
rank has finished writing; then the tracker file is replaced through a rename. A save
killed at any moment leaves the previous checkpoint and tracker intact. Sharded tensors
carry global names, so a checkpoint loads under another TP / PP layout.

Another trainer's checkpoints start a run from their weights (--finetune): Megatron-LM's
legacy per-rank files (:mod:`tst.legacy_checkpoint`, also as a "release" checkpoint) and
torch_dist checkpoints Megatron-LM saved (:func:`megatron_lm_saved`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import warnings

import torch
import torch.distributed as dist

from tst import legacy_checkpoint
from tst.errors import RunError
from tst.fsdp import (
    load_sharded_state,
    mark_shards,
    reshard_optimizer_state,
    shard_loaded_main_params,
)

__all__ = ["TRACKER", "checkpoint_dir", "finalize_async_saves", "find_checkpoint", "latest_iteration",
           "load", "optimizer_layout", "resume_dir", "save", "wait_for_retired"]  # fmt: skip

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's state format: megatron-core's "dp_reshardable" (sharded by
# data-parallel rank) unless --dist-ckpt-optim-fully-reshardable asks for "fully_reshardable"
# (gathered into model space: reshards over every layout). Its default format is refused by
# dist_checkpointing 0.16.
_GRID_KEYS = ("tp", "pp", "vpp", "ep", "etp")


def _optimizer_metadata(layout: dict | None) -> dict:
    """megatron-core's sharded-state metadata for the format ``layout`` names (the one a
    checkpoint was saved in, when loading)."""
    fmt = (layout or {}).get("format", "dp_reshardable")
    metadata = {"distrib_optim_sharding_type": fmt}
    if fmt == "fully_reshardable":
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = bool(
            layout.get("mem_efficient", False)
        )
    return metadata


class CheckpointError(RunError):
    """A checkpoint that cannot be loaded; the message names the files and the fix."""


# A Megatron-LM "release" checkpoint (legacy format; its tracker says "release").
RELEASE = -1


def checkpoint_dir(root: str, iteration: int) -> str:
    if iteration == RELEASE:
        return os.path.join(root, legacy_checkpoint.RELEASE)
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    """Whether ``path`` holds a finished checkpoint: this trainer's (dist_checkpointing's
    metadata.json) or a Megatron-LM legacy one (its per-rank folders)."""
    return os.path.isfile(os.path.join(path, "metadata.json")) or legacy_checkpoint.is_legacy(path)


def is_legacy(root: str, iteration: int) -> bool:
    """Whether ``root``'s checkpoint of ``iteration`` is in Megatron-LM's legacy format."""
    return legacy_checkpoint.is_legacy(checkpoint_dir(root, iteration))


def latest_iteration(root: str) -> int:
    """The iteration recorded in ``root``'s tracker file, checked against the directory."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(
            f"--load {root}: no {TRACKER} there, so no complete checkpoint was saved in this "
            "directory (check the path)"
        )
    with open(tracker) as f:
        text = f.read().strip()
    if text == legacy_checkpoint.RELEASE:
        path = checkpoint_dir(root, RELEASE)
        if not legacy_checkpoint.is_legacy(path):
            raise CheckpointError(
                f"{tracker} names a release checkpoint but {path} holds none (no mp_rank_* "
                "folders): restore that directory or point the tracker at an iteration"
            )
        return RELEASE
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number")
    iteration = int(text)
    path = checkpoint_dir(root, iteration)
    if not is_complete(path):
        raise CheckpointError(
            f"{tracker} names iteration {iteration} but {path} is missing or incomplete "
            "(no metadata.json); restore that directory or point the tracker at an older one"
        )
    return iteration


def _save_failure(root: str, tmp: str, error: Exception) -> str:
    """Why a save failed, in the user's terms, and the fix for that cause: a full disk is named
    as such, a permission problem as such; anything else (a checkpoint writer process that
    died, a broken pipe to it) is not a disk problem and is not advised as one."""
    free = shutil.disk_usage(root).free if os.path.isdir(root) else None
    cause = f"{type(error).__name__}: {error}"
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in cause
    if full or free is not None and free < 64 * 2**20:
        cause = f"no space left on the device of {root} ({(free or 0) / 2**20:.0f} MiB free)"
        fix = "free space or point --save elsewhere"
    elif isinstance(error, PermissionError):
        fix = f"make {root} writable for this user or point --save elsewhere"
    elif isinstance(error, (BrokenPipeError, ConnectionError, EOFError)):
        fix = (
            "a checkpoint writer process ended early (was it sent a signal, or killed for "
            "memory?); resume with --load and save again"
        )
    elif isinstance(error, OSError):
        fix = f"check the file system of {root} (the error above) or point --save elsewhere"
    else:
        fix = "the error above is the writer's own; resume with --load and save again"
    return (
        f"saving a checkpoint into {root} failed ({cause}); the staging folder {tmp} was "
        f"removed and the previous checkpoint is intact: {fix}"
    )


def check_writable(root: str) -> None:
    """Refuse an unwritable --save at start, not at the first save hours later."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(
            f"--save {root} is not writable ({error.strerror}): fix its permissions or point "
            "--save elsewhere"
        ) from None


def find_checkpoint(root: str, flag: str = "--load") -> int | None:
    """The latest complete checkpoint's iteration, or None when ``root`` holds none at all.

    "None at all" is a missing directory, or one with no tracker and no finished
    ``iter_*`` directory (a first save killed before it completed leaves only its ``.tmp``
    staging folder). Finished checkpoints without a tracker, or a tracker naming a damaged
    one, are refused by name: they are data to restore, never a reason to start afresh.
    """
    if not os.path.isdir(root):
        return None
    if not os.path.isfile(os.path.join(root, TRACKER)):
        finished = sorted(
            name for name in os.listdir(root)
            if name.startswith("iter_") and not name.endswith((".tmp", _RETIRED))
        )  # fmt: skip
        if finished:
            raise CheckpointError(
                f"{flag} {root}: {len(finished)} checkpoint folder(s) ({', '.join(finished[-3:])})"
                f" but no {TRACKER}: write the iteration to resume from into {TRACKER} there"
            )
        return None
    return latest_iteration(root)


def resume_dir(load: str, non_persistent: str | None) -> tuple[str, str | None]:
    """The folder a ``--load`` resumes from, and a line saying why when it is not ``load``'s
    own or when a non-persistent checkpoint is passed over: with ``non_persistent``
    (``--non-persistent-ckpt-type global``'s folder) holding a checkpoint at least as new as
    ``load``'s latest, that folder (Megatron-LM's rule: a tie goes to the non-persistent
    one, as a run saves only one of the two at a step). Damaged folders are refused by
    :func:`find_checkpoint` either way."""
    if non_persistent is None:
        return load, None
    fresh = find_checkpoint(non_persistent, "--non-persistent-global-ckpt-dir")
    if fresh is None:
        return load, None
    kept = find_checkpoint(load)
    if kept is None or fresh >= kept:
        return non_persistent, (
            f"--load {load}: resuming from the non-persistent checkpoint of iteration {fresh} "
            f"in {non_persistent}"
            + (f" (the latest persistent one is of iteration {kept})" if kept is not None else "")
        )
    return load, (
        f"--load {load}: the non-persistent checkpoint in {non_persistent} (iteration {fresh}) "
        f"is older than the persistent one (iteration {kept}): resuming from the persistent one"
    )


def load_dir(load: str | None, kind: str | None, folder: str | None,
             ckpt_step: int | None) -> tuple[str | None, str | None]:  # fmt: skip
    """The folder a run's --load reads (:func:`resume_dir`'s answer, with its line): with
    --non-persistent-ckpt-type the newer of ``load`` and its non-persistent folder (``folder``
    or ``LOAD/non_persistent``); without it, or with --ckpt-step (a persistent checkpoint),
    ``load`` itself."""
    if not load or not kind or ckpt_step is not None:
        return load, None
    from tst.config import non_persistent_dir

    return resume_dir(load, non_persistent_dir(load, folder))


MANIFEST = "tst_manifest.json"
# Files up to this size are also checksummed (metadata, common state, small shards); larger
# ones are checked by size, which catches truncation without reading terabytes at start-up.
_HASH_LIMIT = 64 * 2**20


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digests(path: str, names: list[str]) -> dict[str, str]:
    """SHA-256 of ``path``'s files ``names``, each read by one rank (the files are shared
    out in turn over the ranks, then gathered): every rank gets all of them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {name: _file_digest(os.path.join(path, name)) for name in names}
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {name: _file_digest(os.path.join(path, name)) for name in names[rank::world]}
    shares: list = [None] * world
    dist.all_gather_object(shares, mine)
    return {name: digest for share in shares for name, digest in share.items()}


def _write_manifest(path: str, hash_all: bool = False) -> None:
    """Record every file of the finished checkpoint with its size and the hash of each file
    up to 64 MiB (``hash_all``, --verify-integrity: of every file). Collective where the
    process group is up: the ranks share the hashing; rank 0 writes the manifest."""
    sizes = {}
    for directory, _, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    hashed = sorted(n for n, size in sizes.items() if hash_all or size <= _HASH_LIMIT)
    digests = _digests(path, hashed)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    files = {name: {"size": size, **({"sha256": digests[name]} if name in digests else {})}
             for name, size in sorted(sizes.items())}  # fmt: skip
    manifest = os.path.join(path, MANIFEST)
    with open(manifest, "w") as f:
        json.dump({"files": files, "hashed": "all" if hash_all else "small"}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str, every: bool = False) -> None:
    """Refuse a checkpoint whose files are missing, truncated or altered since it was saved:
    sizes, and the hashes of the files up to 64 MiB (``every``, --verify-integrity: of every
    file, which the save must have hashed). Collective where the process group is up: the
    ranks share the hashing."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        raise CheckpointError(
            f"{path} has no {MANIFEST}: it was not completed by this trainer's save; "
            "restore it or point the tracker at an older checkpoint"
        )
    with open(manifest) as f:
        saved = json.load(f)
    files = saved["files"]
    if every and saved.get("hashed") != "all":
        raise CheckpointError(
            f"--verify-integrity: checkpoint {path} was saved without it, so its files over "
            "64 MiB carry no hash to check: load it without --verify-integrity (sizes and the "
            "smaller files' hashes are still checked), and save with the flag from then on"
        )
    bad, broken = [], set()
    for name, entry in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            bad.append(f"{full} (missing)")
        elif os.path.getsize(full) != entry["size"]:
            bad.append(f"{full} ({os.path.getsize(full)} bytes, saved {entry['size']})")
        else:
            continue
        broken.add(name)
    bad += _changed(path, {name: entry["sha256"] for name, entry in files.items()
                           if "sha256" in entry and (every or entry["size"] <= _HASH_LIMIT)
                           and name not in broken})  # fmt: skip
    if bad:
        _refuse_damaged(path, bad, "point the tracker at an older checkpoint")


def _changed(path: str, expected: dict[str, str]) -> list[str]:
    """The files of ``expected`` (name -> SHA-256) whose contents differ from it, one line
    each. Collective where the process group is up (the ranks share the hashing): every rank
    passes the same names."""
    names = sorted(expected)
    digests = _digests(path, names)
    return [f"{os.path.join(path, name)} (contents changed)" for name in names
            if digests[name] != expected[name]]  # fmt: skip


def _refuse_damaged(path: str, bad: list[str], other: str) -> None:
    raise CheckpointError(
        f"checkpoint {path} failed its integrity check, nothing was loaded: "
        + "; ".join(bad)
        + f". Restore these files, or {other}."
    )


def verify_megatron_lm(path: str) -> None:
    """--verify-integrity on a checkpoint Megatron-LM saved: its own manifest (``integrity
    .json``, Megatron-LM 0.19's SHA-256 of every file) checked the same way; one saved
    without it is refused, as Megatron-LM refuses it."""
    manifest = os.path.join(path, "integrity.json")
    if not os.path.isfile(manifest):
        raise CheckpointError(
            f"--verify-integrity: checkpoint {path} was saved by Megatron-LM without its "
            "integrity manifest (integrity.json, written by Megatron-LM 0.19's --verify-"
            "integrity): there is nothing to check it against; load it without the flag"
        )
    with open(manifest) as f:
        saved = json.load(f)
    if saved.get("algorithm", "sha256") != "sha256":
        raise CheckpointError(f"{manifest}: hash algorithm {saved['algorithm']!r}, not sha256")
    files = saved["files"]
    missing = [n for n in sorted(files) if not os.path.isfile(os.path.join(path, n))]
    bad = [f"{os.path.join(path, n)} (missing)" for n in missing]
    bad += _changed(path, {n: digest for n, digest in files.items() if n not in missing})
    if bad:
        _refuse_damaged(path, bad, "load another checkpoint")


def _sharded_model_state(chunks) -> dict:
    """The model chunks' sharded state, with the metadata Megatron-LM passes: a stage that
    holds the MTP block but not the input embedding ties its copy of the embedding to the
    first stage's over the data-parallel group (megatron-core reads the group from it)."""
    metadata = {"dp_cp_group": _dp_group(), "singleton_local_shards": False}
    for chunk in chunks:
        mark_shards(chunk)  # FSDP2's shards say so to the SwiGLU entries (tst.megatron_fixes)
    return {f"model{i}": chunk.sharded_state_dict(metadata=metadata)
            for i, chunk in enumerate(chunks)}  # fmt: skip


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy(fully_parallel: bool, cached: bool = False):
    """megatron-core's torch_dist writer; fully parallel: each data-parallel replica writes a
    share of the replicated tensors instead of DP rank 0 writing them all. ``cached``
    (--ckpt-assume-constant-structure): the writer keeps its plans and global metadata for
    the next save, and the fully parallel wrapper its distribution of the shares."""
    parallel = fully_parallel and dist.get_world_size(_dp_group()) > 1
    if not parallel and not cached:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy()
    strategy.use_cached_ckpt_structure = cached
    if not parallel:
        return strategy
    return FullyParallelSaveStrategyWrapper(strategy, _dp_group(), cached)


def _load_strategy(path: str, fully_parallel: bool, exchange_algo: str = "broadcast"):
    """Fully parallel: each replica reads a share and they exchange the rest, by
    ``exchange_algo`` (--ckpt-fully-parallel-load-exchange-algo: megatron-core's broadcast,
    gather_rounds or gather_object)."""
    if not fully_parallel or dist.get_world_size(_dp_group()) == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(path), _dp_group(), exchange_algo=exchange_algo
    )


def save(
    root: str,
    iteration: int,
    chunks,
    optimizer,
    common: dict,
    fully_parallel: bool = False,
    async_queue=None,
    retain_interval: int | None = None,
    structure_cache: dict | None = None,
    newest_only: bool = False,
    hash_all: bool = False,
) -> str:
    """Write checkpoint ``iteration`` under ``root`` (collective: every rank calls it).

    The shards go to a staging folder ``iter_N.tmp``, which becomes ``iter_N`` (and the tracker
    names it) only once every rank has written all of its shards, so a kill at any moment
    leaves the previous checkpoint the latest. With ``async_queue`` (megatron-core's
    ``AsyncCallsQueue``, ``--async-save``) the shards are written by a forked writer process
    per rank, from the state as it was at this call, while training goes on; the rename and
    the tracker update are the request's finalisation, which runs when the trainer next
    finalises the queue after every rank's writer is done.

    ``retain_interval`` (``--save-retain-interval``): once this checkpoint is the latest, the
    one the tracker named before it goes, unless its iteration is a multiple of the interval
    (or it is a symbolic link), as Megatron-LM does.

    ``structure_cache`` (``--ckpt-assume-constant-structure``): a dict kept by the caller
    between saves; the first save builds the writer into it and checks the sharding, later
    ones reuse the writer (megatron-core reuses its plans once two saves agree) unchecked,
    as Megatron-LM's ``checkpointing_context`` does.

    ``newest_only`` (non-persistent checkpoints): once this checkpoint is the latest, every
    other one under ``root`` goes (Megatron-LM removes them before the save; here only after
    it, so a kill during the save leaves the previous one to resume from).

    ``hash_all`` (``--verify-integrity``): the manifest holds every file's hash, not only
    those of the files up to 64 MiB.
    """
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a previous save that was killed
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_model_state(chunks)
    if optimizer is not None:  # None: the weights only (--no-save-optim)
        metadata = _optimizer_metadata(common.get("optimizer_layout"))
        # Before the first applied step (fp16 skips the steps whose gradients overflow)
        # Adam holds no state: megatron-core's distributed optimizer cannot save that, and
        # the others save a checkpoint without moments that cannot be resumed. Zero moments
        # at step 0 are what Adam starts from, so saving them changes nothing.
        _allocate_empty_adam_state(optimizer, distributed_only=False)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    state["common"] = common
    end_helpers_with_the_trainer()
    validate = True
    if structure_cache is None:
        strategy = _save_strategy(fully_parallel)
    elif "strategy" in structure_cache:
        strategy, validate = structure_cache["strategy"], False
    else:
        strategy = structure_cache["strategy"] = _save_strategy(fully_parallel, cached=True)
    if async_queue is not None and strategy is None:
        from megatron.core.dist_checkpointing.serialization import (
            get_default_save_sharded_strategy,
        )

        strategy = get_default_save_sharded_strategy()  # torch_dist: it can save asynchronously
    try:
        request = dist_checkpointing.save(
            state, tmp, sharded_strategy=strategy, async_sharded_save=async_queue is not None,
            validate_access_integrity=validate,
        )  # fmt: skip
    except Exception as error:  # the writers' own message rarely names the cause
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failure(root, tmp, error)) from error
    if request is None:
        _maybe_inject_kill("kill-during-save")
        _complete(root, iteration, tmp, final, retain_interval, newest_only, hash_all)
        return final
    request.add_finalize_fn(
        lambda: _complete(root, iteration, tmp, final, retain_interval, newest_only, hash_all)
    )
    async_queue.schedule_async_request(request)
    # With a complete checkpoint before it, so that the test sees that one survive.
    if os.path.exists(os.path.join(root, TRACKER)):
        _maybe_inject_kill("kill-during-async-save")
    return final


def end_helpers_with_the_trainer() -> None:
    """megatron-core's ``FileSystemWriterAsync`` (the ``torch_dist`` format) starts helper
    processes that stop only when the trainer lets them, so a trainer killed with SIGKILL
    (seen under torchrun's restarts) left them behind for good, one set per killed rank:

    - the spawned multiprocessing manager serving its writers' result queue (started at the
      first save, stopped only at the trainer's clean exit);
    - a forked writer that finishes while its trainer is dead: ``task_done`` on the count
      queue waits for the (dead) trainer to acknowledge, forever.

    Both now also end once the process that started them is gone (idempotent; the same queue
    and the same writer otherwise). Nothing is lost: the trainer publishes checkpoints."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._get_write_results_queue is not _write_results_queue:
        filesystem_async._get_write_results_queue = _write_results_queue
    writer = filesystem_async.FileSystemWriterAsync
    if not getattr(writer.write_preloaded_data, "_tst_ends_with_parent", False):
        writer.write_preloaded_data = staticmethod(_ending_with_parent(writer.write_preloaded_data))


def use_persistent_writer_loop() -> None:
    """``--use-persistent-ckpt-worker``: megatron-core spawns its long-lived writer with
    ``PersistentAsyncCaller.async_loop``; hand it :func:`persistent_writer_loop` instead, which
    the writer imports by name, and spawn it with the stop signals blocked (a stop signal
    while it imports would end it before it ignores them; idempotent)."""
    from megatron.core.dist_checkpointing.strategies import async_utils

    caller = async_utils.PersistentAsyncCaller
    if caller.__dict__.get("async_loop") is not _PERSISTENT_LOOP:
        caller.async_loop = _PERSISTENT_LOOP
    schedule = caller.schedule_async_call
    if getattr(schedule, "_tst_blocks_stop_signals", False):
        return

    def schedule_async_call(self, async_req):
        from tst.processes import stop_signals_blocked

        if self.process is None and async_req.async_fn is not None:  # this call spawns it
            with stop_signals_blocked():
                return schedule(self, async_req)
        return schedule(self, async_req)

    schedule_async_call._tst_blocks_stop_signals = True
    caller.schedule_async_call = schedule_async_call


def persistent_writer_loop(rank, queue, preload_q, comp_q, log_level=logging.INFO):
    """The persistent writer's process: megatron-core's loop, waiting on its queue for the
    next save, would outlive a trainer killed with SIGKILL (holding its GPU context), and so
    would the writers it forks; both end with the trainer here. A stop signal sent to the
    whole process group (or a Slurm step) is left to the trainer, whose stop-save needs this
    process. Without CUDA, the platform layer is applied in this process first."""
    from megatron.core.dist_checkpointing.strategies import async_utils

    from tst.processes import parent_pid, serve_the_trainer

    loop = async_utils.PersistentAsyncCaller.async_loop  # megatron-core's: a fresh process
    if loop is persistent_writer_loop:
        raise RuntimeError("persistent_writer_loop: megatron-core's writer loop was replaced "
                           "in the writer's own process; it must run megatron-core's")  # fmt: skip
    serve_the_trainer(parent_pid())  # the trainer, even if it died while this one started
    end_helpers_with_the_trainer()
    if not torch.cuda.is_available():
        from tst import cpu_compat

        cpu_compat.prepare_persistent_writer()
    loop(rank, queue, preload_q, comp_q, log_level)


_PERSISTENT_LOOP = staticmethod(persistent_writer_loop)


def _write_results_queue():
    """megatron-core's result queue, served by a manager that ends with the trainer and
    leaves a stop signal sent to the whole process group to it (the stop-save that follows
    puts its results here; a killed manager failed that save with BrokenPipeError)."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from tst.processes import serve_the_trainer, stop_signals_blocked

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        with stop_signals_blocked():  # until the manager ignores them: it starts mid-stop
            manager.start(initializer=serve_the_trainer, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    return filesystem_async._results_queue


def _ending_with_parent(write):
    import functools

    from tst.processes import exit_with_parent, parent_pid

    @functools.wraps(write)  # keeps the signature megatron-core inspects
    def write_in_child(*args, **kwargs):
        exit_with_parent(parent_pid())  # recorded before the fork: never the reaper's
        return write(*args, **kwargs)

    write_in_child._tst_ends_with_parent = True
    return write_in_child


def _maybe_inject_kill(point: str) -> None:
    """Fault-injection tests: die with the shards written (or, under --async-save, being
    written by the writer processes) but the checkpoint not yet complete (no manifest, not
    renamed, tracker untouched). The writer processes die too, as they would with a killed
    job."""
    if os.environ.get("TST_FAULT_INJECTION") != point:
        return
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _complete(root: str, iteration: int, tmp: str, final: str,
              retain_interval: int | None = None, newest_only: bool = False,
              hash_all: bool = False) -> None:  # fmt: skip
    """Publish a fully written staging folder: manifest, rename, tracker (collective); then,
    with ``retain_interval``, retire the checkpoint the tracker named before, and with
    ``newest_only`` every other checkpoint in ``root``."""
    dist.barrier()
    _write_manifest(tmp, hash_all)  # the ranks share the hashing
    if dist.get_rank() == 0:
        previous = _tracked_iteration(root) if retain_interval else None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        # Only an earlier one: after a --ckpt-step rewind the tracker named a later one.
        if previous and previous < iteration and previous % retain_interval:
            _retire(root, previous)
        if newest_only:
            for other in _saved_iterations(root):
                if other != iteration:
                    _retire(root, other, "non-persistent: only the newest is kept")
    dist.barrier()


def _saved_iterations(root: str) -> list[int]:
    """The iterations of the checkpoint folders (``iter_N``) under ``root``."""
    names = [n.removeprefix("iter_") for n in os.listdir(root) if n.startswith("iter_")]
    return sorted(int(n) for n in names if n.isdigit())


_RETIRING: list = []  # the deletions in flight (threads)
_RETIRED = ".deleting"  # a retired checkpoint's folder while its files go


def wait_for_retired() -> None:
    """Wait until the retired checkpoints are gone (the run's end)."""
    while _RETIRING:
        _RETIRING.pop().join()


def _tracked_iteration(root: str) -> int | None:
    """The iteration the tracker names now, if it names one (no checks: see latest_iteration)."""
    try:
        with open(os.path.join(root, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _retire(root: str, iteration: int, why: str = "--save-retain-interval") -> None:
    """Delete checkpoint ``iteration`` (``why``: --save-retain-interval, or a non-persistent
    checkpoint a newer one replaced), which is no longer the latest. It is first renamed out of the ``iter_N`` names (one atomic step), so a run killed
    while the files go never finds a half-deleted checkpoint; the files go in a background
    thread, which the process waits for before it exits. A symbolic link is left alone."""
    import threading

    path = checkpoint_dir(root, iteration)
    if os.path.islink(path):
        print(f"{why}: {path} is a symbolic link: left in place", flush=True)
        return
    doomed = path + _RETIRED
    try:
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
    except OSError as error:  # not fatal: the run goes on, the checkpoint stays
        print(f"{why}: could not delete {path}: {error}", flush=True)
        return
    # With what an earlier run killed mid-deletion left.
    doomed_all = [os.path.join(root, n) for n in os.listdir(root) if n.endswith(_RETIRED)]

    def delete() -> None:
        for folder in doomed_all:
            shutil.rmtree(folder, ignore_errors=True)

    thread = threading.Thread(target=delete, name="tst-retire")
    thread.start()
    _RETIRING.append(thread)
    print(f"deleted checkpoint {path} (iteration {iteration}; {why})", flush=True)


def finalize_async_saves(async_queue, blocking: bool) -> list[int]:
    """Finalise the asynchronous saves whose writers are done on every rank (collective: one
    all-reduce per pending save); ``blocking`` waits for all. A writer's failure is raised on
    every rank as a :class:`CheckpointError` naming the cause; the staging folder stays until
    the next save of that iteration replaces it, and the previous checkpoint stays the latest.
    """
    if async_queue is None or not async_queue.get_num_unfinalized_calls():
        return []
    try:
        return async_queue.maybe_finalize_async_calls(blocking=blocking)
    except Exception as error:
        raise CheckpointError(
            f"an asynchronous checkpoint save failed: {error}. The previous checkpoint is "
            "still the latest; check the disk (space, permissions) or drop --async-save"
        ) from error


def step_iteration(root: str, iteration: int) -> int:
    """``--ckpt-step``: that iteration's checkpoint under ``root``, which must be complete."""
    path = checkpoint_dir(root, iteration)
    if not is_complete(path):
        finished = sorted(
            int(name[len("iter_"):]) for name in (os.listdir(root) if os.path.isdir(root) else [])
            if name.startswith("iter_") and name[len("iter_"):].isdigit()
            and is_complete(os.path.join(root, name))
        )  # fmt: skip
        raise CheckpointError(
            f"--ckpt-step {iteration}: {root} holds no complete checkpoint of that iteration "
            f"(complete ones: {', '.join(map(str, finished)) or 'none'})"
        )
    return iteration


def checkpoint_path(root: str, step: int | None = None) -> str:
    """The directory of ``root``'s latest complete checkpoint, or of ``step``'s
    (``--ckpt-step``)."""
    return checkpoint_dir(root, latest_iteration(root) if step is None
                          else step_iteration(root, step))  # fmt: skip


def load(root: str, chunks, optimizer, fully_parallel: bool = False,
         optimizer_layout: dict | None = None, iteration: int | None = None,
         strictness: str = "assume_ok_unexpected", report=print, verify_all: bool = False,
         validate_sharding: bool = True, exchange_algo: str = "broadcast") -> dict:  # fmt: skip
    """Load the latest complete checkpoint (or ``iteration``'s, ``--ckpt-step``) into
    ``chunks`` and ``optimizer`` (None: the weights only); return its common state
    (iteration, data position, scheduler, ...). ``optimizer_layout`` (this run's
    :func:`optimizer_layout`) is checked against the one the checkpoint was saved with
    before the optimizer state is read. A checkpoint without optimizer state is refused
    unless --moe-use-upcycling saved it (before any step): then only the weights load, and
    the common state it returns says ``upcycled``. ``strictness`` (--dist-ckpt-strictness)
    decides what a model tensor the checkpoint lacks, or a checkpoint tensor the model
    lacks, does (:func:`_check_keys`); ``report`` prints what was let through (rank 0).
    ``verify_all`` (--verify-integrity) checks every file's hash before anything is read;
    ``validate_sharding`` False (--no-ckpt-load-validate-sharding-integrity) skips megatron-
    core's check that each shard is read as the main replica by exactly one rank;
    ``exchange_algo`` is how a fully parallel load shares what each replica read."""
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = latest_iteration(root)
    else:
        iteration = step_iteration(root, iteration)
    path = checkpoint_dir(root, iteration)
    legacy = legacy_checkpoint.is_legacy(path)
    foreign = legacy or megatron_lm_saved(path)
    if foreign and optimizer is not None:  # the trainer asks for the weights only
        raise CheckpointError(
            f"checkpoint {path} was saved by Megatron-LM: its weights are read, not its "
            "optimizer state: pass --finetune"
        )
    if not foreign:
        verify(path, every=verify_all)
    elif verify_all:
        verify_megatron_lm(path)
    if legacy:
        return _load_legacy(path, chunks, iteration, report, strictness)
    template = _sharded_model_state(chunks)
    _allow_optimizer_classes()
    saved_tensors = dist_checkpointing.load_tensors_metadata(path)
    _check_shapes(template, path, saved_tensors)
    absent = _check_keys(template, path, saved_tensors, strictness, optimizer is not None, report)
    if optimizer is not None and not any(
        key.startswith(_OPTIMIZER_PREFIXES) for key in saved_tensors
    ):
        if not saved_common_state(path).get("upcycled"):
            raise CheckpointError(
                f"checkpoint {path} holds no optimizer state (saved with --no-save-optim): pass "
                "--no-load-optim to load the weights and start the optimizer state fresh"
            )
        optimizer = None  # saved by --moe-use-upcycling before any step: no state exists yet
    if optimizer is not None:
        saved_layout = _saved_optimizer_layout(path)  # loaded in the format it was saved in
        if optimizer_layout is not None:
            _check_optimizer_layout(path, optimizer_layout, saved_layout)
        _allocate_empty_adam_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(
            template, is_loading=True, metadata=_optimizer_metadata(saved_layout)
        )
    try:
        with warnings.catch_warnings():
            # torch's per-rank notice that ShardedTensor is deprecated: nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
            state = dist_checkpointing.load(
                template, path,
                sharded_strategy=_load_strategy(path, fully_parallel, exchange_algo),
                # Tensors the checkpoint lacks (let through by _check_keys) are left out of
                # the request; the report was made there.
                strict="return_unexpected" if absent else "assume_ok_unexpected",
                validate_access_integrity=validate_sharding,
            )  # fmt: skip
        if absent:
            state = state[0]
    except Exception as error:  # report which checkpoint failed, then the cause
        raise CheckpointError(f"could not load checkpoint {path}: {error}") from error
    for i, chunk in enumerate(chunks):
        result = load_sharded_state(chunk, state[f"model{i}"], strict=not absent)
        if result.unexpected_keys:  # entries the module does not have: never let through
            raise CheckpointError(f"checkpoint {path}: model chunk {i} was given entries it "
                                  f"does not have: {sorted(result.unexpected_keys)[:4]}")  # fmt: skip
    if optimizer is not None:
        _restore_step_zero(state["optimizer"])
        shard_loaded_main_params(optimizer, state["optimizer"])
        with torch.no_grad():  # the distributed optimizer copies into leaf parameters
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer, state["optimizer"])
        reshard_optimizer_state(optimizer)
    if foreign:
        report(f"read the weights of {path} (a torch_dist checkpoint Megatron-LM saved, "
               f"iteration {state.get('iteration')}; no manifest of this trainer's to check "
               "its files against)")  # fmt: skip
        iteration = state.get("iteration")
        return {"iteration": iteration if isinstance(iteration, int) else 0, "megatron_lm": True}
    return state["common"]  # the non-sharded entries come back with the sharded ones


def _load_legacy(path: str, chunks, iteration: int, report,
                 strictness: str = "assume_ok_unexpected") -> dict:  # fmt: skip
    """The weights of Megatron-LM legacy checkpoint ``path`` into ``chunks``
    (:mod:`tst.legacy_checkpoint`); the common state says the iteration and ``legacy``.
    Every tensor must match, whatever ``strictness`` says: Megatron-LM reads its legacy
    files with ``load_state_dict(strict=True)`` too (--dist-ckpt-strictness is for
    torch_dist), and a refusal says so when the flag was given."""
    from megatron.core import parallel_state as ps

    experts = any(getattr(chunk.config, "num_moe_experts", None) for chunk in chunks)
    ep = ps.get_expert_model_parallel_world_size() if experts else 1
    try:
        saved = legacy_checkpoint.load(
            path, chunks, ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_rank() if experts else 0, ep,
        )  # fmt: skip
    except legacy_checkpoint.LegacyCheckpointError as error:
        note = ""
        if strictness != "assume_ok_unexpected" and "does not fit this model" in str(error):
            note = (f" (--dist-ckpt-strictness {strictness} applies to torch_dist checkpoints; "
                    "Megatron-LM reads legacy files strictly too)")  # fmt: skip
        raise CheckpointError(str(error) + note) from None
    if iteration == RELEASE:
        saved["iteration"] = 0  # Megatron-LM's iteration of a release checkpoint
    report(
        f"read the weights of {path} (Megatron-LM's legacy torch format, checkpoint version "
        f"{saved['checkpoint_version']}"
        + ("; its optimizer state is not read" if saved["optimizer"] else "")
        + "; Transformer Engine FP8 scaling history, if any, starts fresh)"
    )
    return {"iteration": saved["iteration"], "legacy": True}


def optimizer_layout(distributed: bool, tp: int, pp: int, vpp, ep: int, etp: int,
                     fully_reshardable: bool = False, mem_efficient: bool = False,
                     first_chunk_apart: bool = False) -> dict:  # fmt: skip
    """What the optimizer state's checkpoint format depends on (stored in the common state).

    The distributed optimizer's state is saved in megatron-core's ``dp_reshardable`` format,
    which reshards over data parallelism only, or with ``fully_reshardable``
    (--dist-ckpt-optim-fully-reshardable) in its ``fully_reshardable`` one: gathered into the
    model's parameter space at save (on every data-parallel rank, or over gloo onto the first
    with ``mem_efficient``), it reshards over every layout. The plain optimizer's state is per
    parameter and reshards anywhere. ``first_chunk_apart``
    (--overlap-param-gather-with-optimizer-step): the first model chunk's state is stepped,
    and saved, by an optimizer of its own (megatron-core's ``chained_0`` / ``chained_1``
    keys), which a run without it cannot read, nor the reverse.
    """
    layout = {"distributed_optimizer": bool(distributed), "tp": tp, "pp": pp, "vpp": vpp,
              "ep": ep, "etp": etp}  # fmt: skip
    if distributed:
        layout["format"] = "fully_reshardable" if fully_reshardable else "dp_reshardable"
        if fully_reshardable:
            layout["mem_efficient"] = bool(mem_efficient)
        if first_chunk_apart:
            layout["first_chunk_apart"] = True
    return layout


def megatron_lm_saved(path: str) -> bool:
    """Whether torch_dist checkpoint directory ``path`` was saved by Megatron-LM (or another
    megatron-core trainer) rather than by this one: no manifest of this trainer's, and a
    common state with Megatron-LM's entries (its arguments, iteration and checkpoint version)
    instead of this trainer's ``common``. Its weights can start a run (--finetune); a
    checkpoint of this trainer's that lost its manifest is still refused (:func:`verify`)."""
    if legacy_checkpoint.is_legacy(path) or os.path.isfile(os.path.join(path, MANIFEST)):
        return False
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        return False
    try:
        common = _common_state(path)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path}: its common state (common.pt) cannot be read "
            f"({type(error).__name__}: {str(error)[:300]}); restore it"
        ) from None
    return isinstance(common, dict) and "common" not in common and "checkpoint_version" in common


def is_foreign(root: str, iteration: int) -> bool:
    """Whether ``root``'s checkpoint of ``iteration`` is another trainer's: Megatron-LM's
    legacy format, or torch_dist saved by Megatron-LM. Such weights start a run; they never
    resume one (no data position, TST phase or schedule of this trainer's)."""
    path = checkpoint_dir(root, iteration)
    return legacy_checkpoint.is_legacy(path) or megatron_lm_saved(path)


def _allow_optimizer_classes() -> None:
    """Let torch's ``weights_only`` reader (megatron-core's for the common state) take the
    optimizer classes that megatron-core's hybrid optimizer (``--optimizer-cpu-offload``)
    keeps in its param groups, which a fully reshardable checkpoint stores there: without
    them no such checkpoint could be read back ("Unsupported global: torch.optim.adamw.AdamW";
    megatron-core registers its own classes only). Class references, nothing is called."""
    from megatron.core import optimizer

    torch.serialization.add_safe_globals(
        [optimizer.Adam, optimizer.SGD, optimizer.CPUAdam, optimizer.CPUSGD]
    )


def _common_state(path: str):
    """dist_checkpointing's common (non-sharded) state of checkpoint directory ``path``, as
    stored: this trainer's under ``common``, Megatron-LM's at the top."""
    from megatron.core import dist_checkpointing

    _allow_optimizer_classes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice
        return dist_checkpointing.load_common_state_dict(path)


def saved_common_state(path: str) -> dict:
    """The common (non-sharded) state checkpoint directory ``path`` holds, as :func:`save`
    stored it ({} when there is none)."""
    common = _common_state(path)
    saved = common.get("common", common) if isinstance(common, dict) else None
    return saved if isinstance(saved, dict) else {}


def _saved_optimizer_layout(path: str) -> dict | None:
    """The optimizer layout checkpoint ``path`` was saved with (None before it was stored)."""
    return saved_common_state(path).get("optimizer_layout")


def _check_optimizer_layout(path: str, ours: dict, saved: dict | None) -> None:
    """Refuse, naming the fix, optimizer state this run cannot read (rather than
    megatron-core's shape-mismatch error about bucket keys)."""
    if saved is None:
        return  # a checkpoint from before the layout was stored: as before
    fresh = "pass --no-load-optim to load the weights and start the optimizer state fresh"
    apart = saved.get("first_chunk_apart", False)
    if apart != ours.get("first_chunk_apart", False):
        which = "with" if apart else "without"
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state saved {which} "
            "--overlap-param-gather-with-optimizer-step, which steps (and stores) the first "
            "model chunk's state in an optimizer of its own: give the same setting, or " + fresh
        )
    same_grid = all(saved.get(k) == ours.get(k) for k in _GRID_KEYS)
    if saved["distributed_optimizer"] == ours["distributed_optimizer"] and (
        same_grid or saved.get("format") == "fully_reshardable"
    ):
        return
    if saved["distributed_optimizer"] != ours["distributed_optimizer"]:
        which = "with" if saved["distributed_optimizer"] else "without"
        raise CheckpointError(
            f"checkpoint {path} holds optimizer state saved {which} "
            "--use-distributed-optimizer, in another format than this run's: give the same "
            f"--use-distributed-optimizer setting, or {fresh}"
        )
    if ours["distributed_optimizer"]:

        def grid(d):
            return ", ".join(f"{k.upper()} {d[k] or 1}" for k in ("tp", "pp", "vpp", "ep", "etp"))

        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state saved at {grid(saved)}; "
            f"this run is at {grid(ours)}. That state reshards over data parallelism only "
            "(megatron-core's dp_reshardable format): resume at the saving run's layout, or "
            + fresh
            + " (checkpoints saved with --dist-ckpt-optim-fully-reshardable reshard anywhere)"
        )


_OPTIMIZER_PREFIXES = ("optimizer.", "chained_")


def _model_tensor_keys(template: dict) -> set[str]:
    """The checkpoint keys of the model tensors ``template`` asks for (its ``model<i>``
    entries; a SwiGLU factory's key stands for its two halves)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return {
        value.key
        for name, part in template.items()
        if name.startswith("model")
        for value in nested_values(part)
        if isinstance(value, ShardedTensor | ShardedTensorFactory)
    }


def _all_ranks(keys: set[str]) -> set[str]:
    """The union of ``keys`` over every rank (each rank holds its own stage's and shard's)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return set(keys)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(keys))
    return set().union(*map(set, gathered))


def _present(key: str, saved: dict) -> bool:
    return key in saved or (f"{key}_w" in saved and f"{key}_v" in saved)


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _listed(keys: set[str], most: int = 6) -> str:
    names = sorted(keys)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _check_keys(template: dict, path: str, saved: dict, strictness: str, with_optimizer: bool,
                report) -> set[str]:  # fmt: skip
    """Compare the model tensors this run asks for with the ones checkpoint ``path`` holds
    (``saved``: its tensor metadata), over all ranks, before anything is read, as
    --dist-ckpt-strictness says (Megatron-LM's choices and default):

    - "unexpected" tensors (this model has them, the checkpoint does not): refused, naming
      them and the fix, under ``assume_ok_unexpected`` (the default) and ``raise_*``; kept
      at their initial values under ``log_*`` / ``return_*`` (listed) and ``ignore_all``.
      Letting them through needs a fresh optimizer (--finetune or --no-load-optim): the
      saved optimizer state has nothing for them.
    - "missing" tensors (in the checkpoint, not used by this model): ignored, as
      megatron-core does, except under ``*_all``: listed by ``log_all`` / ``return_all``,
      refused by ``raise_all``. The optimizer state a weights-only load leaves unread is
      not a mismatch.

    ``return_*`` report like ``log_*``: no caller here takes the keys (Megatron-LM's trainer
    cannot either). Returns the unexpected keys let through (this rank's)."""
    ours = _model_tensor_keys(template)
    wanted = _all_ranks(ours)  # one exchange: every rank then decides alike
    unexpected = {key for key in wanted if not _present(key, saved)}
    missing: set[str] = set()
    if strictness.endswith("_all"):
        missing = {
            key for key in saved
            if not key.startswith(_OPTIMIZER_PREFIXES) and key not in wanted
            and not (key.endswith(("_w", "_v")) and key[:-2] in wanted)
        }  # fmt: skip
    if unexpected and strictness in ("assume_ok_unexpected", "raise_unexpected", "raise_all"):
        raise CheckpointError(
            f"checkpoint {path} lacks {_tensors(len(unexpected))} of this model "
            f"({_listed(unexpected)}): check the model flags against the run that saved it; "
            "to start those from their initial values and load the rest, pass "
            "--dist-ckpt-strictness log_unexpected with --finetune or --no-load-optim"
        )
    if missing and strictness == "raise_all":
        raise CheckpointError(
            f"checkpoint {path} holds {_tensors(len(missing))} this model does not use "
            f"({_listed(missing)}) and --dist-ckpt-strictness raise_all refuses them: check "
            "the model flags, or pass --dist-ckpt-strictness log_all to load without them"
        )
    if unexpected and with_optimizer:
        raise CheckpointError(
            f"checkpoint {path} lacks {_tensors(len(unexpected))} of this model "
            f"({_listed(unexpected)}), so its optimizer state does not cover this model: "
            "add --no-load-optim (or --finetune) to load the weights it has with a fresh "
            "optimizer"
        )
    if strictness != "ignore_all":
        if unexpected:
            report(f"--dist-ckpt-strictness {strictness}: {_tensors(len(unexpected))} of this "
                   f"model not in {path}, kept at their initial values: "
                   f"{_listed(unexpected)}")  # fmt: skip
        if missing:
            report(f"--dist-ckpt-strictness {strictness}: {_tensors(len(missing))} of {path} "
                   f"not used by this model: {_listed(missing)}")  # fmt: skip
    return ours & unexpected


def _check_shapes(template: dict, path: str, saved: dict) -> None:
    """Refuse a checkpoint whose tensors have other global shapes than this run's model.

    dist_checkpointing reshards across TP / PP / EP but cannot change a shape; its own error
    names neither the cause nor the fix. The padded vocabulary is the usual culprit: it is a
    multiple of --make-vocab-size-divisible-by x TP, so it can change with TP. ``saved`` is
    the checkpoint's tensor metadata (``load_tensors_metadata``), read once by :func:`load`.
    """
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    ours = {
        value.key: tuple(value.global_shape)
        for value in nested_values(template)
        if isinstance(value, ShardedTensor)
    }
    wrong = {
        key: (tuple(saved[key].global_shape), shape)
        for key, shape in ours.items()
        if key in saved and tuple(saved[key].global_shape) != shape
    }
    if not wrong:
        return
    listed = "; ".join(f"{k}: saved {a}, this run {b}" for k, (a, b) in sorted(wrong.items())[:4])
    hint = "the model flags must match the run that saved it"
    vocab_keys = [k for k in wrong if "word_embeddings" in k or "output_layer" in k]
    if vocab_keys:
        rows = wrong[vocab_keys[0]][0][0]
        hint = (
            f"the padded vocabulary differs ({rows} rows saved): it is a multiple of "
            "--make-vocab-size-divisible-by x TP, so it can change with TP; give "
            f"--padded-vocab-size {rows} (or a --make-vocab-size-divisible-by that pads to "
            f"{rows} at this TP)"
        )
    raise CheckpointError(
        f"checkpoint {path} does not fit this model ({len(wrong)} tensors differ in shape: "
        f"{listed}): {hint}"
    )


# megatron-core's distributed optimizer over torch's Adam (used whenever apex and Transformer
# Engine are absent) restores its state incorrectly in two ways (megatron-core 0.16.1):
# building the load template asserts when the optimizer has taken no step yet, and the
# restored state gives every parameter one shared `step` tensor, which torch's Adam then
# increments once per parameter, corrupting the bias correction from the next step on.


def _torch_adams(optimizer, distributed_only: bool = True):
    """``(part, adam)``: the torch Adams inside a (chained) megatron-core distributed optimizer
    (or inside any megatron-core optimizer, ``distributed_only=False``), each with the index
    of its part of the chain. Under ``--optimizer-cpu-offload`` a part's inner optimizer is
    megatron-core's ``HybridDeviceOptimizer``, whose sub-optimizers are the torch Adams."""
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        if distributed_only and not isinstance(opt, DistributedOptimizer):
            continue
        inner = getattr(opt, "optimizer", None)
        hybrid = isinstance(inner, HybridDeviceOptimizer)
        for adam in inner.sub_optimizers if hybrid else [inner]:
            if isinstance(adam, torch.optim.Adam):  # torch's AdamW is one too
                yield part, adam


def _hybrid_optimizers(optimizer):
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(getattr(opt, "optimizer", None), HybridDeviceOptimizer):
            yield opt.optimizer


def _allocate_empty_adam_state(optimizer, distributed_only: bool = True) -> None:
    """Give every parameter without Adam state zero moments at step 0 (what Adam starts
    from): a fresh optimizer's, to be overwritten by the load, or a not yet stepped one's,
    to be saved. (megatron-core's own answer for the hybrid optimizer, ``dummy_step``, takes
    a step with random gradients: it moves the weights.)"""
    for _, adam in _torch_adams(optimizer, distributed_only):
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }
    for hybrid in _hybrid_optimizers(optimizer):
        hybrid._sync_sub_optimizers_state_to_hdo()  # its view of the state, with master_param


def _restore_step_zero(loaded: dict) -> None:
    """The shared Adam step of a non-distributed optimizer saved before its first applied
    step: megatron-core stores the step only when it is not zero (``if step:`` in
    ``sharded_state_dict``), so such a checkpoint holds moments without a step and torch's
    Adam refused to load them (KeyError 'step'). The step was 0."""
    parts = loaded.values() if all(isinstance(k, int) for k in loaded) else [loaded]
    for part in parts:
        inner = part.get("optimizer", part) if isinstance(part, dict) else None
        state = inner.get("state") if isinstance(inner, dict) else None
        if not isinstance(state, dict) or "common_step" in state:
            continue
        if any(isinstance(s, dict) and s and "step" not in s for s in state.values()):
            state["common_step"] = torch.tensor(0.0)


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """One `step` tensor per parameter, holding the step count the checkpoint recorded.

    The per-parameter `step` does not survive the sharded load (it comes back as the
    template's); the count saved with the param groups is the one to trust.
    """
    chained = len(getattr(optimizer, "chained_optimizers", [optimizer]))
    for index, adam in _torch_adams(optimizer):
        part = loaded if chained == 1 else loaded[index]
        steps = {group["step"] for group in part["optimizer"]["param_groups"]}
        if len(steps) != 1:
            raise CheckpointError(f"optimizer param groups disagree on the step count: {steps}")
        step = float(steps.pop())
        for state in adam.state.values():
            state["step"] = torch.tensor(step)
