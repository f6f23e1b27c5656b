"""Megatron-LM legacy checkpoints (``--ckpt-format torch``, what its converter writes) start
a TST run from their weights, through pretrain_tst.main.

The legacy files are written here as Megatron-LM writes them (``get_checkpoint_name``'s
``iter_NNNNNNN/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``, each rank's module
``state_dict()`` under ``model`` / ``model0``, ``model1``, ... with the arguments, version and
iteration beside it), from the weights of a torch_dist checkpoint this trainer saved. A run
fine-tuned from the legacy copy must repeat, loss for loss (rel 1e-6), the run fine-tuned
from the torch_dist original, which reads the same weights through megatron-core's
dist_checkpointing instead: at TP 2 x PP 2 with the default tied embeddings, and at PP 2 x
VPP 2 x EP 2 with MoE layers. The copies use the local spec's names and, in another copy,
Transformer Engine's (fused layer norms, ``_extra_state`` entries), in a "release" folder.
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import pytest
import torch
from flags import SMALL_GPT

import pretrain_tst

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "4", "--tst-bag-size", "3", "--tst-iters", "2",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0",
    *SMALL_GPT,
]  # fmt: skip

# Transformer Engine's names of the local spec's separate norms (its fused layer-norm linears).
TE_NAMES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}  # fmt: skip


def _losses(argv: list[str], metrics: str) -> list[float]:
    from trainer_runs import main_records

    return [r["loss"] for r in main_records(argv, metrics) if r.get("loss") is not None]


def _te_named(state: dict, moe: bool) -> dict:
    """``state`` as the Transformer Engine spec names it: norms fused into the next linear
    (an MoE layer keeps its own pre-MLP norm there), an FP8 ``_extra_state`` per linear."""
    out = {}
    for key, value in state.items():
        if key.endswith("._extra_state"):
            continue
        for local, te in TE_NAMES.items():
            head, _, rest = key.partition(".layers.")
            number, _, tail = rest.partition(".")
            if rest and tail.startswith(local) and not (moe and local == "pre_mlp_layernorm."):
                key = f"{head}.layers.{number}.{te}{tail[len(local) :]}"
        out[key] = value
        if key.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc2.weight")):
            out[key.replace(".weight", "._extra_state")] = io.BytesIO(b"fp8 metadata")
    return out


def _megatron_args(cfg, function: bool = True) -> argparse.Namespace:
    """Arguments as Megatron-LM saves them; in a legacy file, a function among them (older
    Megatron-LM versions pickled some; megatron-core's torch_dist reader would refuse one)."""
    args = argparse.Namespace(
        num_layers=4, hidden_size=32, ffn_hidden_size=cfg.model.resolved_ffn_hidden_size,
        num_attention_heads=4, swiglu=True, normalization="RMSNorm",
        position_embedding_type="rope", params_dtype=torch.float32,
    )  # fmt: skip
    if function:
        args.activation_func = torch.nn.functional.silu
    return args


def _write_legacy(trainer, folder: str, te: bool, release: bool) -> None:
    """``trainer``'s weights as Megatron-LM's legacy save writes them (its writers: the
    first expert-data-parallel rank of each model-parallel rank)."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_data_parallel_rank() != 0:
        return
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    if ps.get_expert_model_parallel_world_size() > 1:
        name += f"_{ps.get_expert_model_parallel_rank():03d}"
    path = os.path.join(folder, "release" if release else "iter_0000007", name)
    os.makedirs(path, exist_ok=True)
    chunks, moe = trainer.raw_chunks, bool(trainer.cfg.model.num_experts)
    state = {
        "args": _megatron_args(trainer.cfg), "checkpoint_version": 3.0, "iteration": 7,
        "num_floating_point_operations_so_far": 0,
        "rng_state": [{"np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state()}],
        "optimizer": {"optimizer": {"state": {}}},
    }  # fmt: skip
    for i, chunk in enumerate(chunks):
        weights = {k: v.clone() if isinstance(v, torch.Tensor) else v
                   for k, v in chunk.state_dict().items()}  # fmt: skip
        state["model" if len(chunks) == 1 else f"model{i}"] = (
            _te_named(weights, moe) if te else weights
        )
    torch.save(state, os.path.join(path, "model_optim_rng.pt"))


def _write_torch_dist(trainer, folder: str) -> None:
    """``trainer``'s weights as Megatron-LM's torch_dist save writes them: its state dict
    (the model's sharded state with Megatron-LM's metadata, the arguments, iteration and
    version beside it) through dist_checkpointing, no manifest of this trainer's."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    chunks = trainer.raw_chunks
    metadata = {"singleton_local_shards": False,
                "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}  # fmt: skip
    state = {"args": _megatron_args(trainer.cfg, False), "checkpoint_version": 3.0, "iteration": 7,
             "num_floating_point_operations_so_far": 0}  # fmt: skip
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        state[key] = chunk.sharded_state_dict(metadata=metadata)
    path = os.path.join(folder, "iter_0000007")
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(state, path, content_metadata={"singleton_local_shards": False})


def _write_megatron(argv: list[str], folder: str, kind: str) -> None:
    """Load ``argv``'s --load (torch_dist, this trainer's) weights the trainer's way, then
    write them into ``folder`` as Megatron-LM would instead of training: ``kind`` "legacy",
    "legacy-te-release" (TE names, a release folder) or "torch_dist"."""
    import torch.distributed as dist

    from tst.trainer import Trainer

    original = Trainer.train

    def write(self):
        os.makedirs(folder, exist_ok=True)
        dist.barrier()
        if kind == "torch_dist":
            _write_torch_dist(self, folder)
        else:
            _write_legacy(self, folder, te=kind != "legacy", release=kind != "legacy")
        dist.barrier()
        if dist.get_rank() == 0:
            with open(os.path.join(folder, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("release" if kind == "legacy-te-release" else "7")
        dist.barrier()
        return 0

    Trainer.train = write
    try:
        assert pretrain_tst.main(argv + ["--finetune"]) == 0
    finally:
        Trainer.train = original


def _error(argv: list[str], metrics: str) -> str:
    from trainer_runs import main_error

    from tst.errors import TSTError

    return main_error(argv, metrics, (ValueError, TSTError))


def _same(got: list[float], want: list[float], label: str) -> None:
    assert len(got) == len(want) == 4, (label, got, want)
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-6), (label, got, want)


def _check_layout(world, tmp_path, layout: list[str], every_entry: bool) -> None:
    """The fine-tunes from each copy against the one from this trainer's checkpoint; with
    ``every_entry`` also --pretrained-checkpoint with --use-checkpoint-args and the refused
    resumes (the entry points do not depend on the layout)."""
    base = BASE + layout
    pre = str(tmp_path / "pre")
    fresh = world.run(_losses, base + ["--save", pre, "--save-interval", "4"],
                      str(tmp_path / "fresh.jsonl"))[0]  # fmt: skip
    legacy, release = str(tmp_path / "legacy"), str(tmp_path / "release")
    megatron = str(tmp_path / "megatron")
    world.run(_write_megatron, base + ["--load", pre], legacy, "legacy")
    world.run(_write_megatron, base + ["--load", pre], release, "legacy-te-release")
    world.run(_write_megatron, base + ["--load", pre], megatron, "torch_dist")
    want = world.run(_losses, base + ["--load", pre, "--finetune"], str(tmp_path / "a.jsonl"))[0]
    assert want[0] < fresh[0] - 0.05  # the trained weights, not a fresh model
    got = world.run(_losses, base + ["--load", legacy, "--finetune", "--ckpt-format", "torch"],
                    str(tmp_path / "b.jsonl"))[0]  # fmt: skip
    _same(got, want, "legacy, local names")
    # A release checkpoint loads its weights alone (Megatron-LM's rule); TE's names.
    got = world.run(_losses, base + ["--load", release], str(tmp_path / "c.jsonl"))[0]
    _same(got, want, "release, Transformer Engine names")
    # A torch_dist checkpoint Megatron-LM saved (its common state, no manifest of ours).
    got = world.run(_losses, base + ["--load", megatron, "--finetune"],
                    str(tmp_path / "e.jsonl"))[0]  # fmt: skip
    _same(got, want, "Megatron-LM torch_dist")
    if not every_entry:
        return
    # --pretrained-checkpoint, with --use-checkpoint-args reading the saved arguments: the
    # norm kind given on the command line is overridden by the checkpoint's (RMSNorm).
    own = str(tmp_path / "own")
    flags = [a if a != "RMSNorm" else "LayerNorm" for a in base] + [
        "--pretrained-checkpoint", legacy, "--load", own, "--save", own, "--use-checkpoint-args"
    ]  # fmt: skip
    got = world.run(_losses, flags, str(tmp_path / "d.jsonl"))[0]
    _same(got, want, "--pretrained-checkpoint --use-checkpoint-args")
    # Resuming from either is refused, naming the fix.
    message = world.run(_error, base + ["--load", legacy], str(tmp_path / "f.jsonl"))[0]
    assert "legacy torch format" in message and "pass --finetune" in message, message
    message = world.run(_error, base + ["--load", megatron], str(tmp_path / "g.jsonl"))[0]
    assert "saved by Megatron-LM" in message and "pass --finetune" in message, message


def test_legacy_checkpoint_at_tp2_pp2_with_tied_embeddings(world4, tmp_path):
    _check_layout(world4, tmp_path, ["--tensor-model-parallel-size", "2",
                                     "--pipeline-model-parallel-size", "2"], every_entry=True)  # fmt: skip
    legacy = str(tmp_path / "legacy")
    # Another model-parallel layout: the per-rank files cannot serve it.
    message = world4.run(
        _error, BASE + ["--pipeline-model-parallel-size", "2", "--load", legacy, "--finetune"],
        str(tmp_path / "h.jsonl"),
    )[0]  # fmt: skip
    assert "loads only at the sizes it was saved at" in message, message
    assert "mp_rank_00_000, mp_rank_00_001, mp_rank_01_000, mp_rank_01_001" in message, message
    # Another model shape: the tensors that differ are named.
    wider = BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--ffn-hidden-size", "96", "--load", legacy, "--finetune"]  # fmt: skip
    message = world4.run(_error, wider, str(tmp_path / "i.jsonl"))[0]
    assert "shapes differ" in message and "linear_fc1.weight" in message, message
    # --dist-ckpt-strictness is torch_dist's: a legacy file is read strictly (Megatron-LM's
    # load_state_dict(strict=True)), and the refusal says so.
    message = world4.run(_error, wider + ["--dist-ckpt-strictness", "log_all"],
                         str(tmp_path / "j.jsonl"))[0]  # fmt: skip
    assert (
        "shapes differ" in message
        and "--dist-ckpt-strictness log_all applies to torch_dist checkpoints" in message
    ), message


def test_legacy_checkpoint_at_pp2_vpp2_ep2_with_experts(world4, tmp_path):
    _check_layout(world4, tmp_path, [
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
        "--num-experts", "4", "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
        "--untie-embeddings-and-output-weights",
    ], every_entry=False)  # fmt: skip
    names = sorted(os.listdir(tmp_path / "legacy" / "iter_0000007"))
    assert names == ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000",
                     "mp_rank_00_001_001"]  # fmt: skip


def _evaluated(argv: list[str], metrics: str) -> list[float]:
    from trainer_runs import main_records

    return [r["val_loss"] for r in main_records(argv, metrics) if "val_loss" in r]


def test_moe_upcycling_from_a_legacy_dense_checkpoint(world2, tmp_path):
    """--moe-use-upcycling grows a Megatron-LM legacy dense checkpoint (a converted Llama's
    form) into experts at EP 2 (its file is the dense one of EP 1): every expert is its
    layer's MLP, so the held-out loss is the dense model's (rel 1e-5)."""
    dense, legacy = str(tmp_path / "dense"), str(tmp_path / "legacy")
    base = BASE + ["--ffn-hidden-size", "32"]
    world2.run(_losses, base + ["--save", dense, "--save-interval", "4"],
               str(tmp_path / "d.jsonl"))  # fmt: skip
    world2.run(_write_megatron, base + ["--load", dense], legacy, "legacy")
    evaluate = base + ["--skip-train", "--eval-iters", "2"]
    want = world2.run(_evaluated, evaluate + ["--load", dense], str(tmp_path / "w.jsonl"))[0]
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
           "--expert-model-parallel-size", "2", "--moe-use-upcycling", "--load", legacy,
           "--save", str(tmp_path / "moe")]  # fmt: skip
    got = world2.run(_evaluated, evaluate + moe, str(tmp_path / "g.jsonl"))[0]
    assert len(want) == 1 and got == pytest.approx(want, rel=1e-5), (got, want)
