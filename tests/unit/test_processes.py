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
