"""Public Megatron-LM launch scripts, unchanged, through ``pretrain_tst.py --dry-run``.

tests/data/megatron_scripts/*.args hold the flags eight public scripts written by others
pass to Megatron-LM's pretrain_gpt.py (source, commit and GPU count in each header; data and
checkpoint paths replaced by placeholders). Each runs through the dry run at its own GPU
count with nothing added but ``--dry-run --dry-run-world-size N``: it either lays its model
out, or is refused with one line naming what cannot run and why (what Megatron-LM itself
refuses, or a fork's own flag), never with a traceback or an unknown-flag error for a flag of
upstream Megatron-LM.
"""

from __future__ import annotations

import os
import re

import pytest

import pretrain_tst
from tst.config import build_parser

HERE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "megatron_scripts"
)

# What each script must do: lay out its model, or be refused naming the cause.
EXPECTED = {
    # Megatron-LM refuses this script as published too ("expected no batch-size rampup for
    # iteration-based training"): the message names the fix.
    "gpt3_175b": r"--rampup-batch-size needs sample-based training \(--train-samples\)",
    "llama3_8b_fp8": None,
    "mixtral_8x7b": None,
    # A Megatron-LM fork's script: its own flags are refused by name.
    "llama3_70b": r"--use-mpi: a Megatron-LM fork's flag.*--use-z-loss: a Megatron-LM fork's",
    # Megatron-LM refuses this recipe as its wrapper assembles it too (--tp-comm-overlap at
    # TP 1, where sequence parallelism is off).
    "moe_zoo_qwen3_30b_a3b": r"--tp-comm-overlap needs --sequence-parallel",
    # MLA, multi-token prediction and the uneven pipeline layout lay out (see
    # test_deepseek_v3_recipe_lays_out_its_published_size).
    "moe_zoo_deepseek_v3": None,
    # GPT-OSS's architecture (sinks, sliding windows, quick-GEGLU); it asks for FP8, which a
    # dry run lays out from anywhere.
    "gpt_oss": None,
    # Pai-Megatron-Patch's own pretrain script's flags.
    "pai_qwen3_moe": r"--dataset: a Pai-Megatron-Patch flag.*--train-mode: a Pai-Megatron",
}


