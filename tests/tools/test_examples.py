"""Launch scripts and paper-scale configs: syntax, the arguments they assemble, the dry run.

Each script is run for real with ``DRY_RUN=1`` and a stand-in ``python`` that prints the
argument list it would have started ``pretrain_tst.py`` with; those arguments then go to
``pretrain_tst.main`` in this process (one megatron-core import for the whole file), which
builds the model on the meta device. The per-rank layout rules of the dry run are checked
against models really built under TP / PP / VPP / EP in a spawned gloo world of four.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flags import SMALL_GPT

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.sh"))
RECIPE = EXAMPLES / "configs" / "common" / "paper_recipe.sh"  # sourced by every config
SCRIPTS = sorted([*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("*.sbatch"), *CONFIGS, RECIPE])
SINGLE_NODE = EXAMPLES / "train_single_node.sh"
SLURM = EXAMPLES / "train_slurm.sbatch"

_COUNTS = re.compile(r"total ([\d,.]+)M, active per token ([\d,.]+)M")


def test_every_launch_file_is_found():
    names = {p.name for p in SCRIPTS}
    assert {"train_single_node.sh", "train_slurm.sbatch", "quickstart_cpu.sh"} <= names
    assert [p.stem for p in CONFIGS] == [
        "dense_270m",
        "dense_3b",
        "dense_600m",
        "moe_10b_a1b",
        "moe_30b_a3b",
        "moe_671b_a37b",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def script_argv(script: Path, tmp_path: Path, *extra: str, **env: str) -> list[str]:
    """The ``pretrain_tst.py`` arguments ``script`` assembles in its ``DRY_RUN=1`` mode."""
    stub = tmp_path / "python-stub"
    stub.write_text('#!/bin/sh\nprintf "%s\\0" "$@"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    clean.update(
        DRY_RUN="1",
        PYTHON=str(stub),
        TOKENIZER_MODEL=str(tmp_path / "no-tokenizer.json"),  # absent: the dry run's --vocab-size
        SAVE_DIR=str(tmp_path / "ckpt"),
        **env,
    )
    result = subprocess.run(
        ["bash", str(script), *extra], env=clean, capture_output=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    argv = result.stdout.decode().split("\0")[:-1]
    assert argv[0] == "pretrain_tst.py"
    return argv[1:]


def run_dry(argv: list[str], capsys) -> str:
    """``pretrain_tst.main(argv)`` in this process; checks it leaves no distributed state."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import pretrain_tst

    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        assert pretrain_tst.main(argv) == 0
    finally:
        assert not dist.is_initialized()
        assert not ps.model_parallel_is_initialized()
        assert {k: os.environ.get(k) for k in env} == env
    return capsys.readouterr().out


def named_sizes(stem: str) -> tuple[float, float]:
    """(total, active) parameters a config's name promises: dense_270m, moe_10b_a1b."""
    scale = {"m": 1e6, "b": 1e9}
    match = re.search(r"_(\d+)([mb])(?:_a(\d+)([mb]))?$", stem)
    total = int(match.group(1)) * scale[match.group(2)]
    active = int(match.group(3)) * scale[match.group(4)] if match.group(3) else total
    return total, active


# The published recipes' shapes are checked against their published sizes (rounded names:
# 3.3B active is not "a3b" within 10%) and at their own GPU counts in test_examples_moe.py.
RECIPES = {"moe_30b_a3b", "moe_671b_a37b"}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c.stem not in RECIPES], ids=lambda p: p.stem
)
def test_config_dry_run_matches_its_name(config, precision, tmp_path, capsys):
    argv = script_argv(SINGLE_NODE, tmp_path, CONFIG=str(config), PRECISION=precision)
    assert ("--fp8-format" in argv) == (precision == "fp8")
    out = run_dry(argv, capsys)
    total, active = (float(x.replace(",", "")) * 1e6 for x in _COUNTS.search(out).groups())
    want_total, want_active = named_sizes(config.stem)
    assert abs(total / want_total - 1) < 0.10, out
    assert abs(active / want_active - 1) < 0.10, out
    assert "(agrees)" in out  # the meta-device build and the closed form count the same
    assert "layout for a world of 8:" in out
    assert "superposition" in out and "recovery" in out  # the phase table


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_follows_the_paper_recipe(config, tmp_path):
    """The recipe the configs share (configs/common/paper_recipe.sh) follows each config's own
    --lr, its WSD decay over the last 10% of TRAIN_ITERS as overridden; CONFIG relative to the
    repository root, as the scripts' headers give it."""
    relative = str(config.relative_to(ROOT))
    argv = script_argv(SINGLE_NODE, tmp_path, CONFIG=relative, TRAIN_ITERS="1230")
    assert argv[argv.index("--train-iters") + 1] == "1230"
    lr = argv.index("--lr")
    assert argv[lr + 2 : lr + 20] == [
        "--min-lr", "0", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
        "--lr-warmup-iters", "2000", "--lr-wsd-decay-iters", "123", "--adam-beta1", "0.9",
        "--adam-beta2", "0.95", "--weight-decay", "0.1", "--clip-grad", "1.0",
    ]  # fmt: skip


