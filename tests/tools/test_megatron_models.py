"""Megatron-LM's own model configurations through ``pretrain_tst.py --dry-run``: the
parameter counts their makers published.

tests/data/megatron_models/*.args hold the ``MODEL_ARGS`` of Megatron-LM's ModelOpt model
configurations (``examples/post_training/modelopt/conf``, tag core_v0.16.1): the flags with
which Megatron-LM builds Qwen2.5 / Qwen3 (dense and MoE), DeepSeek-V2-Lite and R1 (MLA,
grouped routing), Llama 3.1 / 3.2 / 4, Kimi-K2, GPT-OSS and Nemotron models. Each runs
through the dry run with the flags a launch adds (data, steps, batch, learning rate) and,
where the file gives no ``--padded-vocab-size``, ``--vocab-size`` with the model's
published vocabulary (the tokenizers are downloads, not at hand). The model built on the
meta device must have the parameter count its makers published (model cards, technical
reports), within one unit of the published figure's last digit (the figures are rounded or
truncated). Publishers differ on whether the input embedding counts as active (only one of
its rows is read per token); each row below says which convention its figure follows.
"""

from __future__ import annotations

import os
import re

import pytest

import pretrain_tst

HERE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "megatron_models"
)
LAUNCH = ["--mock-data", "--train-iters", "10", "--global-batch-size", "8", "--lr", "1e-4"]

# model: (vocabulary when the file gives no --padded-vocab-size, published total and active
# parameters in billions as written (None: no usable figure), whether the published active
# figure counts the input embedding, where the figures come from).
PUBLISHED = {
    "Qwen2.5-0.5B-Instruct": (None, "0.49", None, None, "model card (tied embeddings)"),
    "Qwen2.5-7B-Instruct": (None, "7.61", None, None, "model card"),
    "Qwen3-0.6B": (151936, "0.6", None, None, "model card (tied embeddings)"),
    "Qwen3-8B": (151936, "8.2", None, None, "model card"),
    "Qwen3-30B-A3B": (151936, "30.5", "3.3", True, "model card"),
    "Qwen3-235B-A22B": (151936, "235", "22", True, "model card"),
    "DeepSeek-V2-Lite": (102400, "15.7", "2.4", False, "checkpoint size; README (2.4B active)"),
    # 671B without the MTP module, which this configuration does not build.
    "DeepSeek-R1": (129280, "671", "37", False, "DeepSeek-V3 technical report"),
    "Llama-3.1-8B-Instruct": (128256, "8.03", None, None, "model card"),
    "Llama-3.2-1B-Instruct": (128256, "1.24", None, None, "model card (tied embeddings)"),
    # The published totals (109B, 400B) include the vision encoder, which is not built here.
    "Llama-4-Scout-17B-16E-Instruct": (None, None, "17", True, "model card"),
    "Llama-4-Maverick-17B-128E-Instruct": (None, None, "17", True, "model card"),
    # Its report's 1.04T total could not be matched to its configuration; 32B active is.
    "Kimi-K2-Instruct": (None, None, "32", False, "technical report"),
    "gpt-oss-20b": (None, "20.91", "3.61", False, "model card, table 1"),
    "gpt-oss-120b": (None, "116.83", "5.13", False, "model card, table 1"),
    "Nemotron-Mini-4B-Instruct": (256000, "4.19", None, None, "model card"),
}
# Hybrid Mamba models: another architecture, refused by name.
HYBRID = ["Nemotron-H-8B-Base-8K", "NVIDIA-Nemotron-Nano-9B-v2"]


def read_args(name: str) -> list[str]:
    with open(os.path.join(HERE, f"{name}.args")) as f:
        return [token for line in f if not line.startswith("#") for token in line.split()]


def as_pretraining(name: str, argv: list[str]) -> list[str]:
    """The flags a pretraining run gives for what ModelOpt's model builder makes of the
    configuration (Megatron-LM's post_training/model_builder.py): Llama-4's two ``--export-``
    architecture flags; for GPT-OSS's YaRN positions (its ``--enable-gpt-oss``), which
    Megatron-LM's pretraining flags do not reach for ordinary attention, RoPE, as its GPT-OSS
    example passes (neither has parameters)."""
    renamed = {"--export-qk-l2-norm": "--qk-l2-norm",
               "--export-moe-apply-probs-on-input": "--moe-apply-probs-on-input"}  # fmt: skip
    argv = [renamed.get(a, a) for a in argv]
    if "--enable-gpt-oss" in argv:
        argv += ["--position-embedding-type", "rope"]
    return argv


def dry_run(argv: list[str], capsys) -> tuple[str, float, float, float]:
    """The dry run's output and its total, active and input-embedding parameters (B)."""
    assert pretrain_tst.main([*argv, *LAUNCH, "--dry-run"]) == 0
    out = capsys.readouterr().out
    total, active = re.search(r"total ([\d,.]+)M, active per token ([\d,.]+)M", out).groups()
    embedding = re.search(r"word embedding ([\d,.]+)M", out).group(1)
    total, active, embedding = (float(x.replace(",", "")) / 1e3 for x in (total, active, embedding))
    return out, total, active, embedding


