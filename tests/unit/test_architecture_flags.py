"""Megatron-LM 0.16.1's remaining architecture flags: the squared-ReLU MLP, RoFormer-style RoPE
(``--rotary-interleaved``), layers without RoPE (``--no-rope-freq``), Llama-4's QK L2 norm,
gated attention (``--attention-output-gate``), query-key layer scaling, the fp32 residual
stream, Xavier and embedding-std initialisation, and the MoE flags (shared-expert gate,
input jitter, probabilities on the expert input, the deprecated ``--moe-layer-recompute``).

Each reaches megatron-core with Megatron-LM's meaning and default; each is checked against a
definition written here (fp32, rel 1e-4 / abs 1e-5 unless said): the activation formula,
RoPE on (even, odd) pairs from its angles, order-invariance of attention without positions,
unit RMS of normalised queries and keys, the distributions drawn. What megatron-core refuses
is refused up front in one line.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from flags import one_rank_gpt

from gpt_helpers import gpt_from_flags

VOCAB, L, BATCH = 64, 8, 2
FLAGS = [*one_rank_gpt(VOCAB, L, BATCH, layers=4), "--disable-bias-linear", "--normalization",
         "RMSNorm"]  # fmt: skip
MOE = ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "32"]


def _cfg(*extra):
    from tst.config import parse_args
    from tst.plan import validate

    cfg = parse_args([*FLAGS, *extra])
    return cfg, validate(cfg, 1, VOCAB)


def _config(*extra):
    from tst.megatron_config import transformer_config
    from tst.platform import Layout

    cfg, plan = _cfg(*extra)
    layout = Layout(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                    backend="gloo", tp=1, pp=1, vpp=None, dp=1, ep=1, tp_rank=0, pp_rank=0,
                    dp_rank=0, ep_rank=0, cpu_patched=False)  # fmt: skip
    return transformer_config(cfg, plan, layout, check_device=False)


def test_flags_reach_megatron_core_with_megatron_lms_defaults():
    from megatron.core.activations import squared_relu

    c = _config()
    assert (c.rotary_interleaved, c.no_rope_freq, c.qk_l2_norm, c.attention_output_gate,
            c.apply_query_key_layer_scaling, c.fp32_residual_connection,
            c.embedding_init_method_std, c.moe_shared_expert_gate, c.moe_input_jitter_eps,
            c.moe_apply_probs_on_input) == (False, None, False, False, False, False, 0.02,
                                            False, None, False)  # fmt: skip
    assert not c.attention_softmax_in_fp32
    c = _config("--squared-relu", "--rotary-interleaved", "--no-rope-freq", "2", "--qk-l2-norm",
                "--attention-output-gate", "--apply-query-key-layer-scaling",
                "--embedding-init-method-std", "0.1", "--init-method-xavier-uniform")  # fmt: skip
    assert c.activation_func is squared_relu and not c.gated_linear_unit
    assert (c.rotary_interleaved, c.no_rope_freq, c.qk_l2_norm, c.attention_output_gate,
            c.apply_query_key_layer_scaling, c.embedding_init_method_std) == (
        True, [0, 1, 0, 1], True, True, True, 0.1)  # fmt: skip
    assert c.attention_softmax_in_fp32  # layer scaling turns it on, as in megatron-core
    assert c.init_method is torch.nn.init.xavier_uniform_
    assert _config("--no-rope-freq", "[1,0,0,1]").no_rope_freq == [1, 0, 0, 1]
    assert _config("--bf16", "--fp32-residual-connection").fp32_residual_connection
    c = _config(*MOE, "--moe-shared-expert-gate", "--moe-input-jitter-eps", "0.01",
                "--moe-router-topk", "1", "--moe-router-pre-softmax",
                "--moe-apply-probs-on-input")  # fmt: skip
    assert (c.moe_shared_expert_gate, c.moe_input_jitter_eps, c.moe_apply_probs_on_input) == (
        True, 0.01, True)  # fmt: skip


def test_moe_layer_recompute_is_selective_recompute_of_the_moe_layer():
    with pytest.warns(UserWarning, match="--moe-layer-recompute is deprecated"):
        c = _config(*MOE, "--moe-layer-recompute")
    assert (c.recompute_granularity, c.recompute_modules) == ("selective", ["core_attn", "moe"])
    with pytest.warns(UserWarning, match="deprecated"):
        c = _config(*MOE, "--moe-layer-recompute", "--recompute-granularity", "selective",
                    "--recompute-modules", "mlp", "moe")  # fmt: skip
    assert c.recompute_modules == ["mlp", "moe"]


def test_moe_act_recompute_is_dropped_where_no_grouped_gemm_experts_run():
    """megatron-core refuses "moe_act" without grouped-GEMM experts, which only the
    Transformer Engine spec builds (--moe-grouped-gemm with the local spec computes the
    experts one by one): dropped with a warning, the other modules kept."""
    for model in (MOE + ["--moe-grouped-gemm"], []):
        with pytest.warns(UserWarning, match="--recompute-modules moe_act: only grouped-GEMM"):
            c = _config(*model, "--recompute-granularity", "selective", "--recompute-modules",
                        "moe_act", "mlp")  # fmt: skip
        assert c.recompute_modules == ["mlp"] and not c.moe_grouped_gemm


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--squared-relu", "--swiglu"], r"--swiglu and --squared-relu are 2 MLPs: pick one"),
        (["--no-rope-freq", "3"], r"--no-rope-freq 3 must be >= 1 and divide --num-layers 4"),
        (["--no-rope-freq", "[0,1]"], r"one 0 \(RoPE\) or 1 \(no RoPE\) per layer \(4 layers\)"),
        (["--no-rope-freq", "[0,0,0,0]"], r"leaves every layer with RoPE"),
        (["--no-rope-freq", "2", "--position-embedding-type", "learned_absolute"],
         r"--no-rope-freq .* needs --position-embedding-type rope"),
        (["--fp32-residual-connection"], r"--fp32-residual-connection .* this run is fp32"),
        (["--embedding-init-method-std", "0"], r"--embedding-init-method-std must be a positive"),
        ([*MOE, "--moe-router-topk", "1"], r"--moe-router-topk 1 needs --moe-router-pre-softmax"),
        ([*MOE, "--moe-apply-probs-on-input"], r"needs --moe-router-topk 1"),
        (["--num-experts", "4", "--moe-shared-expert-gate"],
         r"--moe-shared-expert-gate gates the shared expert: give --moe-shared-expert-inter"),
        ([*MOE, "--moe-input-jitter-eps", "1.5"], r"--moe-input-jitter-eps must be in \(0, 1\)"),
        ([*MOE, "--moe-layer-recompute", "--recompute-granularity", "full", "--recompute-method",
          "uniform", "--recompute-num-layers", "1"], r"--moe-layer-recompute with .* full"),
    ],
)  # fmt: skip
def test_bad_combinations_are_refused_in_one_line(extra, message):
    from tst.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        _cfg(*extra)
    assert "\n" not in str(caught.value)
    assert re.search(message, str(caught.value)), str(caught.value)


@pytest.fixture
def world():
    """A one-rank world for the test's models (built and run inside it)."""
    from tst.export.loading import single_process_world

    with single_process_world() as layout:
        yield layout


