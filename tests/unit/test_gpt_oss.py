"""GPT-OSS's architecture flags (Megatron-LM's GPT-OSS example): the quick-GEGLU MLP with its
linear offset and clamp, attention sinks (``--softmax-type``) and sliding-window attention on
some layers (``--window-size``, ``--window-attn-skip-freq``).

Each reaches megatron-core's TransformerConfig as Megatron-LM passes it, with Megatron-LM's
defaults when not given; what would train a silently different model is refused in one
line. The built modules are checked against references written here from the definitions:
attention as softmax over ``[q k^T * scale, sink]`` with the future and the positions past
the window masked out, and the MLP as ``quick_gelu(min(g, V)) * (clamp(l, -V, V) + offset)``
(fp32; outputs and gradients rel 1e-4 / abs 1e-5).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from flags import one_rank_gpt

from gpt_helpers import gpt_from_flags, one_rank_layout

VOCAB, L, BATCH, HEADS, D = 64, 8, 2, 4, 8
FLAGS = [*one_rank_gpt(VOCAB, L, BATCH, layers=4), "--disable-bias-linear"]  # 4 heads, d 8
OSS = ["--quick-geglu", "--glu-linear-offset", "1.0", "--activation-func-clamp-value", "7.0",
       "--softmax-type", "learnable", "--window-size", "3,0", "--window-attn-skip-freq", "2"]  # fmt: skip


def _cfg(*extra, base=FLAGS):
    from tst.config import parse_args
    from tst.plan import validate

    cfg = parse_args([*base, *extra])
    return cfg, validate(cfg, 1, VOCAB)


def _config(*extra, device="cpu", base=FLAGS):
    from tst.megatron_config import transformer_config

    cfg, plan = _cfg(*extra, base=base)
    return transformer_config(cfg, plan, one_rank_layout(device), check_device=False)


def test_flags_reach_megatron_core_with_megatron_lms_defaults():
    from megatron.core.fusions.fused_bias_geglu import quick_gelu

    c = _config()
    assert (c.gated_linear_unit, c.glu_linear_offset, c.activation_func_clamp_value,
            c.softmax_type, c.window_size, c.window_attn_skip_freq) == (
        False, 0.0, None, "vanilla", None, None)  # fmt: skip
    c = _config(*OSS)
    assert c.gated_linear_unit and c.activation_func is quick_gelu
    assert (c.glu_linear_offset, c.activation_func_clamp_value, c.softmax_type, c.window_size,
            c.window_attn_skip_freq) == (1.0, 7.0, "learnable", (3, 0), 2)  # fmt: skip
    # A pattern is one entry per layer; off-by-one and a window on every layer.
    c = _config("--window-size", "5,0", "--window-attn-skip-freq", "([1]*3+[0])",
                "--softmax-type", "off-by-one")  # fmt: skip
    assert (c.window_size, c.window_attn_skip_freq, c.softmax_type) == (
        (5, 0), [1, 1, 1, 0], "off-by-one")  # fmt: skip
    assert _config("--window-size", "(5,0)").window_attn_skip_freq is None
    # --quick-geglu keeps Megatron-LM's 4 x hidden MLP (only --swiglu changes the default).
    assert _config("--quick-geglu").ffn_hidden_size == 4 * 32


def test_windowed_layers_follow_megatron_cores_rule():
    from megatron.core.transformer.utils import is_layer_window_attention

    for extra in (["--window-attn-skip-freq", "2"], ["--window-attn-skip-freq", "3"],
                  ["--window-attn-skip-freq", "[0,1,1,0]"], []):  # fmt: skip
        cfg, _ = _cfg("--window-size", "4,0", *extra)
        want = [int(is_layer_window_attention(cfg.model.window, cfg.model.window_skip_freq, n))
                for n in range(1, 5)]  # fmt: skip
        assert cfg.model.windowed_layers() == want, extra
    assert _cfg("--window-size", "4,0", "--window-attn-skip-freq", "2")[0].model.windowed_layers(
    ) == [1, 0, 1, 0]  # fmt: skip
    assert _cfg()[0].model.windowed_layers() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--window-size", "128,4"], r"right side must be 0 \(--window-size 128,0\)"),
        (["--window-size", "128"], r"--window-size 128: give two non-negative ints"),
        (["--window-size", "a,b"], r"--window-size a,b: give two non-negative ints"),
        (["--window-attn-skip-freq", "2"], r"--window-attn-skip-freq .*give both"),
        (["--window-size", "4,0", "--window-attn-skip-freq", "[1,0]"],
         r"one 0 \(full\) or 1 \(windowed\) per layer \(4 layers\)"),
        (["--window-size", "4,0", "--window-attn-skip-freq", "0"], r"must be >= 1, got 0"),
        (["--window-size", "4,0", "--window-attn-skip-freq", "__import__('os')"],
         r"--window-attn-skip-freq .*give an int N or a list"),
        (["--quick-geglu", "--swiglu"], r"--swiglu and --quick-geglu are 2 MLPs: pick one"),
        (["--quick-geglu", "--activation-func-clamp-value", "0"], r"must be a positive number"),
        (["--softmax-type", "sinks"], r"invalid choice: 'sinks'"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_in_one_line(extra, message, capsys):
    from tst.errors import ConfigError

    with pytest.raises((ConfigError, SystemExit)) as caught:
        _cfg(*extra)
    text = str(caught.value) if caught.type is ConfigError else capsys.readouterr().err
    assert "\n" not in text.strip() or caught.type is SystemExit
    assert re.search(message, text), text


def test_gelu_mlp_ignores_offset_and_clamp_with_a_warning():
    with pytest.warns(UserWarning, match="--glu-linear-offset changes only a gated MLP"):
        c = _config("--glu-linear-offset", "1.0")
    assert c.glu_linear_offset == 0.0 and not c.gated_linear_unit
    with pytest.warns(UserWarning, match="--activation-func-clamp-value changes only a gated"):
        assert _config("--activation-func-clamp-value", "3").activation_func_clamp_value is None


def test_fusions_that_would_drop_the_window_or_the_offset_are_turned_off(monkeypatch):
    """On a GPU without Transformer Engine: megatron-core's fused softmax ignores the window,
    its dense MLP has no fused quick-GEGLU (it raises) and its fused SwiGLU no offset or clamp.
    Each is turned off with a warning naming the flag; the flag that asks for it silences it."""
    import tst.megatron_config

    monkeypatch.setattr(tst.megatron_config, "megatron_softmax_kernels_available", lambda: True)
    unfused = ["--attention-backend", "unfused"]
    with pytest.warns(UserWarning, match="--masked-softmax-fusion.*ignore --window-size"):
        c = _config(*unfused, "--window-size", "4,0", device="cuda")
    assert not c.masked_softmax_fusion
    assert _config(*unfused, device="cuda").masked_softmax_fusion  # no window: fused
    biased = [a for a in FLAGS if a != "--disable-bias-linear"]  # the GELU fusion needs them
    with pytest.warns(UserWarning, match="no fused bias \\+ quick-GEGLU"):
        assert not _config("--quick-geglu", device="cuda", base=biased).bias_activation_fusion
    assert _config(device="cuda", base=biased).bias_activation_fusion  # GELU: fused
    with pytest.warns(UserWarning, match="no fused bias \\+ squared-ReLU"):
        assert not _config("--squared-relu", device="cuda", base=biased).bias_activation_fusion
    with pytest.warns(UserWarning, match="--bias-swiglu-fusion.*--glu-linear-offset"):
        assert not _config(
            "--swiglu", "--glu-linear-offset", "1", device="cuda"
        ).bias_activation_fusion
    assert _config("--swiglu", device="cuda").bias_activation_fusion
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = _config(*unfused, "--window-size", "4,0", "--no-masked-softmax-fusion",
                    "--quick-geglu", "--no-bias-gelu-fusion", device="cuda", base=biased)  # fmt: skip
    assert not (c.masked_softmax_fusion or c.bias_activation_fusion)
    assert not [w for w in caught if "fusion" in str(w.message)]


def _core(model):
    return [layer.self_attention.core_attention for layer in model.decoder.layers]


def _plain_attention(q, k, v, scale, window, sink):
    """Softmax attention from the definition, [s, b, n, d] in, [s, b, n * d] out: position i
    sees j in [i - window, i] (all j <= i without a window); ``sink`` [n] is one more logit
    per head in the denominator (None: none)."""
    s, b, n, _ = q.shape
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * scale
    i, j = torch.arange(s).view(-1, 1), torch.arange(s).view(1, -1)
    hidden = (j > i) | ((i - j > window) if window is not None else False)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sink is not None:
        column = sink.view(1, n, 1, 1).expand(b, n, s, 1)
        probs = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, -1)


@pytest.mark.parametrize("softmax", ["learnable", "off-by-one", "vanilla"])
def test_core_attention_matches_the_definition(softmax):
    """Windowed layers (1 and 3 of 4 with --window-attn-skip-freq 2) see 3 positions back,
    the others the whole prefix; the sink's gradient is the reference's too."""
    from tst.export.loading import single_process_world

    gen = torch.Generator().manual_seed(5)
    flags = [*FLAGS, "--softmax-type", softmax, "--window-size", "2,0",
             "--window-attn-skip-freq", "2"]  # fmt: skip
    with single_process_world() as layout:
        cores = _core(gpt_from_flags(layout, flags, VOCAB).train())
        for number, core in enumerate(cores, start=1):
            q, k, v = (torch.randn(L, BATCH, HEADS, D, generator=gen, requires_grad=True)
                       for _ in range(3))  # fmt: skip
            upstream = torch.randn(L, BATCH, HEADS * D, generator=gen)
            if softmax == "learnable":
                assert isinstance(core.softmax_offset, torch.nn.Parameter)
                assert core.softmax_offset.tensor_model_parallel  # split with the heads
                with torch.no_grad():
                    core.softmax_offset.copy_(torch.randn(HEADS, generator=gen))
                sink = core.softmax_offset.detach().clone().requires_grad_()
            else:
                sink = torch.zeros(HEADS) if softmax == "off-by-one" else None
                assert (core.softmax_offset is None) == (softmax == "vanilla")
            learned = [core.softmax_offset] if softmax == "learnable" else []
            out = core(q, k, v, None)
            grads = torch.autograd.grad((out * upstream).sum(), [q, k, v, *learned])
            window = 2 if number % 2 else None
            ref = [t.detach().requires_grad_() for t in (q, k, v)]
            want = _plain_attention(*ref, 1 / math.sqrt(D), window, sink)
            ref_grads = torch.autograd.grad((want * upstream).sum(),
                                            [*ref, *([sink] if learned else [])])  # fmt: skip
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
            for g, w in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
            if learned:
                assert grads[-1].abs().sum() > 0
            # The window matters: a windowed layer differs from full attention.
            full = _plain_attention(q.detach(), k.detach(), v.detach(), 1 / math.sqrt(D),
                                    None, None if sink is None else sink.detach())  # fmt: skip
            assert torch.allclose(out.detach(), full, atol=1e-4) == (window is None)


def test_sinks_and_window_run_megatron_cores_attention_under_flash():
    """The fused (SDPA) local attention has no sinks or window: --attention-backend flash
    runs megatron-core's, saying so; auto does it without a word."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tst.attention import SDPAttention
    from tst.export.loading import single_process_world

    with single_process_world() as layout:
        for extra in (["--softmax-type", "learnable"], ["--window-size", "4,0"]):
            with pytest.warns(UserWarning, match="--attention-backend flash: the fused"):
                model = gpt_from_flags(layout, [*FLAGS, *extra, "--attention-backend", "flash"],
                                       VOCAB)  # fmt: skip
            assert all(type(c) is DotProductAttention for c in _core(model))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = gpt_from_flags(layout, [*FLAGS, *extra], VOCAB, on_gpu=True)
            assert not [w for w in caught if "attention-backend" in str(w.message)]
            assert all(type(c) is DotProductAttention for c in _core(model))
        model = gpt_from_flags(layout, [*FLAGS, "--attention-backend", "flash"], VOCAB)
        assert all(type(c) is SDPAttention for c in _core(model))


