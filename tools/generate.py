"""Sample text from a trained model: a tst checkpoint, or a folder from convert_to_hf.py.

    python tools/generate.py --load ckpt --prompt "The Congress shall" \\
        --max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 1
    python tools/generate.py --load hf_model --prompt "The Congress shall"

A tst checkpoint (any layout) is loaded into one process at TP=1 / PP=1 and run with
megatron-core; a folder holding config.json is loaded with transformers. The tokenizer is
the run's (from the checkpoint's config, or the folder's tst_export.json) built with
tst.data.tokenizers.build_tokenizer; the flags below replace its type or files. The
prompt follows an end-of-document token, as a document does in the training data, and
sampling stops at the next one. Each step reruns the whole window (the last
max-position-embeddings tokens; no KV cache): a tool to see what a model learned, not a
server. --temperature 0 is greedy; the same --seed gives the same text.
With ByteTokenizer / NullTokenizer (ids are UTF-8 bytes; tst_export.json names the type, no
tokenizer file is needed) a continuation that ends inside a character, or any byte sequence
that is not UTF-8, is printed with U+FFFD in its place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", module="megatron")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

import torch  # noqa: E402

from tst.data.tokenizers import TIKTOKEN_NUM_SPECIAL, TOKENIZER_TYPES  # noqa: E402

NextLogits = Callable[[list[int]], torch.Tensor]  # token ids so far -> next-token logits [V]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        prog="generate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--load", required=True, help="a --save directory, an iter_* one, or HF folder")
    p.add_argument("--iteration", type=int, help="tst checkpoint to load (default: the latest)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="replace the run's")
    p.add_argument("--tokenizer-model", help="replace the run's tokenizer file")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    args = p.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        p.error("--max-new-tokens, --temperature and --top-k must be >= 0")
    return args


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator) -> int:
    """One token id from next-token ``logits [V]`` (fp32): greedy at temperature 0."""
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    next_logits: NextLogits,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    eod: int,
) -> list[int]:
    """Extend ``ids`` by up to ``max_new_tokens`` sampled ids, stopping after ``eod``."""
    generator = torch.Generator().manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = sample(next_logits(ids + new), temperature, top_k, generator)
        new.append(token)
        if token == eod:
            break
    return new


def megatron_next_logits(model, vocab_size: int, window: int) -> NextLogits:
    """Next-token logits from a TP=1 megatron-core GPT (real vocabulary rows only)."""
    device = next(model.parameters()).device

    def next_logits(ids: list[int]) -> torch.Tensor:
        ids_BL = torch.tensor([ids[-window:]], device=device)
        positions_BL = torch.arange(ids_BL.shape[1], device=device)[None]
        with torch.no_grad():
            logits_BLV = model(ids_BL, positions_BL, attention_mask=None)
        return logits_BLV[0, -1, :vocab_size].cpu()

    return next_logits


def hf_next_logits(model, vocab_size: int, window: int) -> NextLogits:
    """Next-token logits from a transformers causal LM."""

    def next_logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits_BLV = model(torch.tensor([ids[-window:]], device=model.device)).logits
        return logits_BLV[0, -1, :vocab_size].cpu()

    return next_logits


def _tokenizer(spec, args):
    """The run's tokenizer spec with the command line's replacements, built."""
    import dataclasses

    changes = {
        k: getattr(args, k)
        for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
        if getattr(args, k)
    }
    return dataclasses.replace(spec, **changes).build()


def _hf_model(args, stack: contextlib.ExitStack):
    from transformers import AutoModelForCausalLM

    from tst.export import EXPORT_INFO, TokenizerSpec

    info_path = os.path.join(args.load, EXPORT_INFO)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        files = {k: os.path.join(args.load, v) for k, v in info["tokenizer_files"].items()}
        data = info["config"]["data"]
        vocab_floor = data["vocab_size"]  # NullTokenizer's --vocab-size (TikTokenizer's too)
        spec = TokenizerSpec(info["tokenizer_type"], vocab_size=vocab_floor, **files,
                             tiktoken_pattern=data.get("tiktoken_pattern"),
                             tiktoken_num_special_tokens=data.get("tiktoken_num_special_tokens",
                                                                  TIKTOKEN_NUM_SPECIAL),
                             special_tokens=data.get("tokenizer_special_tokens"))  # fmt: skip
        vocab, window = info["vocab_size"], info["config"]["model"]["max_position_embeddings"]
    elif args.tokenizer_type:  # a folder from elsewhere: the flags name its tokenizer
        spec, vocab, window = TokenizerSpec(args.tokenizer_type), None, None
    else:
        raise SystemExit(f"generate.py: error: {info_path} is missing: give --tokenizer-type ...")
    model = AutoModelForCausalLM.from_pretrained(args.load, dtype="auto").eval()
    if model.device.type == "cpu":
        model = model.float()  # CPU bf16 matmuls are slow and coarse
    config = model.config
    vocab = vocab or config.vocab_size
    window = window or config.max_position_embeddings
    return _tokenizer(spec, args), hf_next_logits(model, vocab, window)


def _tst_model(args, stack: contextlib.ExitStack):
    from tst.export import load_checkpoint, single_process_world, tokenizer_spec

    layout = stack.enter_context(single_process_world(seed=args.seed))
    ckpt = load_checkpoint(args.load, layout, args.iteration)
    tokenizer = _tokenizer(tokenizer_spec(ckpt.cfg), args)
    vocab = ckpt.cfg.data.vocab_size or tokenizer.vocab_size
    window = ckpt.cfg.model.max_position_embeddings
    return tokenizer, megatron_next_logits(ckpt.model, vocab, window)


def main(argv: list[str] | None = None) -> dict:
    """Print the prompt and its continuation; returns both, and the new ids."""
    args = get_args(argv)
    hf = os.path.isfile(os.path.join(args.load, "config.json"))
    with contextlib.ExitStack() as stack:
        tokenizer, next_logits = (_hf_model if hf else _tst_model)(args, stack)
        ids = [tokenizer.eod, *tokenizer.tokenize(args.prompt)]
        new = generate(
            next_logits,
            ids,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.seed,
            tokenizer.eod,
        )
    text = tokenizer.detokenize([t for t in new if t != tokenizer.eod])
    print(args.prompt + text)
    return {"prompt": args.prompt, "completion": text, "ids": new}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run through runpy too
    from _cli import run_main

    run_main(main)