def _model(layout, *extra):
    return gpt_from_flags(layout, [*FLAGS, *extra], VOCAB).train()


def test_squared_relu_mlp_matches_the_definition(world):
    mlp = _model(world, "--squared-relu", "--ffn-hidden-size", "48").decoder.layers[0].mlp
    w1, w2 = mlp.linear_fc1.weight.detach(), mlp.linear_fc2.weight.detach()
    assert tuple(w1.shape) == (48, 32)
    x = torch.randn(L, BATCH, 32, generator=torch.Generator().manual_seed(1))
    out, _ = mlp(x)
    torch.testing.assert_close(out, torch.relu(x @ w1.T).pow(2) @ w2.T, rtol=1e-4, atol=1e-5)


def _roformer(x, positions, base):
    """RoPE on (even, odd) dimension pairs: pair i turns by position x base^(-2i / d)."""
    d = x.size(-1)
    angles = positions.view(-1, 1).float() * base ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = angles.cos().view(-1, 1, 1, d // 2), angles.sin().view(-1, 1, 1, d // 2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_rotary_interleaved_turns_even_odd_pairs(world):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    x = torch.randn(L, BATCH, 4, 8, generator=torch.Generator().manual_seed(2))
    for interleaved in (True, False):
        model = _model(world, *(["--rotary-interleaved"] if interleaved else []))
        freqs = model.rotary_pos_emb(L)
        got = apply_rotary_pos_emb(x, freqs, model.config)
        want = _roformer(x, torch.arange(L), 10000.0)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5) == interleaved


