#!/usr/bin/env python
"""muP's coordinate check through pretrain_tst.py: activation sizes across widths, with and
without --use-mup, read from the run's own --save-activations-interval dump.

The defining property of muP (Yang et al., "Tensor Programs V", the coordinate check of the
``mup`` package): after a few steps of training at one learning rate, the typical size of a
coordinate of each layer's output (mean |x|) stays the same as the model widens, while under
the standard parametrisation the logits (and, with Adam, the hidden layers' updates) grow
with width. Each width here is trained for a few TST steps (the superposition phase: bags of
2) on mock data at one --lr, once as Megatron-LM's default parametrisation and once with
--use-mup --mup-base-hidden-size BASE; the last step's activations are dumped and their
mean |x| compared. The logits are the model's (the dump holds the output layer's own
product; muP's 1 / m multiplier is applied here as the model applies it).

Prints, per quantity, its size at each width and the ratio widest / narrowest for both
parametrisations (one run, one process: no timings). Not a test.

    python bench/mup_coord_check.py [--widths 32 64 128 256] [--steps 6] [--lr 1e-2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrain_tst  # noqa: E402

QUANTITIES = {
    "attention out (layer 1)": "decoder.layers.1.self_attention.linear_proj/output0",
    "MLP out (layer 1)": "decoder.layers.1.mlp.linear_fc2/output0",
    "logits": "output_layer/output0",
}


def _run(width: int, base: int, mup: bool, args, folder: str) -> dict[str, float]:
    heads = max(1, width // 16)
    argv = [
        "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", str(width),
        "--num-attention-heads", str(heads), "--seq-length", "32", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--train-iters", str(args.steps), "--tst-bag-size", "2",
        "--tst-iters", str(args.steps), "--lr", str(args.lr), "--lr-decay-style", "constant",
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--untie-embeddings-and-output-weights", "--seed", str(args.seed),
        "--log-interval", str(args.steps), "--eval-iters", "0", "--save", folder,
        "--save-interval", "100000", "--save-activations-interval", str(args.steps),
        "--exit-interval", str(args.steps), "--no-save-optim", "--no-save-rng",
    ]  # fmt: skip
    if mup:
        argv += ["--use-mup", "--mup-base-hidden-size", str(base)]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pretrain_tst.main(argv) == 0
    dump = os.path.join(folder, "activations", f"iter_{args.steps:07d}", "mp_rank_00.pth")
    acts = torch.load(dump, weights_only=True)["model_chunk0"]
    sizes = {}
    for name, key in QUANTITIES.items():
        value = acts[key].float()
        if name == "logits" and mup:
            value = value * (base / width)  # muP's logit multiplier (1 / m)
        sizes[name] = value.abs().mean().item()
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    base = args.widths[0]
    table: dict[bool, dict[int, dict[str, float]]] = {False: {}, True: {}}
    work = tempfile.mkdtemp(prefix="mup_coord_")
    try:
        for mup in (False, True):
            for width in args.widths:
                folder = os.path.join(work, f"{'mup' if mup else 'sp'}{width}")
                table[mup][width] = _run(width, base, mup, args, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    names = list(table[False][base])
    print(f"mean |x| of a coordinate after {args.steps} steps at --lr {args.lr} (Adam), base "
          f"width {base}; SP = Megatron-LM's default parametrisation, muP = --use-mup")  # fmt: skip
    header = "| quantity | param | " + " | ".join(f"w {w}" for w in args.widths)
    print(header + f" | w {args.widths[-1]} / w {base} |")
    print("|---" * (len(args.widths) + 3) + "|")
    for name in names:
        for mup in (False, True):
            row = [table[mup][w][name] for w in args.widths]
            print(f"| {name} | {'muP' if mup else 'SP'} | "
                  + " | ".join(f"{v:.4g}" for v in row) + f" | {row[-1] / row[0]:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