def test_slurm_script_lays_out_the_whole_job(tmp_path, capsys):
    moe = EXAMPLES / "configs" / "moe_10b_a1b.sh"
    argv = script_argv(SLURM, tmp_path, CONFIG=str(moe), PRECISION="fp8", NNODES="4")
    assert "--exit-duration-in-mins" not in argv  # the time-limit warning (USR1) saves instead
    out = run_dry(argv, capsys)
    assert "layout for a world of 32: TP=1 PP=1 DP=32 EP=8 ETP=1 expert-DP=4" in out
    assert "FP8 (hybrid" in out


def test_scripts_pass_extra_flags_and_resume(tmp_path):
    config = str(EXAMPLES / "configs" / "dense_270m.sh")
    argv = script_argv(SINGLE_NODE, tmp_path, "--eval-interval", "7", CONFIG=config)
    last = len(argv) - 1 - argv[::-1].index("--eval-interval")
    assert argv[last + 1] == "7"  # the caller's flag comes last
    # --load always: a folder with no checkpoint yet starts afresh, so restarts resume
    assert argv[argv.index("--load") + 1] == str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1000\n")
    argv = script_argv(SLURM, tmp_path, CONFIG=config, DATA_PATH="0.7 a_doc 0.3 b_doc")
    assert argv[argv.index("--load") + 1] == str(tmp_path / "ckpt")
    assert argv[argv.index("--data-path") + 1 :][:4] == ["0.7", "a_doc", "0.3", "b_doc"]


def test_bad_precision_is_refused(tmp_path):
    stub_env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "PRECISION": "fp16"}
    result = subprocess.run(["bash", str(SINGLE_NODE)], env=stub_env, capture_output=True)
    assert result.returncode == 2
    assert b"PRECISION must be bf16 or fp8" in result.stderr


TINY = [
    "--mock-data", "--vocab-size", "500", "--num-layers", "4", "--hidden-size", "64",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "16",
    "--micro-batch-size", "2", "--train-iters", "10", "--tst-bag-size", "4", "--swiglu",
    "--lr", "1e-3", *SMALL_GPT,
]  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tensor-model-parallel-size", "3"], "--num-attention-heads 4 is not divisible by"),
        (
            ["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "99"],
            "--ffn-hidden-size 99 is not divisible by --tensor-model-parallel-size 2",
        ),
        (
            ["--num-experts", "4", "--expert-model-parallel-size", "4",
             "--tensor-model-parallel-size", "2", "--dry-run-world-size", "4"],
            "not divisible by ETP x EP x PP = 8",
        ),
        (["--pipeline-model-parallel-size", "3"], "--num-layers 4 is not divisible by"),
    ],
)  # fmt: skip
def test_invalid_layout_fails_clearly(extra, message):
    import torch.distributed as dist

    import pretrain_tst

    with pytest.raises(ValueError, match=re.escape(message)):
        pretrain_tst.main([*TINY, "--dry-run", *extra])
    assert not dist.is_initialized()


def test_paper_config_with_an_invalid_layout_fails_clearly(tmp_path):
    import pretrain_tst

    config = str(EXAMPLES / "configs" / "dense_270m.sh")
    argv = script_argv(SINGLE_NODE, tmp_path, CONFIG=config, TP="2")  # 9 heads
    with pytest.raises(ValueError, match="--num-attention-heads 9 is not divisible"):
        pretrain_tst.main(argv)


