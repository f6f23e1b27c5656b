"""PyTorch FSDP2 (``--use-torch-fsdp2``) through pretrain_tst.main: the same training as
megatron-core's DDP, sharded.

FSDP2 reduce-scatters each layer's summed gradients where DDP all-reduces its buffers; with
the trainer's global token normalisation the two are the same arithmetic in fp32, so across
the superposition -> recovery switch the losses, gradient norms, parameter norms and zero
counts must match DDP's (rel 1e-6), and the dumped weight gradients too (to 1e-6 of each
tensor's largest entry: summed in another order): at DP 4, and at TP 2 x DP 2 with sequence
parallelism, MoE layers (EP 1), an MTP depth and gradient accumulation. A checkpoint saved
under FSDP2 resumes exactly under FSDP2 and under DDP, and a DDP checkpoint under FSDP2 (the
sharded tensors are the same global tensors), at the layout it was saved at and at another
(TP 2 x DP 2 from DP 4: the SwiGLU weight's shards each another row range); Megatron-LM's
legacy files (its converter's) fine-tune an FSDP2 run as they fine-tune a DDP one. In bf16 FSDP2
reduces in bf16, so there the losses must only stay close to DDP's (rel 1e-2); a bf16 FSDP2
run resumes exactly.
"""

from __future__ import annotations

import os

import torch
from flags import SMALL_GPT

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "1",
    "--global-batch-size", "8", "--train-iters", "4", "--tst-bag-size", "3", "--tst-iters", "2",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
    "--eval-interval", "2", "--untie-embeddings-and-output-weights",
    "--no-gradient-accumulation-fusion", "--log-params-norm", "--log-num-zeros-in-grad",
    *SMALL_GPT,
]  # fmt: skip
FSDP2 = ["--use-torch-fsdp2"]
KEYS = ("loss", "grad_norm", "params_norm", "num_zeros_in_grad")


def _run(argv: list[str], metrics: str) -> dict:
    """The run's training records (KEYS per step) and validation losses."""
    from trainer_runs import main_records

    records = main_records(argv, metrics)
    train = [{k: r.get(k) for k in KEYS} for r in records if r.get("loss") is not None
             and "grad_norm" in r]  # fmt: skip
    valid = [r["val_loss"] for r in records if "val_loss" in r]
    return {"train": train, "valid": valid}


