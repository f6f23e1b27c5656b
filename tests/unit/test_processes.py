"""tst.processes: a helper's parent is the process that started it, even once that one died.

Only the standard library is imported here: the spawned child below imports this module."""

from __future__ import annotations

import multiprocessing
import os
import time


def _report_parents(queue) -> None:
    from tst.processes import parent_pid

    # Its parent exits right after starting it, but on a loaded machine this interpreter can
    # start first: wait (up to 60 s) for the reaper to adopt it, so the report is made after.
    deadline = time.monotonic() + 60
    while os.getppid() == parent_pid() and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.put((parent_pid(), os.getppid()))


def _spawn_and_die(queue) -> None:
    """Spawn a child, then die at once: the child (a fresh interpreter) has not run a line."""
    child = multiprocessing.get_context("spawn").Process(target=_report_parents, args=(queue,))
    child.start()
    os._exit(0)


def test_parent_pid_names_the_dead_parent_not_the_reaper():
    """A spawned helper whose parent died while it started (what a trainer killed during its
    first save leaves): os.getppid() names the reaper that adopted it, parent_pid() the
    parent, so a helper watching parent_pid() ends instead of waiting on the reaper."""
    queue = multiprocessing.get_context("spawn").Queue()
    middle = multiprocessing.get_context("fork").Process(target=_spawn_and_die, args=(queue,))
    middle.start()
    middle.join(30)
    assert middle.exitcode == 0
    recorded, current = queue.get(timeout=120)
    assert recorded == middle.pid
    assert current != middle.pid  # the race this guards against did happen here


def test_parent_pid_outside_a_multiprocessing_child_is_getppid():
    from tst.processes import parent_pid

    assert multiprocessing.parent_process() is None
    assert parent_pid() == os.getppid()


def _helper_under_a_stop(conn) -> None:
    """A spawned helper's first lines, as a stop signal arrives before it ignores the signals:
    report the mask it started with, let the test signal it, then serve_the_trainer."""
    import signal

    from tst.processes import parent_pid, serve_the_trainer

    conn.send(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    conn.recv()  # the test has sent SIGUSR1 (Slurm's warning) by now: it is pending
    pending = sorted(int(s) for s in signal.sigpending())
    serve_the_trainer(parent_pid())  # ignored, then unblocked: the pending signal is dropped
    conn.send((pending, sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))))


def test_a_helper_spawned_with_the_stop_signals_blocked_survives_one_sent_while_it_starts():
    """What tst.checkpointing does around its spawned result-queue manager: the helper starts
    with the stop signals blocked (the mask survives the spawn's exec), a SIGUSR1 sent before
    its first call waits instead of ending it, and serve_the_trainer drops it and unblocks.
    The parent's own mask is back as it was afterwards."""
    import signal

    from tst.processes import STOP_SIGNALS, stop_signals_blocked

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    helper = ctx.Process(target=_helper_under_a_stop, args=(there,))
    with stop_signals_blocked():
        helper.start()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    try:
        assert here.poll(120), "the helper did not start"
        started_with = set(here.recv())
        assert {int(s) for s in STOP_SIGNALS} <= started_with
        os.kill(helper.pid, signal.SIGUSR1)  # a stop signal's default action ends a process
        here.send("sent")
        assert here.poll(60), f"the helper ended (exit code {helper.exitcode})"
        pending, mask_after = here.recv()
        assert int(signal.SIGUSR1) in pending
        assert not {int(s) for s in STOP_SIGNALS} & set(mask_after)
        helper.join(30)
        assert helper.exitcode == 0
    finally:
        if helper.is_alive():
            helper.kill()


def _write_marker(path: str) -> None:
    with open(path, "w") as f:
        f.write("written")


def test_persistent_writer_survives_a_stop_signal_sent_while_it_starts(tmp_path):
    """--use-persistent-ckpt-worker: megatron-core spawns its writer at the first save; a
    SIGUSR1 sent to it at once (while it imports) waits, blocked, until the writer ignores the
    stop signals, and the save it was handed completes. Without the block the signal's default
    action ended the writer and the save never completed."""
    import signal
    import time

    from megatron.core.dist_checkpointing.strategies.async_utils import (
        AsyncRequest,
        PersistentAsyncCaller,
    )

    from tst import checkpointing
    from tst.export.loading import single_process_world

    marker = str(tmp_path / "written")
    with single_process_world():
        checkpointing.use_persistent_writer_loop()
        caller = PersistentAsyncCaller()
        try:
            caller.schedule_async_call(AsyncRequest(_write_marker, (marker,), []))
            os.kill(caller.process.pid, signal.SIGUSR1)
            deadline = time.time() + 180
            while not caller.is_current_async_call_done(blocking=False, no_dist=True):
                assert caller.process.is_alive(), f"the writer ended ({caller.process.exitcode})"
                assert time.time() < deadline, "the save did not complete"
                time.sleep(0.2)
            with open(marker) as f:
                assert f.read() == "written"
            assert caller.process.is_alive()
        finally:
            if caller.process is not None and caller.process.is_alive():
                caller.close()