def test_a_model_megatron_core_refuses_fails_clearly(monkeypatch):
    """A rule megatron-core asserts inside the model build and the run plan does not check
    (stood in for by a patched constructor) ends the dry run in one line, the process group
    torn down. The rule this test used to meet (shared experts take no biases) is now checked
    up front, with its fix."""
    import torch.distributed as dist
    from megatron.core.transformer.moe import shared_experts

    import pretrain_tst

    extra = ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "32"]
    with pytest.raises(ValueError, match="shared experts take no biases.*--disable-bias-linear"):
        pretrain_tst.main([*_with_biases(TINY), "--dry-run", *extra])

    def refuse(self, *args, **kwargs):
        raise AssertionError("a rule the run plan does not check")

    monkeypatch.setattr(shared_experts.SharedExpertMLP, "__init__", refuse)
    with pytest.raises(ValueError, match="megatron-core cannot build this model: a rule the run "
                                         "plan does not check"):  # fmt: skip
        pretrain_tst.main([*TINY, "--dry-run", *extra])
    assert not dist.is_initialized()  # torn down after the failed build


def test_dry_run_refuses_to_run_inside_a_process_group():
    import torch.distributed as dist

    import pretrain_tst

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="in a process of its own"):
            pretrain_tst.main([*TINY, "--dry-run"])
    finally:
        dist.destroy_process_group()


BIASES = "<linear biases: Megatron-LM's default>"


def _with_biases(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--disable-bias-linear"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--normalization", "LayerNorm", BIASES, "--position-embedding-type", "learned_absolute"],
        ["--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48",
         "--moe-shared-expert-intermediate-size", "32", "--qk-layernorm",
         "--normalization", "LayerNorm", "--untie-embeddings-and-output-weights"],
        ["--num-experts", "8", "--moe-router-topk", "3", BIASES],
        ["--num-experts", "8", "--moe-router-topk", "2", "--moe-latent-size", "24", BIASES],
    ],
    ids=["layernorm-bias-learned", "moe-shared-qknorm", "moe-bias", "moe-latent-bias"],
)  # fmt: skip
def test_analytic_count_agrees_with_the_built_model(extra, capsys):
    base = _with_biases(TINY) if BIASES in extra else TINY
    out = run_dry([*base, "--dry-run", *[a for a in extra if a != BIASES]], capsys)
    assert "(agrees)" in out, out


# ------------------------------------------------------------- per-rank layout vs a real build

LAYOUTS = {
    "tp2-pp2-untied": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--untie-embeddings-and-output-weights"],
    "pp2-vpp2-tied": ["--pipeline-model-parallel-size", "2",
                     "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "8"],
    "tp2-ep2-moe": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                    "--num-experts", "4", "--moe-ffn-hidden-size", "32",
                    "--untie-embeddings-and-output-weights"],
}  # fmt: skip


def _real_rank_parameters(argv: list[str]) -> tuple[int, int]:
    """On a rank: build this rank's model chunks for ``argv`` and count their parameters."""
    import torch

    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_model_chunks
    from tst.plan import validate
    from tst.platform import initialize

    cfg = parse_args(argv)
    plan = validate(cfg, 4, cfg.data.vocab_size)
    grid = plan.grid
    layout = initialize(tp=grid.tp, pp=grid.pp, vpp=grid.vpp, ep=grid.ep, etp=grid.etp)
    shape = ModelShape.from_config(cfg.model, plan.padded_vocab_size, False)
    config = transformer_config(cfg, plan, layout)
    chunks = build_model_chunks(config, shape, plan.vpp, torch.device("cpu"))
    return layout.pp_rank, sum(q.numel() for c in chunks for q in c.parameters())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_per_rank_counts_match_a_real_build(layout, world4):
    from tst.config import parse_args
    from tst.dry_run import meta_parameters, per_rank_parameters
    from tst.plan import validate

    argv = [*TINY, *LAYOUTS[layout]]
    cfg = parse_args(argv)
    plan = validate(cfg, 4, cfg.data.vocab_size)
    stages = per_rank_parameters(meta_parameters(cfg, plan.padded_vocab_size), cfg, plan.grid)
    for pp_rank, count in world4.run(_real_rank_parameters, argv):
        assert count == stages[pp_rank]["dense"] + stages[pp_rank]["experts"], (pp_rank, stages)


