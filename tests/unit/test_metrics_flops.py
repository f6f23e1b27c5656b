"""The FLOPs per position that MFU divides by, against torch's own FLOP counter on built
models (dense with GQA and SwiGLU, MoE with dense first layers and a shared expert, latent MoE,
MLA).

``flops_per_position`` counts GEMMs and attention only (no norms, biases, softmax), which is
what ``torch.utils.flop_counter.FlopCounterMode`` counts too, so the two agree closely; the
stated tolerance (1%) covers the router's fp32 casts and rounding only.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tst.config import parse_args
from tst.megatron_config import transformer_config, use_transformer_engine
from tst.metrics import flops_per_position
from tst.model import ModelShape, build_model_chunks
from tst.plan import validate
from tst.platform import initialize, shutdown

BASE = ["--mock-data", "--vocab-size", "500", "--seq-length", "32", "--micro-batch-size", "2",
        "--lr", "1e-3", "--train-iters", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--position-embedding-type", "rope", "--normalization", "RMSNorm",
        "--disable-bias-linear"]  # fmt: skip

MODELS = {
    "dense_gqa_swiglu": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                         "--group-query-attention", "--num-query-groups", "2", "--swiglu",
                         "--kv-channels", "24"],
    "moe_dense_first_shared": ["--num-layers", "3", "--hidden-size", "64",
                               "--num-attention-heads", "4", "--swiglu", "--num-experts", "4",
                               "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
                               "--moe-shared-expert-intermediate-size", "48",
                               "--moe-layer-freq", "[0,1,1]", "--ffn-hidden-size", "96"],
    "moe_latent_shared": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
                          "4", "--swiglu", "--num-experts", "4", "--moe-router-topk", "2",
                          "--moe-ffn-hidden-size", "32", "--moe-latent-size", "16",
                          "--moe-shared-expert-intermediate-size", "48"],
    "mla": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--multi-latent-attention", "--q-lora-rank", "24", "--kv-lora-rank", "16",
            "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "12",
            "--swiglu"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flops_per_position_matches_torchs_counter(name):
    cfg = parse_args(BASE + MODELS[name])
    layout = initialize(seed=1)
    try:
        plan = validate(cfg, 1, 500)
        config = transformer_config(cfg, plan, layout)
        shape = ModelShape.from_config(cfg.model, plan.padded_vocab_size,
                                       use_transformer_engine(cfg, layout))  # fmt: skip
        (model,) = build_model_chunks(config, shape, None, layout.device)
        b, seq = 2, cfg.model.seq_length
        tokens = torch.randint(0, 500, (b, seq))
        positions = torch.arange(seq).expand(b, -1)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(tokens, positions, attention_mask=None)
        counted = counter.get_total_flops() / (b * seq)
    finally:
        shutdown(layout)
    expected = flops_per_position(cfg, plan.padded_vocab_size) / 3  # forward only
    assert counted == pytest.approx(expected, rel=0.01), (name, counted, expected)
