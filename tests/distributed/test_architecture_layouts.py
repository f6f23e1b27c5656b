"""Megatron-LM's remaining architecture flags through pretrain_tst.py under tensor, sequence,
pipeline and expert parallelism: each layout trains what one tensor-parallel rank trains
across the phase switch (rel 2e-5 per logged loss; measured differences are ~1e-7).

The dense model uses every attention / MLP / RoPE / initialisation flag at once, with the RoPE
pattern a list whose layers 3 and 4 differ (a stage numbering its layers locally would skip
RoPE on the wrong ones) and Xavier bounds taken from each whole matrix (megatron-core's
per-shard Xavier would differ at TP 2). The MoE model gates its shared expert, scales the
top-1 expert's input by its probability, recomputes its MoE layers and normalises queries and
keys (torch's norm refused sequence parallelism there). Both use zero-centred norm weights
(--apply-layernorm-1p, which torch's norm refused too).
"""

from __future__ import annotations

import pytest
from test_trainer import BASE, _assert_close, _losses, _train

DENSE = [a for a in BASE if a != "--swiglu"] + [
    "--squared-relu", "--rotary-interleaved", "--no-rope-freq", "[0,1,1,0]", "--qk-l2-norm",
    "--attention-output-gate", "--apply-query-key-layer-scaling", "--init-method-xavier-uniform",
    "--embedding-init-method-std", "0.05", "--global-batch-size", "4", "--apply-layernorm-1p",
]  # fmt: skip
MOE = BASE + [
    "--num-experts", "4", "--moe-router-topk", "1", "--moe-router-pre-softmax",
    "--moe-apply-probs-on-input", "--moe-shared-expert-intermediate-size", "32",
    "--moe-shared-expert-gate", "--moe-layer-recompute", "--global-batch-size", "4",
    "--qk-layernorm", "--apply-layernorm-1p",
]  # fmt: skip
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]


@pytest.mark.parametrize(
    "argv, layouts",
    [(DENSE, {"TP2-SP": TP2, "PP2": PP2}),
     (MOE, {"TP2-SP": TP2, "EP2": ["--expert-model-parallel-size", "2"]})],
    ids=["dense", "moe"],
)  # fmt: skip
def test_layouts_agree_across_the_switch(world2, tmp_path, argv, layouts):
    want = _losses(world2.run(_train, argv, str(tmp_path / "ref.jsonl"))[0])
    assert [p for _, p, _ in want] == ["superposition"] * 3 + ["recovery"] * 3
    for name, extra in layouts.items():
        got = _losses(world2.run(_train, argv + extra, str(tmp_path / f"{name}.jsonl"))[0])
        _assert_close(got, want, 2e-5, name)


LATENT = BASE + [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16",
    "--moe-latent-size", "8", "--moe-shared-expert-intermediate-size", "16",
    "--global-batch-size", "4",
]  # fmt: skip


def _train_latent_copies(argv: list[str], metrics: str) -> tuple[list[dict], float]:
    """_train, and the largest difference between the two ranks' latent projections after
    training (0 where each rank holds the same copy)."""
    import torch
    import torch.distributed as dist
    from trainer_runs import after_training

    seen = []

    def look(trainer):
        for chunk in trainer.raw_chunks:
            for name, param in chunk.named_parameters():
                if "latent_proj" in name:
                    copies = [torch.empty_like(param) for _ in range(dist.get_world_size())]
                    dist.all_gather(copies, param.detach().contiguous())
                    seen.append((copies[0] - copies[1]).abs().max().item())

    with after_training(look):
        records = _train(argv, metrics)
    assert len(seen) == 8  # down and up in each of the 4 layers
    return records, max(seen)


def test_latent_moe_layouts_agree_and_resume_under_another(world2, tmp_path):
    """--moe-latent-size: the projections are whole on every TP rank and, under sequence
    parallelism, see their rank's slice of the sequence, so their gradients are summed over
    TP: the copies stay equal (without the sum they drift apart by ~0.01 in 6 steps, which
    these small MoE outputs hide from the losses). A checkpoint saved at TP 1 resumes at
    TP 2 + SP with expert-TP 1 (losses rel 2e-5)."""
    ckpt = str(tmp_path / "ckpt")
    want = _losses(world2.run(_train, LATENT + ["--save", ckpt, "--save-interval", "4"],
                              str(tmp_path / "ref.jsonl"))[0])  # fmt: skip
    assert [p for _, p, _ in want] == ["superposition"] * 3 + ["recovery"] * 3
    for name, extra in {"TP2-SP": TP2, "EP2": ["--expert-model-parallel-size", "2"]}.items():
        records, drift = world2.run(_train_latent_copies, LATENT + extra,
                                    str(tmp_path / f"{name}.jsonl"))[0]  # fmt: skip
        _assert_close(_losses(records), want, 2e-5, name)
        assert drift == 0.0, (name, drift)
    # The latent width from the checkpoint (--use-checkpoint-args takes it always, as
    # Megatron-LM does): the command line leaves it out.
    i = LATENT.index("--moe-latent-size")
    resumed = _losses(world2.run(
        _train, LATENT[:i] + LATENT[i + 2:] + TP2 + [
            "--expert-tensor-parallel-size", "1", "--load", ckpt, "--ckpt-step", "4",
            "--use-checkpoint-args"],
        str(tmp_path / "resumed.jsonl"))[0])  # fmt: skip
    _assert_close(resumed, want[4:], 2e-5, "resumed at TP2-SP, expert-TP 1")