def test_quickstart_crossing_mode_trains_the_trend_studys_bytes_pair(tmp_path):
    """``CROSSING=1``: after the quickstart's own runs (finished here: their ``done`` markers),
    the trend study's byte-level baseline and bag-2 r 0.3 arm at ``CROSSING_STEPS``, one seed,
    two at a time, in the quickstart's folder, reusing its corpus."""
    work = tmp_path / "work"
    for name in ("sotu.jsonl", "tokenizer.model", "sotu_text_document.bin",
                 "sotu_text_document.idx", "baseline/done", "tst/done"):  # fmt: skip
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(name)
    log = tmp_path / "calls"
    stub = tmp_path / "python-stub"  # records each call's arguments, one call a line
    stub.write_text(f'#!/bin/sh\nprintf "%s\\037" "$@" >> {log}\nprintf "\\n" >> {log}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": str(stub),
           "SKIP_INSTALL": "1", "WORK": str(work), "CROSSING": "1", "CROSSING_STEPS": "123"}  # fmt: skip
    result = subprocess.run(["bash", str(EXAMPLES / "quickstart_cpu.sh")], env=env,
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    calls = [line.split("\037")[:-1] for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == [
        "tools/plot_runs.py",
        "tools/compare_runs.py",
        "bench/trend_study.py",
    ]  # nothing retrained, nothing re-made
    data = work / "trend-data"
    assert calls[2][1:] == [
        "--only", "bytes", "--bytes-steps", "123", "--arms", "baseline", "tst_b2_r0.3",
        "--seeds", "1", "--jobs", "2", "--work", f"{work}/crossing", "--data-dir", str(data),
        "--ledger", f"{work}/crossing/ledger.jsonl", "--plots-dir", f"{work}/crossing",
    ]  # fmt: skip
    # The study's own corpus name (bench/trend_study.prepare_data) leads to the quickstart's.
    assert (data / "sotu.jsonl").resolve() == (work / "sotu.jsonl").resolve()
    # The study itself accepts these flags and plans exactly the pair, one seed.
    sys.path.insert(0, str(ROOT / "bench"))
    import trend_study

    study = trend_study.get_args(calls[2][1:])
    runs = trend_study.plan_runs(study, trend_study.MODELS, {})
    assert [(r.model, r.steps, r.arm.name, r.seed) for r in runs] == [
        ("bytes1.9m", 123, "baseline", 1),
        ("bytes1.9m", 123, "tst_b2_r0.3", 1),
    ]
    assert trend_study.MODELS["bytes1.9m"].data == "bytes"
    assert "CROSSING=1 bash examples/quickstart_cpu.sh" in result.stdout
    assert "negative gap" in result.stdout


@pytest.mark.parametrize("script", [SINGLE_NODE], ids=lambda p: p.name)
def test_scripts_leave_cuda_connections_alone_for_fsdp2(script, tmp_path):
    """The launch scripts set CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron-core's TP overlap) but
    not for --use-torch-fsdp2, which Megatron-LM's rule refuses with it."""
    stub = tmp_path / "python-stub"  # the launcher's python: records its environment
    stub.write_text(
        '#!/bin/sh\necho "connections=${CUDA_DEVICE_MAX_CONNECTIONS-unset}" '
        '>> "$STUB_LOG"\necho 0\n'
    )  # fmt: skip (0: the exit status it is asked)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "stub.log"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": str(stub),
           "STUB_LOG": str(log), "SAVE_DIR": str(tmp_path / "ckpt"),
           "TOKENIZER_MODEL": str(tmp_path / "no-tokenizer.json")}  # fmt: skip
    seen = []
    for extra in ([], ["--use-torch-fsdp2"]):
        log.write_text("")
        result = subprocess.run(["bash", str(script), *extra], env=env, capture_output=True,
                                cwd=tmp_path, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
        seen.append(sorted(set(log.read_text().split())))
    assert seen == [["connections=1"], ["connections=unset"]]
