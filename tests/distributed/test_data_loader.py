"""--num-workers: worker processes read the micro-batches ahead; the batches never change.

The oracle is the same stream read in the training process (``--num-workers 0``): every
micro-batch must be bitwise equal, the data position (what checkpoints store) equal after
every request, through bag-size switches down and up, DP ranks, an epoch wrap and a resume;
losses through ``pretrain_tst`` equal exactly. Workers must be gone after a normal end, an
error (raised in a worker or in the trainer) and Ctrl-C; a test that finds one alive fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from flags import SMALL_GPT
from test_data_stream import B, L, PositionDataset

import pretrain_tst
from tst.checkpointing import latest_iteration
from tst.data.stream import SampleStream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Down (superposition -> recovery), up again mid-sample (units skipped), a middle bag size,
# and more units than the 7 big samples hold (an epoch wrap).
SCHEDULE = [B] * 5 + [1] * 13 + [2] * 3 + [B] * 2 + [1] * 9


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has ended; its parent has not reaped it)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _gone(pids: list[int], timeout: float = 20.0) -> bool:
    end = time.time() + timeout
    while _alive(pids) and time.time() < end:
        time.sleep(0.1)
    return not _alive(pids)


def _read(stream: SampleStream, schedule: list[int]) -> tuple[list[torch.Tensor], list[dict]]:
    rows, states = [], []
    for bag in schedule:
        rows.append(stream.next_micro_batch(bag))
        states.append(stream.state_dict())
    return rows, states


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_workers_serve_the_rows_the_stream_reads_itself():
    for dp_rank, dp_size in ((0, 1), (1, 2)):

        def make(dp_rank=dp_rank, dp_size=dp_size) -> SampleStream:
            return SampleStream(PositionDataset(7), L, B, 2, dp_rank, dp_size)

        want, want_states = _read(make(), SCHEDULE)
        stream = make()
        stream.start_workers(2, SCHEDULE)
        pids = stream.worker_pids
        assert len(pids) == 2 and not set(pids) & {os.getpid()}
        got, states = _read(stream, SCHEDULE)
        assert _same(got, want) and states == want_states, (dp_rank, dp_size)
        assert stream._loader is not None  # every request was the one read ahead
        stream.close()
        assert _gone(pids), f"workers {pids} outlived close()"
        # A resume: a stream loaded mid-way reads the same tail with workers.
        resumed = make()
        resumed.load_state_dict(want_states[9])
        resumed.start_workers(2, SCHEDULE[10:])
        tail, _ = _read(resumed, SCHEDULE[10:])
        resumed.close()
        assert _same(tail, want[10:])


def test_an_unforeseen_request_is_read_in_the_trainer_and_stops_the_workers():
    want, _ = _read(SampleStream(PositionDataset(7), L, B, 2, 0, 1), [B, 1, B, 1])
    stream = SampleStream(PositionDataset(7), L, B, 2, 0, 1)
    stream.start_workers(1, [B, B, B, B])  # the plan says B; the second request is 1
    pids = stream.worker_pids
    got, _ = _read(stream, [B, 1, B, 1])
    assert _same(got, want) and stream._loader is None and _gone(pids)


def test_workers_leave_every_stop_signal_to_the_trainer():
    """A stop signal sent to the process group (``scancel``, ``--exit-signal SIGUSR2``,
    Slurm's SIGUSR1 warning, Ctrl-C) reaches the workers too: they ignore it and keep
    serving, and the trainer saves at the next step with the batches they read."""
    from tst.processes import STOP_SIGNALS

    want, _ = _read(SampleStream(PositionDataset(7), L, B, 2, 0, 1), SCHEDULE)
    stream = SampleStream(PositionDataset(7), L, B, 2, 0, 1)
    stream.start_workers(2, SCHEDULE)
    pids = stream.worker_pids
    first, _ = _read(stream, SCHEDULE[:2])  # the workers are up and serving
    for pid in pids:
        for sig in STOP_SIGNALS:
            os.kill(pid, sig)
    time.sleep(0.5)
    rest, _ = _read(stream, SCHEDULE[2:])
    assert stream._loader is not None and _alive(pids) == pids
    assert _same(first + rest, want)
    stream.close()
    assert _gone(pids)


class FailingDataset(PositionDataset):
    """Big sample 3 cannot be read (as a corrupt file would fail)."""

    def __getitem__(self, i: int):
        if i == 3:
            raise ValueError("big sample 3 is unreadable: rebuild the dataset")
        return super().__getitem__(i)


def test_a_worker_error_reaches_the_trainer_unchanged_and_the_workers_end():
    stream = SampleStream(FailingDataset(7), L, B, 1, 0, 1)
    stream.start_workers(2, [B] * 6)
    pids = stream.worker_pids
    assert len(_read(stream, [B] * 3)[0]) == 3
    with pytest.raises(ValueError, match=r"^big sample 3 is unreadable: rebuild the dataset$"):
        stream.next_micro_batch(B)
    assert _gone(pids)


BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "6", "--tst-bag-size", "3", "--tst-iters", "3",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
    "--eval-iters", "1", "--untie-embeddings-and-output-weights", *SMALL_GPT,
]  # fmt: skip


def _train(argv: list[str], metrics: str, fail_at: int | None = None) -> dict:
    """pretrain_tst.main on this rank: every micro-batch served, the workers' pids, the
    records, and the error if ``fail_at`` made a step raise."""
    import torch.distributed as dist

    from tst.trainer import Trainer

    seen = {"batches": [], "pids": [], "eval_pids": []}
    streams = []  # the train stream starts its workers first, then each evaluation's
    original_next, original_start = SampleStream.next_micro_batch, SampleStream.start_workers
    original_step = Trainer.train_step

    def next_micro_batch(self, bag_size):
        rows = original_next(self, bag_size)
        if self is getattr(self, "_recorded", None):
            seen["batches"].append(rows.clone())
        return rows

    def start_workers(self, *args, **kwargs):
        original_start(self, *args, **kwargs)
        streams.append(self)
        if self is streams[0]:
            self._recorded = self  # the train stream's batches
            seen["pids"] += self.worker_pids
        else:
            seen["eval_pids"] += self.worker_pids

    def train_step(self, phase):
        if fail_at is not None and self.iteration == fail_at:
            raise RuntimeError("injected failure")
        return original_step(self, phase)

    SampleStream.next_micro_batch, SampleStream.start_workers = next_micro_batch, start_workers
    Trainer.train_step = train_step
    try:
        seen["rc"] = pretrain_tst.main(argv + ["--metrics-file", metrics])
    except RuntimeError as error:
        seen["error"] = str(error)
    finally:
        SampleStream.next_micro_batch, SampleStream.start_workers = original_next, original_start
        Trainer.train_step = original_step
    every = seen["pids"] + seen["eval_pids"]
    seen["alive_after"] = [] if _gone(every) else _alive(every)
    if "error" not in seen:
        dist.barrier()
        with open(metrics) as f:
            seen["records"] = [json.loads(line) for line in f]
    return seen


def _losses(run: dict) -> list[tuple[int, float]]:
    return [(r["iteration"], r["loss"]) for r in run["records"] if r.get("loss") is not None]


def _val(run: dict) -> list[tuple[int, float]]:
    return [(r["iteration"], r["val_loss"]) for r in run["records"] if "val_loss" in r]


def test_workers_change_no_batch_no_loss_and_resume_exactly(world2, tmp_path):
    plain = world2.run(_train, BASE + ["--num-workers", "0"], str(tmp_path / "w0.jsonl"))
    workers = world2.run(_train, BASE + ["--num-workers", "2"], str(tmp_path / "w2.jsonl"))
    for rank, (want, got) in enumerate(zip(plain, workers, strict=True)):
        assert want["pids"] == [] and len(got["pids"]) == 2, rank
        # Each of the 3 evaluations (validation twice, the test split at the end) read
        # through 2 workers of its own, stopped after it.
        assert want["eval_pids"] == [] and len(set(got["eval_pids"])) == 6, rank
        assert got["alive_after"] == [], f"rank {rank}: workers left running"
        # 6 steps x 2 micro-batches, bag rows of 3 units then single units, per rank.
        assert len(want["batches"]) == 12
        assert [b.shape[1] for b in want["batches"]] == [27] * 6 + [9] * 6
        assert _same(got["batches"], want["batches"]), f"rank {rank}: batches differ"
    assert _losses(workers[0]) == _losses(plain[0]) and len(_losses(plain[0])) == 6
    assert _val(workers[0]) == _val(plain[0]) and len(_val(plain[0])) == 2
    # Stopped at step 4 (after the switch) and resumed, with workers: the same batches.
    ckpt = str(tmp_path / "ckpt")
    first = world2.run(_train, BASE + ["--num-workers", "2", "--save", ckpt,
                                       "--exit-interval", "4"], str(tmp_path / "a.jsonl"))  # fmt: skip
    second = world2.run(_train, BASE + ["--num-workers", "2", "--load", ckpt],
                        str(tmp_path / "b.jsonl"))  # fmt: skip
    assert latest_iteration(ckpt) == 4
    for rank in range(2):
        both = first[rank]["batches"] + second[rank]["batches"]
        assert _same(both, plain[rank]["batches"]), f"rank {rank}: resumed batches differ"
        assert first[rank]["alive_after"] == second[rank]["alive_after"] == []
    assert _losses(first[0]) + _losses(second[0]) == _losses(plain[0])
    # An error in the trainer mid-run: the workers end with it.
    failed = world2.run(_train, BASE + ["--num-workers", "2"], str(tmp_path / "f.jsonl"), 4)
    for rank, run in enumerate(failed):
        assert run["error"] == "injected failure" and len(run["pids"]) == 2
        assert run["alive_after"] == [], f"rank {rank}: workers outlived the error"


def test_ctrl_c_with_workers_saves_and_leaves_no_process(tmp_path):
    argv = list(BASE)
    argv[argv.index("--train-iters") + 1] = "100000"
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_tst.py"), *argv, "--num-workers", "2",
           "--save", str(tmp_path / "ckpt"), "--metrics-file", str(metrics)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        end = time.time() + 180
        while time.time() < end and not (metrics.exists() and metrics.read_text().count("\n") >= 4):
            time.sleep(0.1)
        # The run's children: the train loader's 2 workers, and 2 more while an evaluation
        # reads (it starts no other process here). A snapshot taken while an evaluation's
        # workers start or stop sees 3, so look again until the count is a settled one; every
        # process seen on the way must be gone after Ctrl-C too.
        seen: set[int] = set()
        settle = time.time() + 30
        while True:
            children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            seen.update(children)
            if len(children) in (2, 4) or time.time() > settle:
                break
            time.sleep(0.05)
        assert len(children) in (2, 4), children
        children = sorted(seen)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert b"stopping at iteration" in out and latest_iteration(str(tmp_path / "ckpt")) >= 3
    assert _gone(children), f"left running after Ctrl-C: {_alive(children)}"


_KILLED_HOLDER = """
import sys, time
sys.path[:0] = {paths!r}
from test_data_stream import B, L, PositionDataset
from tst.data.stream import SampleStream
if __name__ == "__main__":
    stream = SampleStream(PositionDataset(7), L, B, 2, 0, 1)
    stream.start_workers(2, [1] * 1000)
    stream.next_micro_batch(1)
    print(*stream.worker_pids, flush=True)
    time.sleep(600)
"""


def test_a_sigkilled_trainer_leaves_no_worker(tmp_path):
    """No exit hook runs on SIGKILL: the workers notice the trainer is gone by themselves."""
    script = tmp_path / "holder.py"
    paths = [os.path.join(ROOT, "tests", tier) for tier in ("unit", "helpers")]
    script.write_text(_KILLED_HOLDER.format(paths=paths))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(pids) == 2 and set(pids) <= set(children), (pids, children)
    finally:
        proc.kill()
        proc.wait()
    assert _gone(children, timeout=15), f"left running after SIGKILL: {_alive(children)}"


class TrappedDataset(PositionDataset):
    """Reading big sample 3 in a worker process first calls ``trap`` (a stall, a death); the
    trainer's process reads it as usual."""

    def __init__(self, n: int, trap) -> None:
        super().__init__(n)
        self.trap = trap
        self.trainer_pid = os.getpid()

    def __getitem__(self, i: int):
        if i == 3 and os.getpid() != self.trainer_pid:
            self.trap()
        return super().__getitem__(i)


def test_a_stalled_worker_dumps_its_stacks_and_the_trainer_reads_on(monkeypatch, capfd, caplog):
    """A live worker that leaves its micro-batch unanswered past the stall timeout writes its
    Python stacks to standard error (the stalled frame among them), is stopped with the
    others, and the trainer reads that micro-batch and the rest itself: the same rows, the
    same data position, a warning naming the worker and what to do."""
    from tst.data import loader

    monkeypatch.setattr(loader, "STALL_TIMEOUT_S", 2.0)
    schedule = [B] * 6
    want, want_states = _read(SampleStream(PositionDataset(7), L, B, 1, 0, 1), schedule)
    # A minute's sleep in the worker, as a forked child deadlocked on a lock would hang, but
    # bounded, so that a loader without the watchdog fails the test rather than hanging it.
    stream = SampleStream(TrappedDataset(7, lambda: time.sleep(60)), L, B, 1, 0, 1)
    stream.start_workers(2, schedule)
    pids = stream.worker_pids
    with caplog.at_level("WARNING", logger="tst.data.loader"):
        got, states = _read(stream, schedule)
    assert _same(got, want) and states == want_states
    assert stream._loader is None and _gone(pids)
    assert "gave no micro-batch in 2 s while alive" in caplog.text
    assert "--num-workers 0" in caplog.text
    err = capfd.readouterr().err
    assert "test_data_loader.py" in err and "in __getitem__" in err, err[-3000:]


def _stuck_at_start(monkeypatch, tmp_path, forks_to_block: int) -> None:
    """Block the first ``forks_to_block`` forked workers before they say they are ready, as a
    child deadlocked in the interpreter's after-fork code is (python/cpython#112275); bounded,
    so that a loader without the restart fails the test rather than hanging it. Each blocked
    worker writes its pid to a file of ``tmp_path`` (see :func:`_blocked_pids`)."""
    from tst.data import loader

    real = loader.exit_with_parent

    def exit_with_parent(*args, **kwargs):
        for k in range(forks_to_block):
            try:  # the first children to claim a slot block: one slot each
                fd = os.open(tmp_path / f"blocked{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "exit_with_parent", exit_with_parent)
    monkeypatch.setattr(loader, "START_TIMEOUT_S", 1.0)


def _blocked_pids(tmp_path) -> list[int]:
    return [int(p.read_text()) for p in sorted(tmp_path.glob("blocked*"))]


def test_a_worker_stuck_at_its_fork_is_forked_again(monkeypatch, tmp_path, caplog):
    """A worker that does not say it is ready within START_TIMEOUT_S is killed and forked
    again; the loader then serves every micro-batch (the rows and positions of the trainer's
    own reads) and stops every worker at the end, the stuck one too."""
    _stuck_at_start(monkeypatch, tmp_path, forks_to_block=1)
    want, want_states = _read(SampleStream(PositionDataset(7), L, B, 2, 0, 1), SCHEDULE)
    stream = SampleStream(PositionDataset(7), L, B, 2, 0, 1)
    with caplog.at_level("WARNING", logger="tst.data.loader"):
        stream.start_workers(2, SCHEDULE)
        pids = stream.worker_pids
        got, states = _read(stream, SCHEDULE)
    assert _same(got, want) and states == want_states
    assert stream._loader is not None  # the workers served every request
    (stuck,) = _blocked_pids(tmp_path)
    assert len(pids) == 2 and stuck not in pids and _gone([stuck])
    assert "was not ready 1 s after its fork" in caplog.text, caplog.text
    # what /proc showed of it: asleep (in time.sleep here), next to no CPU used
    assert re.search(
        r"\(it was sleeping( in \w+)?, 0\.\d\d s of CPU since its fork; a child", caplog.text
    )
    assert "forked it again (fork 2 of 3)" in caplog.text and "#112275" in caplog.text
    stream.close()
    assert _gone(pids)


def test_process_state_tells_a_slow_start_from_a_blocked_one():
    """The start warning's diagnosis, from /proc: a busy child has used CPU, a sleeping one
    none; a process that is gone gives nothing (and no error)."""
    from tst.data.loader import _process_state

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    asleep = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(2.0)  # the busy one gets a share of a core even on a loaded machine
        seen_busy, seen_asleep = _process_state(busy.pid), _process_state(asleep.pid)
    finally:
        for child in (busy, asleep):
            child.kill()
            child.wait()
    busy_cpu = re.fullmatch(r"running, (\d+\.\d\d) s of CPU since its fork", seen_busy)
    assert busy_cpu and float(busy_cpu[1]) >= 0.1, seen_busy
    assert re.fullmatch(r"sleeping( in \w+)?, 0\.0\d s of CPU since its fork", seen_asleep)
    assert _process_state(busy.pid) == ""


def test_workers_stuck_at_every_fork_leave_the_reading_to_the_trainer(
    monkeypatch, tmp_path, caplog
):
    """After three forks of a worker that never gets ready the loader stops: the rank reads
    its data itself (the same rows and positions) and says so; no worker is left."""
    _stuck_at_start(monkeypatch, tmp_path, forks_to_block=6)  # 2 workers x 3 forks
    schedule = [B] * 4
    want, want_states = _read(SampleStream(PositionDataset(7), L, B, 1, 0, 1), schedule)
    stream = SampleStream(PositionDataset(7), L, B, 1, 0, 1)
    with caplog.at_level("WARNING", logger="tst.data.loader"):
        stream.start_workers(2, schedule)
        got, states = _read(stream, schedule)
    assert _same(got, want) and states == want_states
    assert stream.worker_pids == [] and stream._loader is None
    blocked = _blocked_pids(tmp_path)
    assert len(blocked) == 6 and _gone(blocked)
    assert caplog.text.count("fork 2 of 3") == 2 and caplog.text.count("fork 3 of 3") == 2
    assert "this rank reads its data itself" in caplog.text


def test_a_worker_that_dies_stops_the_run_with_its_exit_code(monkeypatch):
    """A dead worker is an error naming it, its exit code and --num-workers 0, whether it died
    reading or before it was ready; no worker is left."""
    from tst.data import loader

    # The worker exits at big sample 3, as one killed by the OOM killer would.
    stream = SampleStream(TrappedDataset(7, lambda: os._exit(7)), L, B, 1, 0, 1)
    stream.start_workers(2, [B] * 6)
    pids = stream.worker_pids
    with pytest.raises(RuntimeError, match=r"died \(exit code 7\): rerun with --num-workers 0"):
        _read(stream, [B] * 6)
    assert _gone(pids)
    monkeypatch.setattr(loader, "exit_with_parent", lambda *args, **kwargs: os._exit(5))
    with pytest.raises(RuntimeError, match=r"died at its start \(exit code 5\): rerun with"):
        SampleStream(PositionDataset(7), L, B, 1, 0, 1).start_workers(2, [B] * 6)


def test_a_failed_fork_is_an_error_that_names_the_fix_and_leaves_no_worker(monkeypatch):
    """fork(2) failing for the second worker (EAGAIN: out of processes) is an error naming the
    worker, the cause and --num-workers 0; the worker forked before it is stopped right away,
    not left until the process exits."""
    import errno

    real_fork, forks = os.fork, []

    def fork():
        forks.append(1)
        if len(forks) == 2:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return real_fork()

    before = {child.pid for child in psutil.Process().children()}
    monkeypatch.setattr(os, "fork", fork)
    stream = SampleStream(PositionDataset(7), L, B, 1, 0, 1)
    with pytest.raises(RuntimeError, match=r"could not fork data loader worker 1 \(\[Errno 11\] "
                       r"Resource temporarily unavailable\).*--num-workers 0"):  # fmt: skip
        stream.start_workers(2, [B] * 6)
    monkeypatch.undo()
    assert len(forks) == 2 and stream.worker_pids == []
    assert {child.pid for child in psutil.Process().children()} <= before  # worker 0 stopped
