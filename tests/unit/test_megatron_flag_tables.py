"""Every Megatron-LM flag in tst/megatron_flags.py's tables behaves as its table says:
a refused flag stops the run with one line naming it and the reason; an accepted flag parses
and the dry run lists it as having no effect here (with its reason)."""

from __future__ import annotations

import contextlib
import io

import pytest

from tst.config import parse_args
from tst.errors import ConfigError
from tst.megatron_flags import ACCEPTED, ALIASES, REFUSED

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


# A value for the aliases that take one (the alias's target flag is valued).
_ALIAS_VALUES = {"--rope-theta": "500000", "--wandb-name": "run-1"}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_configures_what_its_target_does(alias):
    """Each alias (Megatron-LM's other spelling, a fork's name) parses to the configuration
    its target gives; a valued alias also in the ``--alias=value`` form."""
    import dataclasses

    value = _ALIAS_VALUES.get(alias)
    extra = [alias] + ([value] if value else [])
    target = ALIASES[alias] + ([value] if value else [])
    got, want = parse_args([*BASE, *extra]), parse_args([*BASE, *target])
    assert dataclasses.asdict(got) == dataclasses.asdict(want)
    assert dataclasses.asdict(got) != dataclasses.asdict(parse_args(BASE))  # it changes something
    if value:
        joined = parse_args([*BASE, f"{alias}={value}"])
        assert dataclasses.asdict(joined) == dataclasses.asdict(want)
