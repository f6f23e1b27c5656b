"""The architecture and optimizer settings the tests' small models state explicitly.

The project's flag defaults are Megatron-LM's (learned absolute positions, LayerNorm, biases,
dropout 0.1, Adam beta2 0.999, weight decay 0.01, linear decay, ...). The tests train the
models the project's examples train (RoPE, RMSNorm, no biases, no dropout, AdamW 0.9 / 0.95,
weight decay 0.1, cosine decay) and pass those flags, so a test never depends on a default
by accident; tests of the defaults themselves leave them out.
"""

SMALL_GPT = [
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--disable-bias-linear",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--adam-beta2", "0.95",
    "--weight-decay", "0.1", "--lr-decay-style", "cosine",
    "--moe-token-dispatcher-type", "alltoall",
]  # fmt: skip


def one_rank_gpt(vocab: int, seq: int, batch: int, layers: int) -> list[str]:
    """A tiny RoPE GPT without dropout for single-rank module tests (mock data, no padding of
    the vocabulary); the flags each test is about come after."""
    return [
        "--mock-data", "--vocab-size", str(vocab), "--num-layers", str(layers),
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(seq),
        "--micro-batch-size", str(batch), "--train-iters", "4", "--lr", "1e-3",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--make-vocab-size-divisible-by",
        "1", "--position-embedding-type", "rope",
    ]  # fmt: skip


# A 4-layer GPT through both phases on mock data (6 steps, the switch after 3, an evaluation at
# 3 and 6), global batch 8: the two-rank runs of the Megatron-feature tests.
SWITCH_RUN = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "6", "--tst-bag-size", "3", "--tst-iters", "3",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "3",
    "--eval-iters", "1", "--untie-embeddings-and-output-weights", *SMALL_GPT,
]  # fmt: skip
