"""No lost work under faults: killed runs resume exactly, bad checkpoints are refused,
non-finite steps are skipped without touching the model, and preemption saves cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import pytest
import torch

import pretrain_tst
from tst import trainer as trainer_module
from tst.checkpointing import CheckpointError, verify
from tst.config import parse_args
from tst.errors import NonFiniteLossError
from tst.plan import validate

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"
    ),
)

import fault_injection  # noqa: E402

ARGS = fault_injection.ARGS[:]


# bench/fault_injection.py's scenarios with a boundary of their own (a kill inside a save or
# an async save, right after the switch, a SIGTERM, a damaged checkpoint); its two kills at a
# random step (sync and async saves) are the benchmark's (`python bench/fault_injection.py`).
SCENARIOS = [
    "SIGKILL during a save", "SIGKILL during an async save", "SIGKILL after the switch",
    "SIGTERM (preemption)", "corrupted checkpoint",
]  # fmt: skip


def test_fault_injection_loses_no_data():
    """Resumed runs repeat the uninterrupted run's (loss, data position) at every step,
    exactly, whichever way the first run ended."""
    assert set(SCENARIOS) < set(fault_injection.SCENARIOS)
    seed = int(torch.randint(0, 1000, ()).item())
    rows = fault_injection.run(runs=1, seed=seed, only=SCENARIOS)
    assert [row["scenario"] for row in rows] == SCENARIOS
    for row in rows:
        assert row["recovered"] == row["runs"] and row["data_lost"] == 0, row


def _snapshot(trainer) -> dict:
    state = {f"p{i}": p.detach().clone() for i, p in enumerate(trainer.raw_chunks[0].parameters())}
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for j, s in enumerate(opt.optimizer.state.values()):
            for k, v in s.items():
                state[f"opt{j}.{k}"] = v.detach().clone()
    state["lr"] = torch.tensor(trainer.optimizer.param_groups[0]["lr"])
    state["sched"] = torch.tensor(trainer.scheduler.num_steps)
    return state


def test_non_finite_steps_are_skipped_untouched_then_the_run_stops(tmp_path, monkeypatch):
    real_loss = trainer_module._LOSSES["lm"]
    poisoned = {4, 6, 7, 8}  # 1-based steps whose loss (and so gradients) are NaN
    calls = {"n": 0}
    micro = 2  # micro-batches per step below

    def loss(logits, *args, **kwargs):
        step = calls["n"] // micro + 1
        calls["n"] += 1
        value = real_loss(logits, *args, **kwargs)
        return value * float("nan") if step in poisoned else value

    monkeypatch.setitem(trainer_module._LOSSES, "lm", loss)
    checks = []
    real_step = trainer_module.Trainer.train_step

    def train_step(self, phase):
        before = _snapshot(self)
        result = real_step(self, phase)
        if result["skipped"]:
            after = _snapshot(self)
            checks.append(all(torch.equal(before[k], after[k]) for k in before))
        return result

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    argv = ARGS[:]
    argv[argv.index("--tst-bag-size") + 1] = "1"
    argv += ["--global-batch-size", "8", "--max-skipped-steps", "3"]
    metrics = str(tmp_path / "m.jsonl")
    save = str(tmp_path / "ckpt")
    with pytest.raises(
        NonFiniteLossError,
        match=r"3 consecutive non-finite steps up to iteration 8 \(recovery phase\).*saved to",
    ):  # noqa: E501
        pretrain_tst.main(argv + ["--metrics-file", metrics, "--save", save])
    assert checks == [True, True, True, True]  # steps 4, 6, 7, 8 left everything as it was
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    skipped = [r["iteration"] for r in records if r.get("skipped")]
    assert skipped == [4, 6, 7, 8]
    assert all(r["loss"] == r["loss"] for r in records if "data_units" in r)  # finite ones
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "8"


def test_integrity_check_names_the_damaged_files(tmp_path):
    argv = ARGS[:] + ["--save", str(tmp_path)]
    argv[argv.index("--tst-iters") + 1] = "1"
    argv[argv.index("--train-iters") + 1] = "2"
    assert pretrain_tst.main(argv) == 0
    path = str(tmp_path / "iter_0000002")
    verify(path)  # intact
    shard = next(os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".distcp"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 1)
    with pytest.raises(CheckpointError, match=rf"failed its integrity check.*{shard}"):
        verify(path)
    os.remove(os.path.join(path, "tst_manifest.json"))
    with pytest.raises(CheckpointError, match="not completed by this trainer's save"):
        verify(path)


def test_persistent_checkpoint_worker_writes_every_save(tmp_path, capsys, monkeypatch):
    """--use-persistent-ckpt-worker: one long-lived writer process (megatron-core's persistent
    caller, spawned, running tst.checkpointing.persistent_writer_loop) writes all the async
    saves, each complete and verified; it is gone when the run ends, and nothing is left to
    complain at exit. Without --async-save the flag warns that it does nothing, as it does nothing."""
    import psutil
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    writers = []
    schedule = PersistentAsyncCaller.schedule_async_call

    def spy(self, request):
        schedule(self, request)
        writers.append(self.process.pid)

    monkeypatch.setattr(PersistentAsyncCaller, "schedule_async_call", spy)
    ckpt = tmp_path / "ckpt"
    args = ARGS[:]
    args[args.index("--train-iters") + 1] = "8"
    argv = [*args, "--save", str(ckpt), "--async-save", "--use-persistent-ckpt-worker"]
    assert pretrain_tst.main(argv) == 0
    captured = capsys.readouterr()
    assert len(writers) == 3 and len(set(writers)) == 1  # saves at 3, 6, 8: one writer
    assert not psutil.pid_exists(writers[0]) or psutil.Process(writers[0]).status() == "zombie"
    assert "Exception ignored" not in captured.err
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "8"
    for it in (3, 6, 8):
        verify(str(ckpt / f"iter_{it:07d}"))
    with pytest.warns(UserWarning, match="--use-persistent-ckpt-worker has no effect without "
                                         "--async-save"):  # fmt: skip
        validate(parse_args([*args, "--use-persistent-ckpt-worker"]), 1, 512)


def test_checkpoint_helpers_end_with_a_killed_trainer(tmp_path):
    """A trainer killed with SIGKILL (the OOM killer, a launcher's restart, a lost node) runs
    no clean-up. The helper processes its saves started and that wait for more work must
    notice and end rather than stay behind as orphans: the manager serving the writers'
    result queue (started by every save's first call, with or without --async-save) and the
    persistent writer (--use-persistent-ckpt-worker). A forked writer: the test below; a
    killed rank under torchrun: tests/cluster/test_cluster_torchrun.py."""
    import signal
    import subprocess
    import time

    import psutil

    args = ARGS[:]
    args[args.index("--train-iters") + 1] = "100000"
    args[args.index("--save-interval") + 1] = "2"
    cmd = [sys.executable, pretrain_tst.__file__, *args, "--save", str(tmp_path / "ckpt"),
           "--async-save", "--use-persistent-ckpt-worker"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in fault_injection._RENDEZVOUS_VARIABLES}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        end = time.time() + 180
        while time.time() < end and proc.poll() is None:
            # Helpers start at the first save; after the second they wait for the next one.
            if (tmp_path / "ckpt" / "iter_0000004").is_dir():
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        started = psutil.Process(proc.pid).children(recursive=True)
        spawned = []
        # The trainer's own children: the persistent writer's forked writers (in flight while
        # a save is written) carry its spawn_main command line too, one level down.
        for child in psutil.Process(proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "spawn_main" in " ".join(child.cmdline()):
                    spawned.append(child)
        assert len(spawned) == 2, spawned  # the manager and the persistent writer
        proc.send_signal(signal.SIGKILL)  # the trainer alone, not its process group
        proc.wait(30)
        alive = _still_running(started, timeout_s=20)
        assert not alive, f"outlived the killed trainer: {[p.cmdline()[-3:] for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left, the test leaves nothing
        proc.stderr.close()


def _helper_waits(ready, go) -> None:
    from tst.processes import serve_the_trainer

    serve_the_trainer(os.getppid())
    ready.set()
    go.wait(60)


def test_a_helper_leaves_every_stop_signal_to_the_trainer():
    """SIGTERM, SIGUSR1 (Slurm's time-limit warning, ``scancel --signal=USR1``: every process
    of the step gets it) and SIGINT reach the helpers too; each must outlive all three."""
    import multiprocessing
    import signal

    from tst.processes import STOP_SIGNALS

    assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT}
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    helper = ctx.Process(target=_helper_waits, args=(ready, go))
    helper.start()
    try:
        assert ready.wait(60)
        for sig in STOP_SIGNALS:
            os.kill(helper.pid, sig)
        helper.join(1.0)
        assert helper.is_alive(), f"the helper died of a stop signal (exit {helper.exitcode})"
        go.set()
        helper.join(30)
        assert helper.exitcode == 0
    finally:
        if helper.is_alive():
            helper.kill()


@pytest.mark.parametrize(
    ("extra", "sig"),
    # SIGUSR1 to every process of a Slurm step: tests/cluster (the time-limit warning).
    [
        (["--exit-signal", "SIGUSR2"], "SIGUSR2"),
        (["--async-save", "--use-persistent-ckpt-worker"], "SIGTERM"),
    ],
    ids=["sync-usr2", "async-persistent-term"],
)
def test_a_stop_signal_to_the_process_group_saves_at_the_stop(tmp_path, extra, sig):
    """``scancel``, ``timeout`` and ``kill -TERM -PGID`` signal the whole process group, and
    Slurm's time-limit warning (SIGUSR1) every process of the step: the helpers the trainer's
    saves use (the manager serving the writers' result queue, the persistent writer) get the
    signal too. The trainer still saves at the next step and exits 0, and that checkpoint is
    complete and the latest."""
    import signal
    import subprocess
    import time

    from tst.checkpointing import latest_iteration

    ckpt = tmp_path / "ckpt"
    args = ARGS[:]
    args[args.index("--train-iters") + 1] = "100000"
    args[args.index("--save-interval") + 1] = "2"
    cmd = [sys.executable, pretrain_tst.__file__, *args, "--save", str(ckpt), *extra]
    env = {k: v for k, v in os.environ.items() if k not in fault_injection._RENDEZVOUS_VARIABLES}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        end = time.time() + 180
        # The helpers start at the first save; the signal comes while they wait for the next.
        while time.time() < end and proc.poll() is None and not (ckpt / "iter_0000004").is_dir():
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, getattr(signal, sig))
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "failed" not in out + err and "Traceback" not in err, (out + err)[-3000:]
    stops = [line for line in out.splitlines() if "stopping at iteration" in line]
    assert len(stops) == 1 and stops[0].endswith(": signal"), out[-2000:]
    stopped_at = int(stops[0].split("stopping at iteration ")[1].split(":")[0])
    assert stopped_at >= 4 and latest_iteration(str(ckpt)) == stopped_at
    verify(str(ckpt / f"iter_{stopped_at:07d}"))


def _still_running(procs, timeout_s: float) -> list:
    """Those of ``procs`` still running after ``timeout_s`` (an orphan that ended but that
    this machine's init has not reaped yet is a zombie: ended)."""
    import time

    import psutil

    end = time.time() + timeout_s
    while True:
        alive = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        if not alive or time.time() > end:
            return alive
        time.sleep(0.2)


def _stuck_writer(pids, write):
    """A middle process: forks a 'writer' that never finishes, reports both pids, waits."""
    import multiprocessing
    import time

    child = multiprocessing.get_context("fork").Process(target=write, args=(600,))
    child.start()
    pids.put((os.getpid(), child.pid))
    time.sleep(600)


def test_a_forked_checkpoint_writer_ends_when_its_parent_is_killed():
    """The forked writer of megatron-core's FileSystemWriterAsync, as patched on every save:
    one stuck (as in ``task_done`` on its dead trainer's queue) ends once its parent is killed,
    and keeps the signature megatron-core inspects."""
    import inspect
    import multiprocessing
    import signal
    import time

    import psutil
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from tst.checkpointing import _ending_with_parent, end_helpers_with_the_trainer

    original = inspect.signature(FileSystemWriterAsync.write_preloaded_data)
    end_helpers_with_the_trainer()
    end_helpers_with_the_trainer()  # idempotent: wrapped once
    patched = FileSystemWriterAsync.write_preloaded_data
    assert patched._tst_ends_with_parent and not hasattr(
        patched.__wrapped__, "_tst_ends_with_parent"
    )
    assert inspect.signature(patched) == original
    ctx = multiprocessing.get_context("fork")
    pids = ctx.Queue()
    middle = ctx.Process(target=_stuck_writer, args=(pids, _ending_with_parent(time.sleep)))
    middle.start()
    try:
        parent, writer = pids.get(timeout=30)
        assert psutil.Process(writer).ppid() == parent
        # The kill comes once the writer watches its parent (its second thread); a parent
        # killed before that is the next test's case.
        deadline = time.time() + 30
        while psutil.Process(writer).num_threads() < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert psutil.Process(writer).num_threads() >= 2, "the writer never started watching"
        os.kill(parent, signal.SIGKILL)
        alive = _still_running([psutil.Process(writer)], timeout_s=10)
        assert not alive, "the writer outlived its killed parent"
    finally:
        middle.kill()
        middle.join()


def _once_orphaned(write, seconds):
    """A writer that starts its work only after its parent died (a busy machine that runs the
    forked child's first line late)."""
    import multiprocessing
    import time

    parent = multiprocessing.parent_process().pid
    while os.getppid() == parent:
        time.sleep(0.05)
    write(seconds)


def test_a_forked_checkpoint_writer_whose_parent_died_before_it_ran_ends():
    """The race of the test above: a writer whose parent is killed before the writer's first
    line must not take the reaper that adopted it for its parent (it would wait forever)."""
    import functools
    import multiprocessing
    import signal
    import time

    import psutil

    from tst.checkpointing import _ending_with_parent

    ctx = multiprocessing.get_context("fork")
    pids = ctx.Queue()
    write = functools.partial(_once_orphaned, _ending_with_parent(time.sleep))
    middle = ctx.Process(target=_stuck_writer, args=(pids, write))
    middle.start()
    parent, writer = pids.get(timeout=30)
    writer = psutil.Process(writer)
    try:
        os.kill(parent, signal.SIGKILL)
        alive = _still_running([writer], timeout_s=10)
        assert not alive, "the writer took its adoptive parent for its own and lived on"
    finally:
        middle.kill()
        middle.join()
        for proc in _still_running([writer], timeout_s=0):
            proc.kill()


def test_async_save_writes_in_the_background_and_publishes_when_complete(tmp_path, capsys):
    """--async-save: the save step returns before the writers finish (training goes on, the
    checkpoint is published at a later step), every checkpoint ends complete and verified,
    and the last one is finalised before the run exits. Resume exactness under kills with
    async saves is bench/fault_injection.py's (test above)."""
    ckpt = tmp_path / "ckpt"
    args = ARGS[:]
    args[args.index("--train-iters") + 1] = "8"
    assert pretrain_tst.main([*args, "--save", str(ckpt), "--async-save"]) == 0
    out = capsys.readouterr().out
    assert "saving checkpoint" in out and "in the background (--async-save)" in out
    done = [line for line in out.splitlines() if "written in the background, completed" in line]
    assert len(done) == 3  # iterations 3, 6 and the final 8
    # The save at step 3 was published at a later step: steps ran while it was written.
    first = done[0]
    assert "(iteration 3;" in first and int(first.rsplit(" ", 1)[1].rstrip(")")) > 3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "8"
    for it in (3, 6, 8):
        verify(str(ckpt / f"iter_{it:07d}"))
    assert not list(ckpt.glob("*.tmp"))


def test_save_retain_interval_under_async_save(tmp_path, capsys):
    """--save-retain-interval with --async-save: a checkpoint is retired only once the next
    one is complete (in the asynchronous save's finalisation), the kept ones are the
    multiples of the interval and the latest; what a killed run left mid-deletion goes too."""
    ckpt = tmp_path / "ckpt"
    stray = ckpt / "iter_0000001.deleting"  # a run killed while it deleted a checkpoint
    stray.mkdir(parents=True)
    (stray / "shard").write_bytes(b"x")
    args = ARGS[:]
    args[args.index("--train-iters") + 1] = "8"
    assert args[args.index("--save-interval") + 1] == "3"
    argv = [*args, "--save", str(ckpt), "--async-save", "--save-retain-interval", "6"]
    assert pretrain_tst.main(argv) == 0
    out = capsys.readouterr().out
    # Saved at 3, 6 and 8: 3 goes when 6 is complete; 6 is a multiple of 6; 8 is the latest.
    assert "deleted checkpoint" in out and "(iteration 3; --save-retain-interval)" in out
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000006", "iter_0000008"
    ]  # fmt: skip
    for it in (6, 8):
        verify(str(ckpt / f"iter_{it:07d}"))


def test_a_retired_checkpoint_that_is_a_link_stays(tmp_path, capsys):
    """Megatron-LM's rule: --save-retain-interval never deletes through a symbolic link."""
    from tst import checkpointing

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000005").symlink_to(target)
    checkpointing._retire(str(tmp_path), 5)
    checkpointing.wait_for_retired()
    assert (tmp_path / "iter_0000005").is_symlink() and (target / "metadata.json").exists()
    assert "is a symbolic link: left in place" in capsys.readouterr().out


def test_save_retain_interval_never_deletes_a_later_checkpoint(tmp_path):
    """A run resumed with --ckpt-step from an earlier checkpoint finds the tracker naming a
    later one: --save-retain-interval leaves that one alone (deleting only earlier ones)."""
    ckpt = tmp_path / "ckpt"
    args = ARGS[:]
    args[args.index("--train-iters") + 1] = "9"
    assert pretrain_tst.main([*args, "--save", str(ckpt)]) == 0  # saves 3, 6, 9
    rewind = ["--load", str(ckpt), "--ckpt-step", "3", "--save-retain-interval", "6",
              "--exit-interval", "6"]  # fmt: skip
    assert pretrain_tst.main([*args, "--save", str(ckpt), *rewind]) == 0  # saves 6, stops
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [
        "iter_0000003", "iter_0000006", "iter_0000009"
    ]  # fmt: skip
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"
