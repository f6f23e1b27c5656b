"""The published-MoE-shaped TST configs (examples/configs/moe_30b_a3b.sh, moe_671b_a37b.sh)
through their launch scripts' dry run, at the GPU counts they are laid out for.

Each prints the published model's size (Qwen3-30B-A3B: 30.5B total / 3.3B active with the
Qwen3 vocabulary; DeepSeek-V3: 671B / 37B with its 129,280-entry one, within 1% / 1.5%: the
37B is rounded to two digits), the closed-form count agrees with the meta-device build, the
TST phases are the paper's MoE run (bag size 16, superposition a quarter of the steps), and
the layout and per-GPU memory fit an 80 GB GPU by the dry run's estimate.
"""

from __future__ import annotations

import re

import pytest
from test_examples import _COUNTS, EXAMPLES, SLURM, run_dry, script_argv

CASES = {
    # config: (script, env, total, active, tolerance of total / active, layout line)
    "moe_30b_a3b": (SLURM, {"NNODES": "2"}, 30.5e9, 3.3e9, (0.01, 0.02),
                    "layout for a world of 16: TP=1 PP=1 DP=16 EP=8 ETP=1"),
    "moe_671b_a37b": (SLURM, {"NNODES": "128", "VOCAB_SIZE": "129280"}, 671e9, 37e9,
                      (0.01, 0.015),
                      "layout for a world of 1024: TP=2 PP=8 VPP=4 DP=64 EP=64 ETP=1"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_config_lays_out_its_published_size(name, tmp_path, capsys):
    script, env, want_total, want_active, (tol_total, tol_active), layout = CASES[name]
    config = EXAMPLES / "configs" / f"{name}.sh"
    argv = script_argv(script, tmp_path, CONFIG=str(config), **env)
    out = run_dry(argv, capsys)
    total, active = (float(x.replace(",", "")) * 1e6 for x in _COUNTS.search(out).groups())
    assert abs(total / want_total - 1) < tol_total, out
    assert abs(active / want_active - 1) < tol_active, out
    assert "(agrees)" in out, out
    assert layout in out, out
    # The paper's MoE run: bag size 16 for the first quarter of the steps.
    assert re.search(r"0 superposition\s+0\.\.12499\s+16\s+16", out), out
    assert re.search(r"1 recovery\s+12500\.\.49999\s+1\s+1", out), out
    # Every stage's weights, gradients, Adam shard and activations fit an 80 GB GPU.
    totals = [float(m) for m in re.findall(r"^\s+\d+\s+[\d,\-]+\s+[\d,.]+M(?:\s+[\d.]+){4}\s+([\d.]+)$",
                                           out, re.M)]  # fmt: skip
    assert totals and max(totals) < 80 / 1.074, out  # GiB
