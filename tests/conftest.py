"""Shared fixtures: spawned gloo worlds of 2 and 4 ranks, one of each per test session."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

from distributed import ProcessWorld  # noqa: E402

_WORLDS: dict[int, ProcessWorld] = {}
_USES: dict[int, int] = {}
# A world's ranks keep the gloo threads of the layouts their tests set up (megatron-core
# holds on to some of its groups; hundreds of idle polling threads per rank slowed the whole
# suite): a world serves this many tests, then fresh processes take over (a few seconds).
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


def pytest_sessionfinish(session, exitstatus):
    for world in _WORLDS.values():
        world.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
