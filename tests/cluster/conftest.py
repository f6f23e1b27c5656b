"""Fixtures of the cluster tests: real preprocessed text, and a real two-node Slurm cluster on
this host (started for the tests that ask for it, stopped by pid after them, whatever their
outcome).

These tests are part of the default run (``python -m pytest -q``, which ``.ci/run`` calls after
installing Slurm as root). Where Slurm is missing or the session is not root the Slurm tests
fail with the reason; ``-m "not cluster"`` leaves every test here out on purpose.
"""

from __future__ import annotations

import os

import pytest

from slurm_cluster import SlurmCluster, unavailable
from tiny_run import build_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, str]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def slurm():
    """A running two-node cluster; every daemon and job process is gone after the module."""
    reason = unavailable()
    if reason:
        pytest.fail(reason, pytrace=False)
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("TST_KEEP_CLUSTER_LOGS"):
            print(f"cluster logs kept in {cluster.root}")
        else:
            cluster.cleanup()