def _unit(figure: str) -> float:
    """One unit of the published figure's last digit, in billions."""
    return 10.0 ** -len(figure.split(".")[1]) if "." in figure else 1.0


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_has_its_published_parameter_count(name, capsys):
    vocab, total_b, active_b, counts_input_embedding, source = PUBLISHED[name]
    argv = as_pretraining(name, read_args(name))
    if vocab is not None:
        assert "--padded-vocab-size" not in argv
        argv += ["--vocab-size", str(vocab)]
    out, total, active, embedding = dry_run(argv, capsys)
    assert "(agrees)" in out, out  # the built model equals the closed-form count
    if total_b is not None:
        assert abs(total - float(total_b)) <= _unit(total_b), (name, total, total_b, source)
    if active_b is not None:
        ours = active if counts_input_embedding else active - embedding
        assert abs(ours - float(active_b)) <= _unit(active_b), (name, ours, active_b, source)
    if "--padded-vocab-size" in argv:  # taken as given: no padding to a multiple of 128
        padded = argv[argv.index("--padded-vocab-size") + 1]
        assert f"(padded to {padded} for TP=1)" in out, out


def test_every_configuration_is_covered():
    files = sorted(f[: -len(".args")] for f in os.listdir(HERE) if f.endswith(".args"))
    assert files == sorted([*PUBLISHED, *HYBRID])


def test_configurations_as_published(capsys):
    """Unchanged, Llama-4's ModelOpt flags are refused naming the pretraining flag to use;
    GPT-OSS's builds learned absolute positions as Megatron-LM's pretraining does (its
    --enable-gpt-oss is read by ModelOpt's builder only): 118M more parameters (40,960
    positions x 2,880), said in a warning and the accepted-flag line; hybrid Mamba models
    are refused."""
    with pytest.raises(ValueError) as refused:
        pretrain_tst.main([*read_args("Llama-4-Scout-17B-16E-Instruct"), *LAUNCH, "--dry-run"])
    said = str(refused.value)
    assert "--export-qk-l2-norm: a Megatron-LM ModelOpt flag" in said
    assert "pretraining sets that with --qk-l2-norm" in said
    assert "pretraining sets that with --moe-apply-probs-on-input" in said

    with pytest.warns(UserWarning, match=r"--enable-gpt-oss is read by Megatron-LM's ModelOpt "
                      r"model builder only .* this run builds learned absolute positions"):  # fmt: skip
        out, total, _, _ = dry_run(read_args("gpt-oss-20b"), capsys)
    assert "positions learned absolute" in out and "example passes rope" in out
    assert abs(total - 20.91 - 40960 * 2880 / 1e9) <= 0.01, total

    for name in HYBRID:
        with pytest.raises(ValueError, match=r"--hybrid-override-pattern: another "
                           r"Megatron-LM architecture \(Mamba"):  # fmt: skip
            pretrain_tst.main([*read_args(name), *LAUNCH, "--dry-run"])


def test_deepseek_v3_with_mtp_on_megatron_lms_documented_pipeline_layout(capsys):
    """Megatron-LM's pipeline-layout documentation partitions DeepSeek-V3 (61 decoder layers
    and one MTP layer) at PP 16 x VPP 2 as ``Et*3|(tt|)*29,m|L``: the MTP block alone in
    rank 14's second virtual stage, the loss alone in rank 15's. DeepSeek-R1's configuration
    (the same architecture) with one MTP depth lays out so, and the per-rank parameters show
    the block where the layout puts it: rank 14 holds two layers, the MTP block and its copy
    of the embedding; rank 13 four layers and the final norm (it holds the last decoder
    layer); rank 15 two layers and the output layer. Their differences give the MTP block
    as DeepSeek-V3 describes it: one MoE layer, the projection of the two normed inputs
    (``2h x h``) and the norms (here ``3h``: megatron-core normalises the output too)."""
    argv = [*read_args("DeepSeek-R1"), "--vocab-size", "129280", "--mtp-num-layers", "1",
            "--pipeline-model-parallel-size", "16",
            "--pipeline-model-parallel-layout", "Et*3|(tt|)*29,m|L"]  # fmt: skip
    assert pretrain_tst.main([*argv, *LAUNCH, "--global-batch-size", "32", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {int(stage): (layers, float(params.replace(",", "")))
            for stage, layers, params in re.findall(
                r"^\s+(\d+)\s+([\d,-]+(?: \+MTP)?|none)\s+([\d,.]+)M ", out, re.M)}  # fmt: skip
    assert sorted(rows) == list(range(16)), out
    assert rows[0][0] == "0-2,33-34" and rows[1][0] == "3-4,35-36"
    assert rows[13][0] == "27-28,59-60" and rows[14][0] == "29-30 +MTP"
    assert rows[15][0] == "31-32" and sum(" +MTP" in r[0] for r in rows.values()) == 1
    h, vocab = 7168, 129280
    moe_layer = (rows[13][1] * 1e6 - h) / 4  # four MoE layers and the final norm
    mtp = rows[14][1] * 1e6 - (2 * moe_layer + vocab * h)
    assert rows[15][1] * 1e6 == pytest.approx(2 * moe_layer + vocab * h, abs=0.2e6)
    assert mtp == pytest.approx(moe_layer + 2 * h * h + 3 * h, abs=0.3e6)
    assert re.search(r"MTP block \(1 depth, on stage 14; .*\): 11,6\d\d\.\dM", out), out
