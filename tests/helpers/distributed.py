"""Run test bodies in N gloo processes.

A :class:`ProcessWorld` starts its ranks once (forked from a server process that has
imported megatron-core and the trainer: see :func:`_context`) and then runs any number of
test bodies in them: ``world.run(fn, *args)`` calls ``fn(*args)`` on every rank and returns
the per-rank results. A failure on
any rank raises :class:`RankFailure` carrying that rank's traceback; a body that does not
finish within the timeout (a hang in a collective, say) kills the world and raises
``TimeoutError``; the next ``run`` then finds the world closed and the fixture builds a new
one.

``fn`` must be importable by the children (a module-level function in a test module).
Inside it, ``tst.platform.initialize(tp=..., pp=...)`` sets up megatron-core for the layout
the body needs; the process group itself is created once per world.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback

import psutil
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180.0
# Not SIGUSR1 / SIGUSR2: the trainer answers those (save and exit) while a body trains.
STACKS_SIGNAL = signal.SIGRTMIN + 3


class RankFailure(AssertionError):
    """A test body failed on one or more ranks; the message holds their tracebacks."""


def _worker(
    rank: int, world_size: int, port: int, tasks, results, stacks: str, environ: dict
) -> None:
    # First of all: a rank stuck in start-up (waiting in init_process_group for a peer that
    # never comes) must not outlive the test session either. Its parent is the fork server,
    # which ends when the session's process does (multiprocessing's forkserver exits at EOF of
    # its pipe from that process).
    _exit_with_parent(os.getppid())
    # The environment of the process that made the world, as a spawned rank would have it
    # (a forked one has the fork server's, from the moment the server started).
    os.environ.clear()
    os.environ.update(environ)
    # STACKS_SIGNAL writes every thread's stack to ``stacks``: what a hung rank was doing goes
    # into the parent's TimeoutError.
    faulthandler.register(STACKS_SIGNAL, file=open(stacks, "w"), all_threads=True)  # noqa: SIM115
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import warnings

    import torch
    import torch.distributed as dist

    # megatron-core warns at import about every optional GPU package it cannot find.
    warnings.filterwarnings("ignore", module="megatron")
    torch.set_num_threads(1)
    try:
        from tst import cpu_compat

        cpu_compat.apply()
        # The parent holds the store's listening socket (see ProcessWorld): the port cannot
        # have been taken by anything else on the host in between.
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
        finally:
            _reset_parallel_state()
    dist.destroy_process_group()
    # Every result was collected before the parent asked this rank to stop; leave without
    # waiting on whatever else a test body started (a writer process, a non-daemon thread).
    results.close()
    results.join_thread()
    os._exit(0)


def _context():
    """multiprocessing's forkserver, its server preloaded with what the ranks import
    (``world_preload``): a rank forks from it in a fraction of a second instead of importing
    torch, megatron-core and the trainer again (a world of 4 ranks: ~0.1 s instead of ~5 s and
    ~9 CPU-seconds alone on 2 cores; the suite's ~40 worlds' set-ups went from ~320 s to ~60 s
    of its summed test time). The server is one process per test session, started with the
    first world (it keeps that moment's environment and ``sys.path``: the ranks set what they
    need themselves). Forked from a process with no thread of its own but OpenBLAS's idle one, a
    rank starts as a spawned one did, with no process group, device or patch yet."""
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["world_preload"])  # no effect once the server runs
    # Python 3.11's server does not apply the sys.path it is handed before its preload (an
    # ImportError there is ignored: every rank would import everything again). It finds the
    # preload through PYTHONPATH, set for its start only; the ranks take the environment of
    # the process that makes their world (see _worker).
    was = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    try:
        forkserver.ensure_running()
    finally:
        if was is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = was
    return ctx


def _exit_with_parent(parent: int) -> None:
    """End this rank when the test session is gone, even if the rank is stuck in a collective
    (a killed session would otherwise leave it waiting out gloo's 30-minute timeout)."""
    from tst.processes import exit_with_parent

    exit_with_parent(parent, poll_s=2.0)


def _reset_parallel_state() -> None:
    from tst.platform import reset_parallel_state

    reset_parallel_state()


class ProcessWorld:
    """``world_size`` gloo ranks that run test bodies on request."""

    def __init__(self, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        import torch.distributed as dist

        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = _context()
        environ = dict(os.environ)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        # The rendezvous store is bound here, to a port the kernel picks and this process keeps:
        # picking a free port and handing it to rank 0 to bind races with every other world
        # and every outgoing connection on the host (EADDRINUSE, or a rank joining a stranger's
        # store).
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        port = self._store.port
        self._stacks_dir = tempfile.mkdtemp(prefix="world-stacks-")
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, self._tasks[rank], self._results, self._stacks(rank)),
                kwargs={"environ": environ},
                # Not daemonic: dist_checkpointing starts writer processes of its own.
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self.closed = False
        self._collect("start-up", timeout_s=max(timeout_s, 120.0))

    def run(self, fn, *args, timeout_s: float | None = None, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        if self.closed:
            raise RuntimeError("this process world was closed after an earlier failure")
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", repr(fn)), timeout_s or self.timeout_s)

    def _collect(self, what: str, timeout_s: float) -> list:
        """Every rank's answer; ``timeout_s`` without a new one is a hang. A rank that ended
        (a crash, ``os._exit``, a kill) fails the world at once, not after the timeout."""
        results: dict[int, object] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) + len(failures) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=min(1.0, timeout_s))
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(results) - set(failures))
                ended = {r: p.exitcode for r in missing if not (p := self._procs[r]).is_alive()}
                if not ended and time.monotonic() < deadline:
                    continue
                stacks = "" if ended else self._hung_stacks(missing)
                self.close(force=True)
                detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
                if ended:
                    codes = ", ".join(f"rank {r}: {code}" for r, code in sorted(ended.items()))
                    raise RankFailure(
                        f"{what}: ranks {sorted(ended)} ended without an answer (exit codes: "
                        f"{codes}; a negative code is the signal that killed it){detail}"
                    ) from None
                raise TimeoutError(
                    f"{what}: ranks {missing} did not finish within {timeout_s:.0f} s "
                    f"(world of {self.world_size}){detail}{stacks}"
                ) from None
            (results if ok else failures)[rank] = value
            deadline = time.monotonic() + timeout_s
        if failures:
            self.close(force=True)
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise RankFailure(f"{what} failed on ranks {sorted(failures)}:{detail}")
        return [results[r] for r in range(self.world_size)]

    def _stacks(self, rank: int) -> str:
        return os.path.join(self._stacks_dir, f"rank{rank}.txt")

    def _hung_stacks(self, ranks: list[int]) -> str:
        """The Python stacks of ``ranks`` (still running), asked for with ``STACKS_SIGNAL``."""
        asked = []
        for rank in ranks:
            with contextlib.suppress(OSError):
                os.kill(self._procs[rank].pid, STACKS_SIGNAL)
                asked.append(rank)
        time.sleep(2.0)  # the handler writes from the rank's own signal handler
        out = ""
        for rank in asked:
            with contextlib.suppress(OSError), open(self._stacks(rank)) as f:
                # The main thread (the one in the collective) is written last.
                out += f"\n--- rank {rank}, stacks at the timeout ---\n{f.read()[-6000:]}"
        return out

    def close(self, force: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        shutil.rmtree(self._stacks_dir, ignore_errors=True)
        if not force:
            for task_queue in self._tasks:
                task_queue.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        # A rank killed mid-run can leave its queues' feeder threads blocked; do not wait on them.
        self._results.cancel_join_thread()
        for task_queue in self._tasks:
            task_queue.cancel_join_thread()
        for proc in self._procs:
            if proc.is_alive():
                # What the rank started (loader workers, checkpoint writers, a test body's
                # own processes) goes with it, not on as an orphan of init.
                for child in _descendants(proc.pid):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
                proc.kill()
                proc.join(timeout=5)
        self._store = None


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