def test_quick_geglu_mlp_matches_the_definition():
    """fc1's output is [gate | linear] (megatron-core's order); the clamp (0.5 here, so that
    it bites) caps the gate above and the linear half on both sides."""
    from tst.export.loading import single_process_world

    gen = torch.Generator().manual_seed(11)
    flags = [*FLAGS, "--quick-geglu", "--glu-linear-offset", "1.0",
             "--activation-func-clamp-value", "0.5", "--ffn-hidden-size", "48"]  # fmt: skip
    with single_process_world() as layout:
        mlp = gpt_from_flags(layout, flags, VOCAB).train().decoder.layers[0].mlp
        w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
        assert tuple(w1.shape) == (2 * 48, 32) and tuple(w2.shape) == (32, 48)
        x = torch.randn(L, BATCH, 32, generator=gen) * 4
        out, bias = mlp(x)
        assert bias is None
        h = x @ w1.detach().T
        gate, linear = h[..., :48].clamp(max=0.5), h[..., 48:].clamp(-0.5, 0.5)
        assert (h[..., :48] > 0.5).any() and (h[..., 48:].abs() > 0.5).any()
        want = (gate * torch.sigmoid(1.702 * gate)) * (linear + 1.0) @ w2.detach().T
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_dry_run_counts_the_sinks_and_names_the_architecture(capsys):
    """The closed-form count (one sink logit per head and layer, a gated MLP's two halves)
    equals the meta-device build's, and the architecture line says what the flags built."""
    import pretrain_tst
    from tst.dry_run import meta_parameters, parameter_counts

    cfg, plan = _cfg(*OSS)
    counts = parameter_counts(cfg, plan.padded_vocab_size)
    built = sum(p.numel for p in meta_parameters(cfg, plan.padded_vocab_size))
    assert counts["total"] == built
    plain = parameter_counts(_cfg()[0], plan.padded_vocab_size)["total"]
    assert counts["total"] - plain == 4 * (HEADS + 32 * 4 * 32)  # sinks + the extra fc1 half
    assert pretrain_tst.main([*FLAGS, *OSS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("attention softmax with a learned sink per head, sliding window of 3 on 2 of 4 "
            "layers (full attention on the others); quick-GEGLU (linear offset 1) (inputs "
            "clamped at 7) MLP") in out  # fmt: skip


@pytest.mark.parametrize(
    "extra, name",
    [
        (["--softmax-type", "learnable"], "softmax_type='learnable'"),
        (["--softmax-type", "off-by-one"], "softmax_type='off-by-one'"),
        (["--window-size", "4,0"], "window_size=(4, 0)"),
        (["--glu-linear-offset", "1"], "glu_linear_offset=1.0"),
        (["--activation-func-clamp-value", "7"], "activation_func_clamp_value=7.0"),
    ],
)
def test_hugging_face_export_refuses_what_llama_cannot_hold(extra, name):
    """The export targets (Llama, Qwen3, their MoE forms) have no sinks, windows, GLU offset
    or clamp: such a checkpoint is refused by name, not exported as another model."""
    from tst.export.common import ExportError
    from tst.export.mapping import hf_architecture

    llama = ["--normalization", "RMSNorm", "--swiglu"]
    cfg, _ = _cfg(*llama)
    assert hf_architecture(cfg, _config(*llama)) == "LlamaForCausalLM"
    cfg, _ = _cfg(*llama, *extra)
    with pytest.raises(ExportError, match=re.escape(f"to Hugging Face: megatron-core's {name}")):
        hf_architecture(cfg, _config(*llama, *extra))
