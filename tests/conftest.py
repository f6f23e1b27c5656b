"""Shared fixtures: gloo worlds of 2 and 4 ranks, one of each at a time per test session."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

# One torch thread per test process, and per process a test starts (the variable is
# inherited): the suite runs one worker a core plus one, and torch's default of a thread a
# core makes busy workers' threads wait on each other (small ops 10-40x slower when two
# processes each run two threads on two cores). TST_TEST_THREADS overrides.
_THREADS = os.environ.get("TST_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = _THREADS
torch.set_num_threads(int(_THREADS))

from distributed import ProcessWorld  # noqa: E402

_WORLDS: dict[int, ProcessWorld] = {}
_USES: dict[int, int] = {}
# A world's ranks keep the gloo threads of the layouts their tests set up (megatron-core
# holds on to some of its groups; hundreds of idle polling threads per rank slowed the whole
# suite): a world serves this many tests, then fresh processes take over (forked from a
# preloaded server: a fraction of a second).
TESTS_PER_WORLD = int(os.environ.get("TST_TESTS_PER_WORLD", "6"))


def _world(size: int) -> ProcessWorld:
    world = _WORLDS.get(size)
    if world is not None and not world.closed and _USES.get(size, 0) >= TESTS_PER_WORLD:
        world.close()
    if world is None or world.closed:
        world = _WORLDS[size] = ProcessWorld(size)
        _USES[size] = 0
    _USES[size] += 1
    return world


@pytest.fixture
def world2() -> ProcessWorld:
    """Two gloo ranks (rebuilt if an earlier test broke them)."""
    return _world(2)


@pytest.fixture
def world4() -> ProcessWorld:
    """Four gloo ranks (rebuilt if an earlier test broke them)."""
    return _world(4)


@pytest.fixture
def world6() -> ProcessWorld:
    """Six gloo ranks (PP 3 beside EP 2; rebuilt if an earlier test broke them)."""
    return _world(6)


# The longest test files, longest first (measured with --durations=150): with
# ``--no-loadscope-reorder`` the workers take files in this order, so the last file to
# finish is a short one and neither worker waits long on the other.
LONGEST_FIRST = (
    "tests/cluster/",
    "tests/unit/test_reliability.py",
    "tests/tools/test_trend_study.py",
    "tests/distributed/test_trainer.py",
    "tests/tools/test_gpu_study.py",
    "tests/distributed/test_megatron_features.py",
    "tests/distributed/test_mtp_routing_runs.py",
    "tests/distributed/test_moe_routing.py",
)


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # a plugin's hook: -p no:xdist runs too
def pytest_xdist_auto_num_workers(config):
    """``--numprocesses=auto``: one worker per core, plus one. The cluster tests (one worker,
    one after another) spend much of their time waiting on Slurm's clocks (its time-limit
    check every 30 s, KillWait, a one-minute distributed timeout); the extra worker keeps the
    cores busy meanwhile. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides, as in pytest-xdist."""
    given = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if given:
        return int(given)
    return len(os.sched_getaffinity(0)) + 1


def _rank(path: str) -> int:
    return next((i for i, p in enumerate(LONGEST_FIRST) if path.startswith(p)), len(LONGEST_FIRST))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist's ``--dist=loadgroup`` (pyproject.toml), a test file goes to one
    worker whole: its module fixtures (a dry study, a spawned world) are made once. The
    cluster tests share one worker, for there is one Slurm cluster on this host."""
    paths = {item: item.path.relative_to(config.rootpath) for item in items}
    items.sort(key=lambda item: _rank(paths[item].as_posix()))
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            path = paths[item]
            group = "cluster" if path.parts[:2] == ("tests", "cluster") else str(path)
            item.add_marker(pytest.mark.xdist_group(group))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_runtest_teardown(item, nextitem):
    """A test file's last test closes the worlds: idle ranks still spend CPU on gloo's
    threads, and the next file's tests (often on the other worker) would wait behind them."""
    if nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None):
        for world in _WORLDS.values():
            world.close()


def pytest_sessionfinish(session, exitstatus):
    for world in _WORLDS.values():
        world.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """``TST_TEST_TIMELINE=FILE``: a JSON line per test (worker, start, end, load) to FILE, to
    see which tests ran beside which (the suite's wall time is what they do to each other)."""
    path = os.environ.get("TST_TEST_TIMELINE")
    if not path:
        yield
        return
    import json
    import time

    start = time.time()
    yield
    record = {
        "test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "start": start, "end": time.time(), "load": os.getloadavg()[0],
    }  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
