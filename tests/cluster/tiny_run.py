"""The run every cluster test launches: a tiny TP 2 x DP 2 TST model on real text, through
the launch scripts' environment (CONFIG, data, SAVE_DIR, PYTHON) and extra flags."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests" / "helpers") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))

from data_support import load_tool  # noqa: E402

# 4 processes; 32 positions, bag 4 for the first SWITCH steps, then next-token training.
TINY_CONFIG = """\
# A tiny model for the cluster tests: TP 2 x DP 2 on 4 CPU processes.
MODEL_ARGS=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --swiglu)
TST_ARGS=(--tst-bag-size 4 --tst-iters {switch})
TRAIN_ARGS=(--micro-batch-size 2 --global-batch-size 4 --train-iters {iters} --lr 1e-3)
PARALLEL_ARGS=(--tensor-model-parallel-size 2)
"""
SWITCH = 3  # the first recovery step is iteration 4
ENDLESS = 5_000  # --train-iters of a run the test itself stops (long before its end)

# Flags after the script name: the tiny corpus's split, every step logged, no evaluation, and
# a one-minute limit on any collective (the default would let a hung node stall 10 minutes).
RUN_FLAGS = [
    "--split", "90,10,0", "--log-interval", "1", "--eval-interval", str(ENDLESS),
    "--eval-iters", "1", "--distributed-timeout-minutes", "1", "--peak-tflops", "1",
]  # fmt: skip

# PATH without this interpreter's folder (where `torchrun` lives): PYTHON alone must pick it.
BARE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Torchruns that do not serve the rendezvous store leave their exit barrier last and 2 s
# slow (slow_leavers/sitecustomize.py).
SLOW_LEAVERS = {
    "PYTHONPATH": str(Path(__file__).resolve().parent / "slow_leavers"),
    "TST_SLOW_LEAVERS": "2",
}


def build_corpus(work: Path) -> dict[str, str]:
    """20 State of the Union addresses, a 512-entry SentencePiece model and the .bin/.idx
    pair; returns the launch scripts' DATA_PATH / TOKENIZER_TYPE / TOKENIZER_MODEL."""
    jsonl = str(work / "sotu.jsonl")
    load_tool("get_corpus").main(["--output", jsonl, "--limit", "20"])
    load_tool("train_tokenizer").main(
        ["--input", jsonl, "--model-prefix", str(work / "tok"), "--vocab-size", "512",
         "--num-threads", "1"]
    )  # fmt: skip
    load_tool("preprocess_data").main(
        ["--input", jsonl, "--output-prefix", str(work / "sotu"),
         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(work / "tok.model"),
         "--append-eod", "--workers", "1", "--log-interval", "1000"]
    )  # fmt: skip
    return {
        "DATA_PATH": str(work / "sotu_text_document"),
        "TOKENIZER_TYPE": "SentencePieceTokenizer",
        "TOKENIZER_MODEL": str(work / "tok.model"),
    }


def launch_env(corpus: dict[str, str], run_dir: Path, iters: int, **extra: str) -> dict[str, str]:
    """The environment of a launch script for a tiny run of ``iters`` steps in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "tiny.sh"
    config.write_text(TINY_CONFIG.format(switch=SWITCH, iters=iters))
    return {
        **corpus,
        "CONFIG": str(config),
        "SAVE_DIR": str(run_dir / "ckpt"),
        "PRECISION": "fp32",
        "GPUS_PER_NODE": "2",
        "PYTHON": sys.executable,
        "PATH": BARE_PATH,
        **extra,
    }
