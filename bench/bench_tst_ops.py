"""Forward+backward time and peak extra memory of the TST ops, side by side in one run.

Multi-hot CE against (a) single-target CE on the same logits (megatron-core's
``vocab_parallel_cross_entropy``, TP=1) and (b) the paper's loop of ``bag_size`` separate
cross-entropy calls; the bag embedding against a plain embedding lookup of the same raw
tokens. Prints ratios; nothing here is a test.

    python bench/bench_tst_ops.py [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tst.losses import vocab_parallel_multi_hot_cross_entropy  # noqa: E402


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensors created inside the block (CPU has no allocator stats)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in _seen:
                # Count each new storage once; free it when the tensor that brought it dies
                # (an approximation: a view may outlive its base).
                ptr = t.untyped_storage().data_ptr()
                size = t.untyped_storage().nbytes()
                _seen.add(ptr)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr, size)
        return out

    def _free(self, ptr, size):
        _seen.discard(ptr)
        self.live -= size


_seen: set[int] = set()


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn):
    _seen.clear()
    gc.collect()
    with PeakMemory() as mode:
        fn()
    return mode.peak


def single_target_ce(logits, targets):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def run():
        x = logits.detach().requires_grad_()
        vocab_parallel_cross_entropy(x, targets[..., 0]).sum().backward()

    return run


def multi_hot(logits, targets):
    def run():
        x = logits.detach().requires_grad_()
        vocab_parallel_multi_hot_cross_entropy(x, targets).sum().backward()

    return run


def paper_loop(logits, targets):
    def run():
        x = logits.detach().requires_grad_()
        flat = x.view(-1, x.shape[-1])
        total = 0
        for j in range(targets.shape[-1]):
            total = total + F.cross_entropy(flat, targets[..., j].reshape(-1), reduction="sum")
        (total / targets.shape[-1]).backward()

    return run


def bench_losses(tokens, repeats):
    print(f"\n## Loss forward+backward, {tokens} positions, fp32 logits, 2 threads")
    print(
        f"{'vocab':>7} {'bag':>4} {'CE ms':>8} {'MCE ms':>8} {'loop ms':>8} "
        f"{'MCE/CE':>7} {'loop/MCE':>8} {'CE MB':>7} {'MCE MB':>7} {'loop MB':>8}"
    )
    for vocab in (32_000, 128_000):
        for bag_size in (4, 8, 16):
            gen = torch.Generator().manual_seed(0)
            logits = torch.randn(tokens, vocab, generator=gen)
            targets = torch.randint(0, vocab, (tokens, bag_size), generator=gen)
            runs = {
                "ce": single_target_ce(logits, targets),
                "mce": multi_hot(logits, targets),
                "loop": paper_loop(logits, targets),
            }
            t = {k: timed(v, repeats) for k, v in runs.items()}
            m = {k: peak_bytes(v) / 2**20 for k, v in runs.items()}
            print(
                f"{vocab:>7} {bag_size:>4} {t['ce'] * 1e3:8.1f} {t['mce'] * 1e3:8.1f} "
                f"{t['loop'] * 1e3:8.1f} {t['mce'] / t['ce']:7.3f} {t['loop'] / t['mce']:8.2f} "
                f"{m['ce']:7.0f} {m['mce']:7.0f} {m['loop']:8.0f}"
            )
            del logits


def bench_embedding(tokens, repeats):
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from tst.embedding import BagEmbedding

    print(f"\n## Embedding forward+backward, {tokens} raw tokens, hidden 1024, vocab 32000")
    print(f"{'bag':>4} {'plain ms':>9} {'bag ms':>8} {'bag/plain':>9}")
    config = TransformerConfig(
        num_layers=1,
        hidden_size=1024,
        num_attention_heads=8,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
    )
    for bag_size in (4, 8, 16):
        plain = LanguageModelEmbedding(config, 32_000, tokens, position_embedding_type="rope")
        bag = LanguageModelEmbedding(config, 32_000, tokens, position_embedding_type="rope")
        BagEmbedding.upgrade(bag).bag_size = bag_size
        ids = torch.randint(0, 32_000, (1, tokens))

        def run_plain(plain=plain, ids=ids):
            plain.zero_grad(set_to_none=True)
            plain(ids, None).sum().backward()

        def run_bag(bag=bag, ids=ids):
            bag.zero_grad(set_to_none=True)
            bag(ids, None).sum().backward()

        tp, tb = timed(run_plain, repeats), timed(run_bag, repeats)
        print(f"{bag_size:>4} {tp * 1e3:9.1f} {tb * 1e3:8.1f} {tb / tp:9.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="positions per batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from tst.platform import initialize

    initialize(tp=1)
    bench_losses(args.tokens, args.repeats)
    bench_embedding(args.tokens * 4, args.repeats)


if __name__ == "__main__":
    main()