def _logits(model, tokens):
    positions = torch.arange(tokens.size(1)).expand(tokens.size(0), -1)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)


@pytest.mark.parametrize("extra, invariant", [(["--no-rope-freq", "1"], True), ([], False)])
def test_a_layer_without_rope_sees_no_order(world, extra, invariant):
    """One causal attention layer without positions sees its prefix as a set: with RoPE off,
    swapping the first two tokens leaves every later position's logits as they were; with
    RoPE it does not."""
    model = _model(world, "--num-layers", "1", *extra)
    assert model.config.no_rope_freq == ([1] if extra else None)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=gen)
    swapped = tokens[:, [1, 0, *range(2, L)]]
    a, b = _logits(model, tokens), _logits(model, swapped)
    assert torch.allclose(a[:, 2:], b[:, 2:], rtol=1e-4, atol=1e-5) == invariant
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-3)  # the tokens themselves differ


def test_qk_l2_norm_gives_queries_and_keys_unit_rms(world):
    seen = []
    model = _model(world, "--qk-l2-norm")
    core = model.decoder.layers[1].self_attention.core_attention
    core.register_forward_hook(lambda m, args, out: seen.append(args[:2]))
    _logits(model, torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(4)))
    (q, k), = seen  # fmt: skip
    for t in (q, k):  # [s, b, heads, d]; RoPE turns pairs, so the norm survives it
        # x / sqrt(mean(x^2) + eps), eps 1e-5: the mean square is 1 less eps / mean(x^2).
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1]), rtol=0,
                                   atol=1e-2)  # fmt: skip
    plain = []
    model = _model(world)
    model.decoder.layers[1].self_attention.core_attention.register_forward_hook(
        lambda m, args, out: plain.append(args[0]))  # fmt: skip
    _logits(model, torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(4)))
    assert (plain[0].pow(2).mean(-1) - 1).abs().max() > 0.5  # not normalised without the flag


def test_attention_output_gate_adds_a_gate_per_query_channel(world):
    """The QKV projection grows by heads x head size (the gate), and the output changes."""
    plain, gated = _model(world), _model(world, "--attention-output-gate")
    qkv = [m.decoder.layers[0].self_attention.linear_qkv.weight.shape[0] for m in (plain, gated)]
    assert qkv == [3 * 32, 4 * 32]


