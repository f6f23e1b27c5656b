"""Convert a tst checkpoint (any TP / PP / EP layout) to a Hugging Face transformers checkpoint.

    python tools/convert_to_hf.py --load ckpt --output hf_model \\
        [--iteration 2000] [--tokenizer-model data/tok.model]

Runs as one process (no torchrun): the checkpoint is loaded into a TP=1 / PP=1 model and
written as safetensors + config.json + the tokenizer files, as LlamaForCausalLM (dense),
Qwen3ForCausalLM (dense, --qk-layernorm), Qwen3MoeForCausalLM (MoE, --qk-layernorm) or
MixtralForCausalLM (MoE). The padded vocabulary rows are dropped (--keep-padded-vocab keeps
them). The tokenizer is the run's own; give its files here when they have moved since
training. See tst/export/ for the mapping and what is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module="megatron")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="convert_to_hf.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--load", required=True, help="the run's --save directory (or one iter_*)")
    p.add_argument("--iteration", type=int, help="checkpoint to convert (default: the latest)")
    p.add_argument("--output", required=True, help="folder for the transformers checkpoint")
    p.add_argument("--tokenizer-model", help="the run's tokenizer file, if moved since training")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer vocab.json, if moved")
    p.add_argument("--merge-file", help="GPT2BPETokenizer merges.txt, if moved")
    p.add_argument(
        "--keep-padded-vocab",
        action="store_true",
        help="keep the checkpoint's padded vocabulary rows (default: trim to the tokenizer's)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weights dtype (default: the checkpoint's)",
    )
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None):
    """Convert; returns the :class:`tst.export.ExportResult`."""
    args = get_args(argv)
    from tst.export import convert

    result = convert(
        args.load,
        args.output,
        iteration=args.iteration,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        keep_padded_vocab=args.keep_padded_vocab,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_size_gb * 2**30),
    )
    print(
        f"wrote {result.architecture} to {result.output}: vocabulary {result.vocab_size} rows "
        f"(checkpoint {result.padded_vocab_size}); files: {', '.join(result.files)}"
    )
    for what in result.left_out:
        print(f"not exported: {what}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
