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


def test_refused_flag_is_one_line_naming_it():
    """Every refused flag (about 400, one loop: a test each cost more in scheduling than in
    parsing) stops the run with one line naming it and its reason."""
    wrong = []
    for flag in sorted(REFUSED):
        try:
            parse_args([*BASE, *_with_value(flag, REFUSED[flag].nargs)])
        except ConfigError as error:
            message = str(error)
            if flag in message and "\n" not in message and REFUSED[flag].reason in message:
                continue
            wrong.append(f"{flag}: {message}")
        else:
            wrong.append(f"{flag}: accepted")
    assert not wrong, wrong


def test_accepted_flags_parse_and_the_dry_run_lists_them():
    import pretrain_tst

    argv = [*BASE, "--dry-run", "--no-load-optim"]  # --load-main-params-from-ckpt's rule
    for flag in sorted(ACCEPTED):
        argv += _with_value(flag, ACCEPTED[flag].nargs)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pretrain_tst.main(argv) == 0
    text = out.getvalue()
    missing = [f for f in ACCEPTED if f"accepted, no effect here: {f}: {ACCEPTED[f].reason}"
               not in text]  # fmt: skip
    assert not missing, missing


@pytest.mark.parametrize("release, count, implemented", [("0.16.1", 600, 200),
                                                        ("0.19.0", 800, 200)])  # fmt: skip
def test_every_megatron_lm_flag_is_known(release, count, implemented):
    """Every flag of Megatron-LM 0.16.1's parser (tests/data/megatron_lm_0.16.1_flags.txt),
    and of 0.19.0's (the newest release's: its scripts run here too), is implemented, an
    alias, accepted or refused: a launch script never meets "unknown flag"."""
    import os

    from tst.config import build_parser
    from tst.megatron_flags import classify

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data",
                        f"megatron_lm_{release}_flags.txt")  # fmt: skip
    with open(path) as f:
        flags = [line.strip() for line in f if line.startswith("--")]
    assert len(flags) > count
    parser = build_parser()
    kinds = {flag: classify(parser, flag)[0] for flag in flags}
    assert not [f for f, kind in kinds.items() if kind == "unknown"]
    assert sum(kind == "implemented" for kind in kinds.values()) > implemented


# A value for the aliases that take one (the alias's target flag is valued).
_ALIAS_VALUES = {
    "--rope-theta": "500000",
    "--wandb-name": "run-1",
    "--dist-ckpt-format": "torch",
    "--tiktoken-special-tokens": "<pad>",
    "--persistent-save-interval": "500",
}


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
    assert dataclasses.asdict(got) != dataclasses.asdict(parse_args(BASE))  # it changes
    if value:
        joined = parse_args([*BASE, f"{alias}={value}"])
        assert dataclasses.asdict(joined) == dataclasses.asdict(want)