def test_query_key_layer_scaling_changes_no_fp32_result(world):
    """1 / layer number before the softmax, undone in its fp32: the same attention in fp32."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=gen)
    torch.manual_seed(0)
    plain = _model(world)
    scaled = _model(world, "--apply-query-key-layer-scaling")
    scaled.load_state_dict(plain.state_dict())
    cores = [layer.self_attention.core_attention for layer in scaled.decoder.layers]
    assert [c.scale_mask_softmax.scale for c in cores] == [1, 2, 3, 4]
    torch.testing.assert_close(_logits(scaled, tokens), _logits(plain, tokens), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_fp32_residual_connection_under_bf16(world):
    """The embedding hands the first layer an fp32 residual while the weights are bf16 (its
    norm computes in fp32 and feeds the GEMMs bf16); megatron-core 0.16.1's bias-dropout-add
    casts the residual to the layer output's dtype, so the layers pass bf16 on, as there."""
    from megatron.core.transformer.module import Float16Module

    model = _model(world, "--bf16", "--fp32-residual-connection")
    seen = {}
    model.embedding.register_forward_hook(lambda m, args, out: seen.update(embedding=out.dtype))
    norm = model.decoder.layers[0].input_layernorm
    norm.register_forward_hook(lambda m, args, out: seen.update(norm=(args[0].dtype, out.dtype)))
    wrapped = Float16Module(model.config, model)
    assert model.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(6))
    logits = _logits(wrapped, tokens)
    assert seen == {"embedding": torch.float32, "norm": (torch.float32, torch.bfloat16)}
    assert torch.isfinite(logits).all()
    # Without the flag the embedding output is bf16 already.
    plain = Float16Module(model.config, _model(world, "--bf16"))
    plain.module.embedding.register_forward_hook(lambda m, a, out: seen.update(plain=out.dtype))
    _logits(plain, tokens)
    assert seen["plain"] == torch.bfloat16


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_apply_layernorm_1p_scales_by_one_plus_zero_started_weights(world, normalization):
    """--apply-layernorm-1p (zero-centred gamma, as apex's and TE's norms have it): every norm
    of the local spec, the query / key norms too, starts at weight 0 and scales by 1 + weight,
    checked against torch's functional norms with the weight plus one; the model without the
    flag, given the same weights plus one, computes the same logits."""
    gen = torch.Generator().manual_seed(7)
    flags = ["--normalization", normalization, "--qk-layernorm"]
    torch.manual_seed(0)
    zero = _model(world, *flags, "--apply-layernorm-1p")
    torch.manual_seed(0)
    plain = _model(world, *flags)
    norms = {n: m for n, m in zero.named_modules()
             if "layernorm" in n.split(".")[-1] and hasattr(m, "weight")}  # fmt: skip
    assert len(norms) == 4 * 4 + 1  # input, query, key, pre-MLP in each layer; final
    for name, norm in norms.items():
        assert torch.equal(norm.weight, torch.zeros_like(norm.weight)), name
        with torch.no_grad():  # weights away from 0, the same ones in both models
            norm.weight.normal_(0.0, 0.3, generator=gen)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(0.0, 0.3, generator=gen)
        x = torch.randn(L, BATCH, norm.weight.numel(), generator=gen)
        w, b = norm.weight.detach() + 1, getattr(norm, "bias", None)
        if normalization == "LayerNorm":
            want = torch.nn.functional.layer_norm(x, (x.size(-1),), w, b.detach(), norm.eps)
        else:
            want = x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * w
        torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)
    state = {k: v + 1 if k.endswith("layernorm.weight") else v
             for k, v in zero.state_dict().items()}  # fmt: skip
    plain.load_state_dict(state)
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=gen)
    torch.testing.assert_close(_logits(zero, tokens), _logits(plain, tokens), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_apply_layernorm_1p_with_an_fp32_residual_under_bf16(world):
    """Both norm options at once: fp32 in, bf16 out, scaled by 1 + weight in fp32."""
    model = _model(world, "--bf16", "--fp32-residual-connection", "--apply-layernorm-1p")
    norm = model.decoder.layers[0].input_layernorm.to(torch.bfloat16)  # as Float16Module
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 32))
    x = torch.randn(L, BATCH, 32, generator=torch.Generator().manual_seed(8))
    out = norm(x)
    w = norm.weight.float() + 1
    want = x / (x.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * w
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def _initialised(*extra):
    from tst.export.loading import single_process_world
    from tst.init import initialize_layout_independent
    from tst.megatron_config import transformer_config

    with single_process_world() as layout:
        cfg, plan = _cfg(*extra)
        config = transformer_config(cfg, plan, layout)
        model = gpt_from_flags(layout, [*FLAGS, *extra], VOCAB)
        initialize_layout_independent([model], config, 7, layout)
        return {name: p.detach() for name, p in model.named_parameters()}


def test_xavier_and_embedding_std_initialisation():
    """Xavier: uniform in +-sqrt(6 / (fan_in + fan_out)) of each whole matrix (its std is the
    bound / sqrt(3), within 10%); --embedding-init-method-std: the embedding's normal std
    (within 10%), the other weights keep theirs."""
    params = _initialised("--init-method-xavier-uniform", "--ffn-hidden-size", "256")
    for name in ("decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc2.weight",
                 "embedding.word_embeddings.weight"):  # fmt: skip
        w = params[name]
        bound = math.sqrt(6 / sum(w.shape))
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
    params = _initialised("--embedding-init-method-std", "0.2", "--ffn-hidden-size", "256")
    assert params["embedding.word_embeddings.weight"].std().item() == pytest.approx(0.2, rel=0.1)
    assert params["decoder.layers.0.mlp.linear_fc1.weight"].std().item() == pytest.approx(
        0.02, rel=0.1)  # fmt: skip
    # Xavier with an embedding std: the embedding keeps the normal of its std.
    params = _initialised("--init-method-xavier-uniform", "--embedding-init-method-std", "0.2")
    assert params["embedding.word_embeddings.weight"].std().item() == pytest.approx(0.2, rel=0.1)


def test_moe_flags_build_and_act(world):
    """The shared-expert gate is a [1, hidden] weight; with probabilities on the input (top-1)
    the layer runs; input jitter changes training forwards only."""
    model = _model(world, *MOE, "--moe-shared-expert-gate", "--moe-router-topk", "1",
                   "--moe-router-pre-softmax", "--moe-apply-probs-on-input")  # fmt: skip
    shared = model.decoder.layers[0].mlp.shared_experts
    assert tuple(shared.gate_weight.shape) == (1, 32)
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(8))
    assert torch.isfinite(_logits(model, tokens)).all()
    jitter = _model(world, *MOE, "--moe-input-jitter-eps", "0.5")
    a, b = _logits(jitter, tokens), _logits(jitter, tokens)
    assert not torch.allclose(a, b)
    jitter.eval()
    torch.testing.assert_close(_logits(jitter, tokens), _logits(jitter, tokens))


