"""``--moe-latent-size`` (Nemotron 3's latent MoE): the routed experts compute in a narrower
width, between a projection down (hidden -> latent) before the dispatch and one back up after
the combine; the router and the shared expert see the full hidden state.

The MoE layer pretrain_tst.py builds from the flags is checked against a reference written
here from that definition (softmax top-k routing, SwiGLU experts, fp32): outputs rel 1e-5 and
the gradients of the projections, an expert and the router rel 1e-4. megatron-core builds the
projections with Transformer Engine's ``TELinear``; without TE they are
``tst.cpu_compat.DuplicatedLinear``, so the same check covers that stand-in. The flag's
checks, its initialisation (the up-projection as an output projection) and what the dry run
and MFU count are checked too; training under TP / SP / EP and resuming under another layout
are in ``tests/distributed/test_architecture_layouts.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flags import one_rank_gpt

from gpt_helpers import gpt_from_flags

VOCAB, L, BATCH, H = 64, 8, 2, 32
E, K, FFN, LATENT, SHARED = 4, 2, 24, 12, 16
FLAGS = [*one_rank_gpt(VOCAB, L, BATCH, layers=2), "--disable-bias-linear", "--swiglu",
         "--normalization", "RMSNorm", "--num-experts", str(E), "--moe-router-topk", str(K),
         "--moe-ffn-hidden-size", str(FFN), "--moe-shared-expert-intermediate-size",
         str(SHARED), "--moe-latent-size", str(LATENT)]  # fmt: skip


def _swiglu(x, fc1, fc2):
    gate, up = torch.chunk(x @ fc1.T, 2, dim=-1)
    return (F.silu(gate) * up) @ fc2.T


def _reference(x, p):
    """The latent MoE layer from its definition, one token at a time."""
    tokens = x.reshape(-1, H)
    out = torch.zeros_like(tokens)
    for t, token in enumerate(tokens):
        logits = token @ p["router"].T
        top = torch.topk(logits, K).indices
        weights = torch.softmax(logits[top], dim=0)  # megatron-core's default: top-k, then softmax
        latent = token @ p["down"].T
        routed = sum(w * _swiglu(latent, p[f"fc1.{e}"], p[f"fc2.{e}"])
                     for w, e in zip(weights, top.tolist(), strict=True))  # fmt: skip
        out[t] = routed @ p["up"].T + _swiglu(token, p["shared.fc1"], p["shared.fc2"])
    return out.reshape(x.shape)


def _params(moe) -> dict:
    p = {"router": moe.router.weight, "down": moe.fc1_latent_proj.weight,
         "up": moe.fc2_latent_proj.weight, "shared.fc1": moe.shared_experts.linear_fc1.weight,
         "shared.fc2": moe.shared_experts.linear_fc2.weight}  # fmt: skip
    for e, expert in enumerate(moe.experts.local_experts):
        p[f"fc1.{e}"], p[f"fc2.{e}"] = expert.linear_fc1.weight, expert.linear_fc2.weight
    return p


def test_the_layer_computes_the_latent_moe_of_the_definition():
    from tst.export.loading import single_process_world

    gen = torch.Generator().manual_seed(3)
    with single_process_world() as layout:
        model = gpt_from_flags(layout, FLAGS, VOCAB).eval()
        moe = model.decoder.layers[0].mlp
        # The shapes: the projections whole, the experts at the latent width.
        assert tuple(moe.fc1_latent_proj.weight.shape) == (LATENT, H)
        assert tuple(moe.fc2_latent_proj.weight.shape) == (H, LATENT)
        expert = moe.experts.local_experts[0]
        assert tuple(expert.linear_fc1.weight.shape) == (2 * FFN, LATENT)
        assert tuple(expert.linear_fc2.weight.shape) == (LATENT, FFN)
        assert tuple(moe.shared_experts.linear_fc1.weight.shape) == (2 * SHARED, H)
        for param in (moe.fc1_latent_proj.weight, moe.fc2_latent_proj.weight):
            assert param.allreduce and not getattr(param, "tensor_model_parallel", False)
        with torch.no_grad():  # weights large enough that every path matters
            for param in moe.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        x = torch.randn(L, BATCH, H, generator=gen, requires_grad=True)
        upstream = torch.randn(L, BATCH, H, generator=gen)
        out, bias = moe(x)
        assert bias is None
        (out * upstream).sum().backward()
        params = _params(moe)
        got = {name: param.grad.clone() for name, param in params.items()}
        got_x = x.grad.clone()

        ref_params = {n: p.detach().double().requires_grad_() for n, p in params.items()}
        ref_x = x.detach().double().requires_grad_()
        want = _reference(ref_x, ref_params)
        (want * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x.double(), ref_x.grad, rtol=1e-4, atol=1e-5)
    for name in ("down", "up", "router", "fc1.0", "fc2.0", "shared.fc1"):
        torch.testing.assert_close(got[name].double(), ref_params[name].grad, rtol=1e-4,
                                   atol=1e-5, msg=name)  # fmt: skip


def test_flag_checks_and_config():
    from tst.config import parse_args
    from tst.errors import ConfigError
    from tst.plan import validate

    dense = [a for a in FLAGS[: FLAGS.index("--num-experts")]]
    with pytest.raises(ConfigError, match="--moe-latent-size is the routed experts' width: it "
                                          "needs --num-experts"):  # fmt: skip
        parse_args([*dense, "--moe-latent-size", "8"])
    with pytest.raises(ConfigError, match="greater than zero"):
        parse_args([*FLAGS, "--moe-latent-size", "0"])
    cfg = parse_args([*FLAGS, "--moe-shared-expert-overlap"])
    with pytest.raises(ConfigError, match="--moe-shared-expert-overlap is not supported with "
                                          "--moe-latent-size"):  # fmt: skip
        validate(cfg, 1, VOCAB)
    # Not latent-specific: megatron-core's shared experts assert no biases (Megatron-LM's
    # default has them) deep inside the build; refused up front with the fix.
    biased = [a for a in FLAGS if a != "--disable-bias-linear"]
    with pytest.raises(ConfigError, match="shared experts take no biases.*--disable-bias-linear"):
        validate(parse_args(biased), 1, VOCAB)


def test_initialisation_scales_the_up_projection_as_an_output_projection():
    """normal(0, std) for the down-projection, std / sqrt(2 layers) for the up-projection
    (megatron-core's output_layer_init_method), drawn by global name like every weight."""
    from tst.init import Draw

    class Config:
        init_method_std, num_layers, init_method = 0.02, 8, None

    draw = Draw(Config())
    down = draw("decoder.layers.3.mlp.fc1_latent_proj.weight", (256, 512), seed=1)
    up = draw("decoder.layers.3.mlp.fc2_latent_proj.weight", (512, 256), seed=1)
    assert down.std().item() == pytest.approx(0.02, rel=0.02)
    assert up.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
