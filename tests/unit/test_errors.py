"""One error hierarchy: every exception class the project defines is a TSTError, on the
branch that says whose move it is (an input to fix, or a run that failed)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import pytest

import tst
from tst.errors import ConfigError, InputError, RunError, TSTError, exit_code

ROOT = Path(__file__).resolve().parents[2]


def _project_modules():
    for info in pkgutil.walk_packages(tst.__path__, "tst."):
        yield importlib.import_module(info.name)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        for path in sorted((ROOT / "tools").glob("*.py")):
            yield importlib.import_module(path.stem)
    finally:
        sys.path.remove(str(ROOT / "tools"))


def _defined_errors():
    for module in _project_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                yield cls


def test_every_project_error_is_a_tst_error():
    errors = set(_defined_errors())
    # The walk found the errors of every area (guards against an empty walk passing).
    names = {cls.__name__ for cls in errors}
    assert {"CheckpointError", "IndexedDatasetError", "TokenizerFileError", "ExportError",
            "MetricsFileError", "DatasetTooSmallError", "NonFiniteLossError"} <= names  # fmt: skip
    stray = sorted(cls.__qualname__ for cls in errors if not issubclass(cls, TSTError))
    assert not stray, f"error classes outside tst.errors.TSTError: {stray}"
    both = sorted(
        c.__name__ for c in errors if issubclass(c, InputError) and issubclass(c, RunError)
    )
    assert not both


def test_branches_and_exit_codes():
    from tst.checkpointing import CheckpointError
    from tst.data.datasets import TokenIdError

    assert issubclass(CheckpointError, RunError) and exit_code(CheckpointError("x")) == 3
    assert issubclass(TokenIdError, InputError) and exit_code(TokenIdError("x")) == 2
    assert exit_code(ValueError("argparse-level")) == 2
    assert exit_code(KeyError("bug")) == 1
    # Callers that caught the builtin bases keep working.
    assert issubclass(InputError, ValueError) and issubclass(RunError, RuntimeError)


ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "2",
        "--mock-data"]  # fmt: skip


@pytest.mark.parametrize(
    "extra, flag",
    [(["--seed", "-1"], "--seed"), (["--dry-run-report", "r.json"], "--dry-run-report")],
)
def test_flag_checks_raise_config_error(extra, flag):
    from tst.config import parse_args

    with pytest.raises(ConfigError, match=flag):
        parse_args([*ARGS, *extra])


def test_only_a_collective_failure_is_reworded():
    """gloo's timeout and a broken connection become one line naming the rank, the cause and
    the timeouts; any other RuntimeError (a bug) keeps its traceback."""
    from tst.errors import RunError, collective_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed "
                        "out waiting 2000ms for recv operation to complete\nmore")  # fmt: skip
    failure = collective_failure(gloo, 1, "--distributed-timeout-minutes 10")
    assert isinstance(failure, RunError) and "\n" not in str(failure)
    assert str(failure).startswith("rank 1: a collective operation did not complete ([../third")
    assert "collectives wait --distributed-timeout-minutes 10" in str(failure)
    peer = RuntimeError("Connection closed by peer [10.0.0.2]:29500")
    assert collective_failure(peer, 0, "x") is not None
    assert collective_failure(RuntimeError("shape mismatch: [2, 3] vs [3, 2]"), 0, "x") is None
    assert collective_failure(RunError("timed out on purpose"), 0, "x") is None
    assert collective_failure(ValueError("Timed out waiting"), 0, "x") is None