def _same(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert len(got["train"]) == len(want["train"]) > 0
    for step, (g, w) in enumerate(zip(got["train"], want["train"], strict=True), 1):
        for key in KEYS:
            assert (g[key] is None) == (w[key] is None), (step, key, g, w)
            if w[key] is not None:
                assert abs(g[key] - w[key]) <= rel * abs(w[key]) + 1e-12, (step, key, g, w)
    assert len(got["valid"]) == len(want["valid"]) > 0
    for g, w in zip(got["valid"], want["valid"], strict=True):
        assert abs(g - w) <= rel * abs(w), (got["valid"], want["valid"])


def _wgrads(folder: str) -> dict:
    """The dumped weight gradients of step 2 (Megatron-LM's layout), by file and name."""
    root = os.path.join(folder, "wgrads", "iter_0000002")
    return {f: torch.load(os.path.join(root, f)) for f in sorted(os.listdir(root))}


def test_fsdp2_trains_as_ddp_at_dp4_and_resumes_across_wrappers(world4, tmp_path):
    ddp = world4.run(_run, BASE + ["--save", str(tmp_path / "w-ddp"), "--save-wgrads-interval",
                                   "2"], str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    fsdp = world4.run(_run, BASE + FSDP2 + ["--save", str(tmp_path / "w-fsdp"),
                                            "--save-wgrads-interval", "2"],
                      str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    _same(fsdp, ddp)
    dumped, reference = _wgrads(str(tmp_path / "w-fsdp")), _wgrads(str(tmp_path / "w-ddp"))
    assert dumped.keys() == reference.keys()
    for name, chunks in reference.items():
        for chunk, grads in chunks.items():
            assert dumped[name][chunk].keys() == grads.keys() and grads
            for key, grad in grads.items():
                # Summed in another order (reduce-scatter vs all-reduce): equal to rounding.
                scale = float(grad.abs().max())
                torch.testing.assert_close(dumped[name][chunk][key], grad, rtol=1e-5,
                                           atol=1e-6 * scale)  # fmt: skip

    # Saved at the switch under DDP and under FSDP2; resumed under the other and the same.
    save = ["--save-interval", "2", "--exit-interval", "2"]
    folders = {}
    for name, saver in (("ddp", []), ("fsdp", FSDP2)):
        folders[name] = str(tmp_path / f"ckpt-{name}")
        world4.run(_run, BASE + saver + save + ["--save", folders[name]], str(tmp_path / "c.jsonl"))
    want = {"train": ddp["train"][2:], "valid": ddp["valid"][1:]}
    for name, loader in (("ddp", FSDP2), ("fsdp", FSDP2), ("fsdp", [])):
        got = world4.run(_run, BASE + loader + ["--load", folders[name]],
                         str(tmp_path / f"r-{name}-{len(loader)}.jsonl"))[0]  # fmt: skip
        _same(got, want)
    # Megatron-LM's legacy files (what its converter writes) start an FSDP2 run as a DDP one.
    from test_legacy_checkpoint import _write_megatron

    legacy = str(tmp_path / "legacy")
    world4.run(_write_megatron, BASE + ["--load", folders["ddp"]], legacy, "legacy")
    tune = ["--load", legacy, "--finetune"]  # the format is detected (FSDP2 saves torch_dist)
    want = world4.run(_run, BASE + tune, str(tmp_path / "l0.jsonl"))[0]
    got = world4.run(_run, BASE + FSDP2 + tune, str(tmp_path / "l1.jsonl"))[0]
    _same(got, want)
    # At another layout (TP 2 x DP 2: each FSDP2 shard another row range of the weights),
    # the FSDP2 checkpoint resumes as the DDP one does.
    tp = ["--tensor-model-parallel-size", "2"]
    want = world4.run(_run, BASE + tp + ["--load", folders["ddp"]], str(tmp_path / "t0.jsonl"))[0]
    got = world4.run(_run, BASE + tp + FSDP2 + ["--load", folders["fsdp"]],
                     str(tmp_path / "t1.jsonl"))[0]  # fmt: skip
    _same(got, want)


def test_fsdp2_with_tensor_parallelism_and_experts(world4, tmp_path):
    tp = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2"]
    # With an MTP depth and gradient accumulation (FSDP2 reduce-scatters every micro-batch).
    extra = tp + moe + ["--mtp-num-layers", "1", "--global-batch-size", "16"]
    want = world4.run(_run, BASE + extra, str(tmp_path / "a.jsonl"))[0]
    got = world4.run(_run, BASE + extra + FSDP2, str(tmp_path / "b.jsonl"))[0]
    _same(got, want)
    # bf16: FSDP2 reduces in bf16 where DDP accumulates in fp32: close, not equal.
    want = world4.run(_run, BASE + tp + ["--bf16"], str(tmp_path / "c.jsonl"))[0]
    got = world4.run(_run, BASE + tp + ["--bf16"] + FSDP2 +
                     ["--torch-fsdp2-no-reshard-after-forward"], str(tmp_path / "d.jsonl"))[0]  # fmt: skip
    for g, w in zip(got["train"], want["train"], strict=True):
        assert abs(g["loss"] - w["loss"]) <= 1e-2 * w["loss"], (got, want)
    # bf16 resumes exactly (its fp32 main weights are FSDP2 shards too).
    bf16 = BASE + tp + ["--bf16"] + FSDP2 + ["--torch-fsdp2-no-reshard-after-forward"]
    folder = ["--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    world4.run(_run, bf16 + folder + ["--exit-interval", "2"], str(tmp_path / "e.jsonl"))
    resumed = world4.run(_run, bf16 + ["--load", str(tmp_path / "ckpt")],
                         str(tmp_path / "f.jsonl"))[0]  # fmt: skip
    _same(resumed, {"train": got["train"][2:], "valid": got["valid"][1:]})


def test_fsdp2_refuses_shards_a_checkpoint_cannot_hold(world4, tmp_path):
    """A weight whose rows do not split into DP equal shards (a 510-entry vocabulary at DP 4)
    trains, but megatron-core's sharded tensors cannot save it: refused at start when the
    run saves or loads, naming the weight."""
    odd = [*BASE, *FSDP2, "--vocab-size", "510", "--make-vocab-size-divisible-by", "1"]
    from trainer_runs import main_error

    messages = world4.run(main_error, odd + ["--save", str(tmp_path / "c")],
                          str(tmp_path / "a.jsonl"))  # fmt: skip
    assert all("embedding.word_embeddings.weight has 510 rows" in m for m in messages), messages
    assert "cannot split into 4 equal shards" in messages[0]
