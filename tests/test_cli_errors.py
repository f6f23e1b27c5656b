"""Every flag combination pretrain_tst.py refuses, with the message a user sees.

The README's troubleshooting table lists these same messages; each row here checks one.
``world`` is the world size the layout is validated against (no processes are started).
"""

from __future__ import annotations

import pytest

import pretrain_tst
from tst.config import parse_args, validate

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--train-iters", "10",
]  # fmt: skip

# (extra flags, world size, message regex): parse-time field checks and layout checks.
REFUSED = [
    (["--num-layers", "0"], 1, r"--num-layers must be >= 1"),
    (["--hidden-size", "30"], 1, r"--hidden-size 30 must be divisible by --num-attention-heads 4"),
    (["--num-query-groups", "3"], 1, r"--num-attention-heads must be divisible by --num-query-groups"),  # noqa: E501
    (["--max-position-embeddings", "4"], 1, r"--max-position-embeddings must be >= --seq-length"),
    (["--num-experts", "0"], 1, r"--num-experts must be >= 1"),
    (["--num-experts", "2", "--moe-router-topk", "3"], 1, r"--moe-router-topk must be between 1 and --num-experts"),  # noqa: E501
    (["--tensor-model-parallel-size", "0"], 1, r"--tensor-model-parallel-size must be >= 1"),
    (["--micro-batch-size", "0"], 1, r"--micro-batch-size must be >= 1"),
    (["--train-iters", "0"], 1, r"--train-iters must be >= 1"),
    (["--lr", "0"], 1, r"need --lr > 0 and 0 <= --min-lr <= --lr"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], 1, r"need --lr > 0 and 0 <= --min-lr <= --lr"),
    (["--lr-warmup-iters", "11"], 1, r"--lr-warmup-iters must be between 0 and --train-iters"),
    (["--tst-bag-size", "0"], 1, r"--tst-bag-size must be between 1 and 64"),
    (["--tst-bag-size", "65"], 1, r"--tst-bag-size must be between 1 and 64"),
    (["--tst-fraction", "0.3", "--tst-iters", "3"], 1, r"give --tst-fraction or --tst-iters, not both"),  # noqa: E501
    (["--tst-fraction", "1.0"], 1, r"--tst-fraction must be in \[0, 1\).*no recovery phase"),
    (["--tst-iters", "-1"], 1, r"--tst-iters must be >= 0"),
    (["--tst-iters", "11"], 1, r"--tst-iters must be <= --train-iters"),
    (["--eval-iters", "0"], 1, r"--eval-iters must be >= 1"),
    (["--log-interval", "0"], 1, r"--log-interval must be >= 1"),
    (["--tensor-model-parallel-size", "3"], 4, r"world size 4 is not divisible by TP x PP = 3"),
    (["--num-attention-heads", "2", "--tensor-model-parallel-size", "4"], 4,
     r"--num-attention-heads 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2,
     r"--num-query-groups 1 is not divisible by TP=2"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2,
     r"--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1,
     r"virtual pipeline stages need --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     r"--num-layers / PP must be divisible by --num-layers-per-virtual-pipeline-stage"),
    (["--sequence-parallel"], 1, r"--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "9",
      "--max-position-embeddings", "9"], 2, r"--seq-length must be divisible by TP"),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2,
     r"--num-experts must be divisible by --expert-model-parallel-size"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4"], 2,
     r"--expert-model-parallel-size must divide DP x TP"),
    (["--expert-model-parallel-size", "2"], 2, r"--expert-model-parallel-size > 1 needs --num-experts"),  # noqa: E501
    (["--global-batch-size", "6"], 2, r"--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),  # noqa: E501
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "6"], 2, r"interleaved pipelining needs the number of micro-batches \(3\) to be a multiple of PP=2"),  # noqa: E501
    (["--fp8-format", "hybrid", "--transformer-impl", "local"], 1, r"FP8 needs Transformer Engine"),
    (["--make-vocab-size-divisible-by", "0"], 1, r"--make-vocab-size-divisible-by must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize("extra,world,message", REFUSED, ids=[m for _, _, m in REFUSED])
def test_refused_with_a_message_naming_the_flag(extra, world, message):
    with pytest.raises(ValueError, match=message):
        validate(parse_args(BASE + extra), world, 512)


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, padded",
    [(512, 128, 1, 512), (300, 128, 1, 384), (300, 128, 2, 512), (300, 192, 2, 384),
     (300, 1, 1, 300), (301, 1, 2, 302)],
)  # fmt: skip
def test_vocabulary_padding(vocab, divisible_by, tp, padded):
    """Megatron's rule: the next multiple of --make-vocab-size-divisible-by x TP."""
    argv = BASE + ["--make-vocab-size-divisible-by", str(divisible_by),
                   "--tensor-model-parallel-size", str(tp)]  # fmt: skip
    assert validate(parse_args(argv), tp, vocab)["padded_vocab_size"] == padded


def test_missing_data_is_refused():
    argv = [a for a in BASE if a != "--mock-data"]
    with pytest.raises(ValueError, match=r"give --data-path PREFIX"):
        parse_args(argv)


def test_unknown_choice_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + ["--tst-mode", "sideways"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_fp8_on_cpu_is_refused_at_start():
    with pytest.raises(ValueError, match=r"--fp8-format needs a CUDA GPU"):
        pretrain_tst.main(BASE + ["--fp8-format", "hybrid"])


def test_tokenizer_and_vocabulary_mismatch_is_refused():
    argv = [a for a in BASE]
    argv[argv.index("--vocab-size") + 1] = "100"
    with pytest.raises(ValueError, match=r"NullTokenizer needs --vocab-size >= 257"):
        pretrain_tst.main(argv)
