"""Every Megatron-LM flag in tst/megatron_flags.py's tables behaves as its table says:
a refused flag stops the run with one line naming it and the reason; an accepted flag parses
and the dry run lists it as having no effect here (with its reason)."""

from __future__ import annotations

import contextlib
import io

import pytest

from tst.config import parse_args
from tst.errors import ConfigError
from tst.megatron_flags import ACCEPTED, REFUSED

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "4",
        "--mock-data", "--vocab-size", "512"]  # fmt: skip


def _with_value(flag: str, nargs) -> list[str]:
    return [flag] if nargs == 0 else [flag, "1"]


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flag_is_one_line_naming_it(flag):
    with pytest.raises(ConfigError) as caught:
        parse_args([*BASE, *_with_value(flag, REFUSED[flag].nargs)])
    message = str(caught.value)
    assert flag in message and "\n" not in message
    assert REFUSED[flag].reason in message


def test_accepted_flags_parse_and_the_dry_run_lists_them():
    import pretrain_tst

    argv = [*BASE, "--dry-run"]
    for flag in sorted(ACCEPTED):
        argv += _with_value(flag, ACCEPTED[flag].nargs)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pretrain_tst.main(argv) == 0
    text = out.getvalue()
    missing = [f for f in ACCEPTED if f"accepted, no effect here: {f}: {ACCEPTED[f].reason}"
               not in text]  # fmt: skip
    assert not missing, missing
