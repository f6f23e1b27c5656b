"""Every flag of pretrain_tst.py is exercised by some test: named in a test file (or a
public launch script the tests run), or in a Megatron flag table that
tests/unit/test_megatron_flag_tables.py walks. The few left are listed here with the reason,
so a new flag without a test fails this check."""

from __future__ import annotations

import re
from pathlib import Path

from tst.config import build_parser
from tst.megatron_flags import ACCEPTED, ALIASES, REFUSED

TESTS = Path(__file__).resolve().parents[1]

# Flags no CPU test can exercise, with why.
NOT_ON_CPU = {
    "--fp8-margin": "FP8 needs Transformer Engine on a Hopper/Blackwell GPU (bench/gpu_check.sh)",
    "--first-last-layers-bf16": "an FP8 recipe setting (Transformer Engine on a GPU)",
    "--cp-comm-type": "Transformer Engine's CP attention only (the local spec's all-gathers)",
    "--moe-enable-deepep": "DeepEP needs CUDA (the flex dispatcher's refusal is tested)",
}


def test_every_flag_is_exercised_by_a_test():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings
             if s.startswith("--") and s != "--help"}  # fmt: skip
    here = Path(__file__).resolve()
    text = "".join(p.read_text() for p in TESTS.rglob("*.py") if p.resolve() != here)
    text += "".join(p.read_text() for p in (TESTS / "data").rglob("*.args"))
    named = {f for f in flags if re.search(re.escape(f) + r"(?![\w-])", text)}
    # Aliases: test_megatron_flag_tables.py checks each against its target.
    untested = sorted(flags - named - set(ACCEPTED) - set(REFUSED) - set(ALIASES) - set(NOT_ON_CPU))
    assert not untested, f"flags no test exercises: {untested}"
    assert set(NOT_ON_CPU) <= flags, "a listed flag no longer exists: update NOT_ON_CPU"
