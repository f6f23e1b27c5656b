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