def test_dry_run_names_the_flags_and_counts_the_gates(capsys):
    import pretrain_tst

    argv = [*FLAGS, "--squared-relu", "--rotary-interleaved", "--no-rope-freq", "2",
            "--qk-l2-norm", "--attention-output-gate", "--apply-query-key-layer-scaling",
            *MOE, "--moe-shared-expert-gate", "--dry-run"]  # fmt: skip
    assert pretrain_tst.main(argv) == 0
    out = capsys.readouterr().out
    assert "(agrees)" in out
    assert "interleaved pairs, none on 2 of 4 layers" in out
    assert "attention softmax, QK L2 norm, output gate, query-key layer scaling" in out
    assert "squared-ReLU MLP" in out


def test_run_wide_torch_switches(monkeypatch):
    """--deterministic-mode: torch's deterministic algorithms while the run trains (restored
    after) and megatron-core's deterministic_mode; Megatron-LM's rules: no flash attention or
    fused cross-entropy, and NCCL_ALGO set on CUDA. --disable-bf16-reduced-precision-matmul
    (GPT-OSS's example): torch's bf16 reduced-precision GEMM reduction off while the run
    trains, the process's setting back after."""
    import pretrain_tst
    from tst.errors import ConfigError
    from tst.megatron_config import transformer_config
    from tst.platform import Layout
    from tst.trainer import Trainer

    matmul = torch.backends.cuda.matmul
    before = (torch.are_deterministic_algorithms_enabled(),
              matmul.allow_bf16_reduced_precision_reduction)  # fmt: skip
    seen = []
    monkeypatch.setattr(Trainer, "train", lambda self: seen.append(
        (torch.are_deterministic_algorithms_enabled(), self.config.deterministic_mode,
         matmul.allow_bf16_reduced_precision_reduction)) or 0)  # fmt: skip
    for extra in ([], ["--deterministic-mode", "--disable-bf16-reduced-precision-matmul"]):
        argv = [*FLAGS, "--vocab-size", "512", "--train-iters", "1", "--eval-iters", "0", *extra]
        assert pretrain_tst.main(argv) == 0
    assert seen == [(before[0], False, before[1]), (True, True, False)]
    assert (torch.are_deterministic_algorithms_enabled(),
            matmul.allow_bf16_reduced_precision_reduction) == before  # fmt: skip
    for extra, message in ((["--use-flash-attn"], "flash attention cannot be used in "
                            "deterministic mode"),
                           (["--cross-entropy-loss-fusion"], "fused cross-entropy")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            _cfg("--deterministic-mode", *extra)
    # Megatron-LM refuses the deprecated flag only: its deterministic functional tests run
    # --attention-backend flash (megatron-core keeps Transformer Engine deterministic).
    cfg, _ = _cfg("--deterministic-mode", "--attention-backend", "flash")
    assert cfg.model.attention_backend == "flash" and cfg.training.deterministic_mode
    cfg, plan = _cfg("--deterministic-mode")
    cuda = Layout(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"),
                  backend="nccl", tp=1, pp=1, vpp=None, dp=1, ep=1, tp_rank=0, pp_rank=0,
                  dp_rank=0, ep_rank=0, cpu_patched=False)  # fmt: skip
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    with pytest.raises(ValueError, match="--deterministic-mode needs NCCL_ALGO set"):
        transformer_config(cfg, plan, cuda)


def test_expert_tp_without_experts_shapes_the_expert_groups_as_in_megatron_lm(capsys):
    """Megatron-LM takes --expert-tensor-parallel-size on a dense model and megatron-core
    builds its expert groups with it (its GPT functional tests gpt3_mcore_te_tp2_pp2_cp2_etp4
    _*dp_last pass 4 at TP 2 x PP 2 x CP 2 with the tp-pp-dp order, which needs the expert
    data-parallel size ETP 4 gives): a warning, the groups as asked, megatron-core's rules."""
    import pretrain_tst
    from tst.config import parse_args
    from tst.errors import ConfigError
    from tst.plan import validate

    grid = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--context-parallel-size", "2", "--use-tp-pp-dp-mapping"]  # fmt: skip
    with pytest.warns(UserWarning, match="only shapes megatron-core's expert process groups"):
        plan = validate(parse_args([*FLAGS, *grid, "--expert-tensor-parallel-size", "4"]), 8,
                        VOCAB)  # fmt: skip
    assert (plan.grid.etp, plan.grid.expert_dp, plan.grid.dp) == (4, 1, 1)
    # Without it the expert data-parallel size (2) differs from the attention's (1), which
    # megatron-core's tp-pp-dp order refuses.
    with pytest.raises(ConfigError, match="needs the same data-parallel size"):
        validate(parse_args([*FLAGS, *grid]), 8, VOCAB)
    with pytest.raises(ConfigError, match=r"not divisible by ETP x EP x PP = 4"), \
            pytest.warns(UserWarning):  # fmt: skip
        validate(parse_args([*FLAGS, "--expert-tensor-parallel-size", "4"]), 2, VOCAB)
    argv = [*FLAGS, *grid, "--expert-tensor-parallel-size", "4", "--dry-run",
            "--dry-run-world-size", "8"]  # fmt: skip
    with pytest.warns(UserWarning):
        assert pretrain_tst.main(argv) == 0
    assert "layout for a world of 8:" in capsys.readouterr().out
    cfg = parse_args([*FLAGS, "--expert-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="--expert-model-parallel-size > 1 needs --num-experts"):
        validate(cfg, 2, VOCAB)  # megatron-core refuses expert parallelism without experts


def test_recompute_method_and_layers_without_granularity_are_ignored_with_a_warning():
    """Megatron-LM takes --recompute-method / --recompute-num-layers without a granularity
    (megatron-core reads them only with one; its rerun functional tests pass
    --recompute-num-layers 1 alone): a warning, and nothing is recomputed."""
    with pytest.warns(UserWarning, match="--recompute-num-layers without --recompute-"
                      "granularity: nothing is recomputed"):  # fmt: skip
        cfg, _ = _cfg("--recompute-num-layers", "1")
    assert cfg.parallel.recompute_num_layers is None and cfg.parallel.recompute_granularity is None
    with pytest.warns(UserWarning, match="--recompute-method / --recompute-num-layers without"):
        cfg, _ = _cfg("--recompute-method", "block", "--recompute-num-layers", "2")
    assert cfg.parallel.recompute_method is None