def read_args(name: str) -> tuple[list[str], int]:
    """The script's flags as its shell passes them (no re-quoting), and its GPU count."""
    argv, gpus = [], None
    with open(os.path.join(HERE, f"{name}.args")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("# gpus:"):
                gpus = int(line.split(":", 1)[1])
            if line and not line.startswith("#"):
                argv.extend(line.split())
    assert gpus, f"{name}.args has no '# gpus: N' header"
    return argv, gpus


def _dry_run(argv: list[str], gpus: int, capsys) -> str:
    assert pretrain_tst.main([*argv, "--dry-run", "--dry-run-world-size", str(gpus)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_script_runs_unchanged_or_is_refused_by_name(name, capsys):
    argv, gpus = read_args(name)
    if EXPECTED[name] is None:
        out = _dry_run(argv, gpus, capsys)
        assert f"layout for a world of {gpus}:" in out
        assert "(agrees)" in out  # the built model matches the closed-form count
    else:
        with pytest.raises(ValueError, match=EXPECTED[name]):
            _dry_run(argv, gpus, capsys)


def test_gpt3_175b_with_megatrons_fix_lays_out_175b(capsys):
    """The GPT-3 script with --train-iters turned into --train-samples (what Megatron-LM asks
    for with a ramp-up): 174.6B parameters, learned positions, LayerNorm, biases, dropout."""
    argv, gpus = read_args("gpt3_175b")
    iters = int(argv[argv.index("--train-iters") + 1])
    gbs = int(argv[argv.index("--global-batch-size") + 1])
    i = argv.index("--train-iters")
    argv[i : i + 2] = ["--train-samples", str(iters * gbs)]
    i = argv.index("--lr-decay-iters")
    argv[i : i + 2] = ["--lr-decay-samples", str(int(argv[i + 1]) * gbs)]
    out = _dry_run(argv, gpus, capsys)
    total = float(re.search(r"total ([\d,.]+)M, active", out).group(1).replace(",", ""))
    assert 174_000 < total < 176_000, out  # GPT-3 175B (with GPT-2's 50,257-entry vocabulary)
    assert "positions learned absolute; LayerNorm" in out and "biases on" in out
    assert "dropout hidden 0.1 / attention 0.1" in out and "precision fp16" in out
    assert "batch ramp-up 16 -> 1536" in out


def test_llama3_8b_resolves_to_llama(capsys):
    argv, gpus = read_args("llama3_8b_fp8")
    out = _dry_run(argv, gpus, capsys)
    total = float(re.search(r"total ([\d,.]+)M, active", out).group(1).replace(",", ""))
    assert 8_000 < total < 8_100, out  # Llama-3 8B: 8.03B with its 128,256-entry vocabulary
    # The script passes no --normalization: Megatron-LM's LayerNorm, zero-centred (1p).
    assert "RoPE (base 1000000" in out and "LayerNorm (eps 1e-05, 1p)" in out
    assert "biases off" in out
    assert "32 heads (8 query groups)" in out


def test_every_upstream_flag_of_the_scripts_is_known():
    """Every flag the eight scripts pass is implemented, an alias, accepted or refused:
    none is unknown."""
    known = set(build_parser()._option_string_actions)
    for name in EXPECTED:
        argv, _ = read_args(name)
        unknown = sorted({a for a in argv if a.startswith("--") and a not in known})
        assert not unknown, f"{name}: {unknown}"


def test_qwen3_30b_a3b_recipe_lays_out_its_published_size(capsys):
    """The MoE zoo's Qwen3-30B-A3B recipe without the --tp-comm-overlap Megatron-LM refuses
    at TP 1, with Qwen3's 151,936-entry vocabulary: 30.5B total, 3.3B active parameters."""
    argv, gpus = read_args("moe_zoo_qwen3_30b_a3b")
    argv = [a for a in argv if a != "--tp-comm-overlap"] + ["--vocab-size", "151936"]
    out = _dry_run(argv, gpus, capsys)
    total, active = (
        float(x.replace(",", ""))
        for x in re.search(r"total ([\d,.]+)M, active per token ([\d,.]+)M", out).groups()
    )
    assert abs(total - 30_500) < 100 and abs(active - 3_300) < 100, out
    assert "EP=8" in out and "(agrees)" in out


def _deepseek_v3_by_hand() -> tuple[int, int]:
    """DeepSeek-V3's parameters counted from its published configuration (config.json of
    deepseek-ai/DeepSeek-V3: hidden 7168, 61 layers of which the first 3 dense with FFN
    18432, 256 routed experts of FFN 2048 with top-8 and 1 shared expert, MLA with q rank
    1536, kv rank 512, head dims 128 + 64 (RoPE) and values 128, 128 heads, vocabulary
    129280, RMSNorm, untied embeddings), without the MTP module. (total, active)."""
    h, heads, vocab = 7168, 128, 129280
    attention = (h * 1536 + 1536 + 1536 * heads * (128 + 64)  # queries: down, norm, up
                 + h * (512 + 64) + 512 + 512 * heads * (128 + 128)  # keys/values
                 + heads * 128 * h)  # output projection  # fmt: skip
    swiglu = lambda ffn: 3 * h * ffn  # noqa: E731
    norms = 2 * h
    dense = attention + swiglu(18432) + norms
    # Router: h x 256 (its expert bias is a buffer, state but no parameter).
    moe_total = attention + 256 * swiglu(2048) + swiglu(2048) + h * 256 + norms
    moe_active = attention + 8 * swiglu(2048) + swiglu(2048) + h * 256 + norms
    embeddings = 2 * vocab * h + h  # input and output tables, final norm
    return (3 * dense + 58 * moe_total + embeddings, 3 * dense + 58 * moe_active + embeddings)


def test_deepseek_v3_recipe_lays_out_its_published_size(capsys):
    """The MoE zoo's DeepSeek-V3 recipe, unchanged (MLA, 3 dense layers then 58 MoE layers
    of 256 experts top-8 + 1 shared, sigmoid routing with expert bias, device-limited groups,
    MTP depth 1, the uneven layout Et|(tt|)*30mL on PP 8) at its 1024 GPUs, with
    DeepSeek-V3's 129,280-entry vocabulary: the build equals a count by hand from the
    published configuration, and the published 671B total / 37B active within 1% / 1.5%
    (37B is rounded to two digits; the count here is 37.55B with the input embedding)."""
    argv, gpus = read_args("moe_zoo_deepseek_v3")
    out = _dry_run(argv + ["--vocab-size", "129280"], gpus, capsys)
    total, active = (
        float(x.replace(",", "")) * 1e6
        for x in re.search(r"total ([\d,.]+)M, active per token ([\d,.]+)M", out).groups()
    )
    want_total, want_active = _deepseek_v3_by_hand()
    assert abs(total - want_total) <= 0.05e6 and abs(active - want_active) <= 0.05e6, out
    assert abs(total / 671e9 - 1) < 0.01 and abs(active / 37e9 - 1) < 0.015, out
    assert "(agrees)" in out and "MTP block (1 depth" in out
    assert "TP=2 PP=8 VPP=4 DP=64 EP=64 ETP=1 expert-DP=2 +SP" in out
    # Stage 0 holds the embedding and layer 0 (then layers 15-16, ...); stage 7 ends with
    # the MTP depth and the loss.
    assert re.search(r"^\s+0\s+0,15-16,31-32,47-48\s", out, re.M), out
    assert re.search(r"^\s+7\s+13-14,29-30,45-46\s", out, re.M), out


def test_deepseek_v3_recipe_with_the_zoos_optimizer_offload(capsys):
    """The recipe as the zoo's ``OPTIMIZER_OFFLOAD=1`` assembles it: its
    sbatch_benchmarking.sh adds ``--optimizer-cpu-offload --overlap-cpu-optimizer-d2h-h2d``
    and leaves ``--fp8-param-gather`` out (the offload does not take it with the blockwise
    recipe). It lays out with Adam's state in host memory; the recipe's bf16 moments, which
    megatron-core's hybrid optimizer does not take, are named in a warning."""
    import warnings

    argv, gpus = read_args("moe_zoo_deepseek_v3")
    argv = [a for a in argv if a != "--fp8-param-gather"]
    argv += ["--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d", "--vocab-size", "129280"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _dry_run(argv, gpus, capsys)
    said = [str(w.message) for w in caught if "offload" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("--exp-avg-dtype bf16, --exp-avg-sq-dtype bf16: "
                                                 "with --optimizer-cpu-offload"), said  # fmt: skip
    assert "--optimizer-cpu-offload: 100% of Adam's state in host memory" in out
    rows = re.findall(r"^\s+\d+\s+[\d,-]+(?: \+MTP)?\s+[\d,.]+M((?:\s+[\d.]+){6})$", out, re.M)
    assert len(rows) == 8, out
    for row in rows:  # weights, grads, Adam, activations, total, host (GiB)
        adam, host = float(row.split()[2]), float(row.split()[5])
        assert adam == 0.0 and host > 1.0, out
    # The same recipe with the fp8 parameter gather it leaves out: Megatron-LM's rule.
    with pytest.raises(ValueError, match="--fp8-param-gather needs --fp8-recipe delayed"):
        pretrain_tst.main(argv + ["--fp8-param-gather", "--dry-run", "--dry-run-world-size",
                                  str(gpus)])  # fmt: skip
