"""muP (--use-mup and its flags, Megatron-LM 0.19's rules) on one rank.

The muP model's forward is the plain model's with its weights rescaled as muP's multipliers
say, written out here: the embedding table times --mup-embedding-mult, the output layer
times the logit multiplier (1 / width multiplier unless given) and the attention's softmax
scale sqrt(--mup-base-head-dim) / kv_channels ** --mup-attn-scale-power; in the token
phase and the bag phase (the bag mean scaled as a token's embedding), logits and the loss
megatron-core computes from them (fp32, rel 1e-5). Initial weights: each drawn tensor is
the plain draw times the factor muP's rule gives its kind (exact: the same generator).
The flags' checks, warnings and derived settings; export refuses a muP model by name.
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from flags import one_rank_gpt

from gpt_helpers import gpt_from_flags

VOCAB, L, BATCH = 64, 8, 2
# hidden 32, 4 heads: kv_channels 8; base 16: width multiplier 2.
FLAGS = [*one_rank_gpt(VOCAB, L, BATCH, layers=2), "--disable-bias-linear", "--normalization",
         "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights"]  # fmt: skip
MUP = ["--use-mup", "--mup-base-hidden-size", "16", "--mup-embedding-mult", "3",
       "--mup-base-head-dim", "4"]  # fmt: skip


@pytest.fixture
def world():
    from tst.export.loading import single_process_world

    with single_process_world() as layout:
        yield layout


def _rescaled_plain(world, mup_model, extra=()):
    """The plain model (no muP flags) holding ``mup_model``'s weights rescaled by muP's
    multipliers as written here, with the muP softmax scale."""
    plain = gpt_from_flags(world, [*FLAGS, *extra], VOCAB).eval()
    plain.load_state_dict(mup_model.state_dict())
    with torch.no_grad():
        plain.embedding.word_embeddings.weight.mul_(3.0)  # --mup-embedding-mult
        plain.output_layer.weight.mul_(16 / 32)  # 1 / width multiplier
    scale = math.sqrt(4) / 8**1.0  # sqrt(base head dim) / kv_channels ** power
    for layer in plain.decoder.layers:
        layer.self_attention.core_attention.softmax_scale = scale
    return plain


@pytest.mark.parametrize("bag", [1, 3])
def test_mup_forward_is_the_plain_forward_with_rescaled_weights(world, bag):
    model = gpt_from_flags(world, [*FLAGS, *MUP], VOCAB).eval()
    assert model.decoder.layers[0].self_attention.core_attention.softmax_scale == 0.25
    plain = _rescaled_plain(world, model)
    model.embedding.bag_size = plain.embedding.bag_size = bag
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (BATCH, L * bag), generator=gen)
    positions = torch.arange(L).expand(BATCH, -1)
    with torch.no_grad():
        got = model(tokens, positions, attention_mask=None)
        want = plain(tokens, positions, attention_mask=None)
    assert got.shape == (BATCH, L, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # megatron-core's loss from the logits (the label path): the scaled logits' CE.
    labels = torch.randint(0, VOCAB, (BATCH, L), generator=gen)
    with torch.no_grad():
        loss = model(tokens, positions, attention_mask=None, labels=labels)
    ce = F.cross_entropy(want.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, ce.view(BATCH, L), rtol=1e-5, atol=1e-6)
    # The multipliers change the forward (the check above is not vacuous).
    plain_unscaled = gpt_from_flags(world, FLAGS, VOCAB).eval()
    plain_unscaled.load_state_dict(model.state_dict())
    plain_unscaled.embedding.bag_size = bag
    with torch.no_grad():
        other = plain_unscaled(tokens, positions, attention_mask=None)
    assert (other - want).abs().max() > 1e-2


def test_output_multiplier_given_and_power_half(world):
    """--mup-output-mult given wins over 1 / m; --mup-attn-scale-power 0.5 is the standard
    1 / sqrt(d) times sqrt(base head dim)."""
    from tst.config import parse_args

    cfg = parse_args([*FLAGS, *MUP, "--mup-output-mult", "0.7", "--mup-attn-scale-power", "0.5"])
    got = cfg.mup.settings(32, 8)
    assert got == {"use_mup": True, "mup_width_mult": 2.0, "mup_embedding_mult": 3.0,
                   "mup_output_mult": 0.7, "softmax_scale": pytest.approx(2 / math.sqrt(8))}  # fmt: skip
    # At width multiplier 1 the logits keep their scale; without --use-mup nothing is set.
    assert parse_args([*FLAGS, "--use-mup"]).mup.settings(32, 8)["mup_output_mult"] == 1.0
    assert parse_args(FLAGS).mup.settings(32, 8) is None


def _draws(**config):
    from tst.init import Draw

    base = dict(init_method_std=0.02, num_layers=4, init_method=None,
                embedding_init_method_std=None)  # fmt: skip
    return Draw(types.SimpleNamespace(**{**base, **config}))


NAMES = {
    # name: muP's factor on the plain draw at width multiplier 4 (std / sqrt(m)), embedding
    # std 0.05 vs init std 0.02.
    "decoder.layers.0.self_attention.linear_qkv.weight": 0.5,
    "decoder.layers.0.self_attention.linear_proj.weight": 0.5,
    "decoder.layers.1.mlp.linear_fc1.weight": 0.5,
    "decoder.layers.1.mlp.linear_fc2.weight": 0.5,
    "decoder.layers.1.mlp.router.weight": 0.5,
    "embedding.word_embeddings.weight": 1.0,
    "embedding.position_embeddings.weight": 1.0,
    "output_layer.weight": 0.05 / 0.02,  # untied: the embedding's std under muP
    "decoder.layers.0.input_layernorm.weight": 1.0,
    "decoder.layers.0.self_attention.linear_qkv.bias": 1.0,
}


def test_mup_initialisation_scales_each_kind_of_weight():
    plain = _draws(embedding_init_method_std=0.05)
    mup = _draws(embedding_init_method_std=0.05, use_mup=True, mup_width_mult=4.0)
    for name, factor in NAMES.items():
        want = plain(name, (16, 8), seed=7)
        torch.testing.assert_close(mup(name, (16, 8), seed=7), want * factor, rtol=1e-6,
                                   atol=0, msg=name)  # fmt: skip
    # The stds themselves on a large draw: sigma / sqrt(m), sigma / (sqrt(2 L) sqrt(m)).
    big = (512, 512)
    qkv = mup("decoder.layers.0.self_attention.linear_qkv.weight", big, seed=1).std().item()
    proj = mup("decoder.layers.0.self_attention.linear_proj.weight", big, seed=1).std().item()
    assert qkv == pytest.approx(0.02 / 2, rel=0.01)
    assert proj == pytest.approx(0.02 / math.sqrt(8) / 2, rel=0.01)
    # Embedding std equal to the init std (the default): embeddings unscaled all the same.
    same = _draws(use_mup=True, mup_width_mult=4.0)
    torch.testing.assert_close(same("embedding.word_embeddings.weight", big, seed=2),
                               _draws()("embedding.word_embeddings.weight", big, seed=2))  # fmt: skip
    # Xavier's init replaces muP's (Megatron-LM's custom init_method): unscaled.
    xavier = dict(init_method=torch.nn.init.xavier_uniform_)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    torch.testing.assert_close(_draws(**xavier, use_mup=True, mup_width_mult=4.0)(name, big, 3),
                               _draws(**xavier)(name, big, 3))  # fmt: skip


def test_untied_output_layer_draw_uses_the_embedding_std_under_mup():
    plain, mup = _draws(), _draws(use_mup=True, mup_width_mult=9.0)
    name = "output_layer.weight"
    # plain: init_method (std 0.02, no muP scaling); muP: the embedding's std (0.02 here).
    torch.testing.assert_close(mup(name, (64, 32), seed=4), plain(name, (64, 32), seed=4))
    hidden = "decoder.layers.0.mlp.linear_fc1.weight"
    torch.testing.assert_close(mup(hidden, (64, 32), seed=4), plain(hidden, (64, 32), seed=4) / 3)


@pytest.mark.parametrize("extra, message", [
    (["--mup-base-hidden-size", "0"], "--mup-base-hidden-size must be positive"),
    (["--mup-embedding-mult", "0"], "--mup-embedding-mult and --mup-output-mult must be > 0"),
    (["--mup-output-mult", "nan"], "--mup-output-mult must be a finite number"),
    (["--mup-base-head-dim", "-4"], "--mup-base-head-dim must be a positive number"),
    (["--mup-attn-scale-power", "inf"], "--mup-attn-scale-power must be a finite number"),
])  # fmt: skip
def test_bad_mup_values_are_refused_in_one_line(extra, message):
    from tst.config import parse_args
    from tst.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_args([*FLAGS, "--use-mup", *extra])


def test_mup_flags_without_use_mup_warn_and_a_given_width_multiplier_is_replaced():
    from tst.config import parse_args

    with pytest.warns(UserWarning, match="--mup-base-hidden-size, --mup-output-mult without "
                                         "--use-mup change nothing"):  # fmt: skip
        cfg = parse_args([*FLAGS, "--mup-base-hidden-size", "16", "--mup-output-mult", "2"])
    assert cfg.mup.settings(32, 8) is None
    cfg = parse_args([*FLAGS, *MUP, "--mup-width-mult", "3"])
    with pytest.warns(UserWarning, match="--mup-width-mult 3 is replaced by --hidden-size / "
                                         "--mup-base-hidden-size = 32 / 16 = 2"):  # fmt: skip
        assert cfg.mup.settings(32, 8)["mup_width_mult"] == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the computed value given: no warning
        parse_args([*FLAGS, *MUP, "--mup-width-mult", "2"]).mup.settings(32, 8)


def test_mup_marks_the_embeddings_and_output_layer_and_mla_keeps_its_scale(world):
    model = gpt_from_flags(world, [*FLAGS, *MUP], VOCAB)
    marked = {n for n, p in model.named_parameters() if getattr(p, "is_embedding_parameter", 0)}
    assert marked == {"embedding.word_embeddings.weight", "output_layer.weight"}
    plain = gpt_from_flags(world, FLAGS, VOCAB)
    assert not any(hasattr(p, "is_embedding_parameter") for p in plain.parameters())
    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.plan import validate

    mla = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
           "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8"]  # fmt: skip
    cfg = parse_args([*FLAGS, *MUP, *mla])
    config = transformer_config(cfg, validate(cfg, 1, VOCAB), world)
    assert config.softmax_scale is None and config.mup_width_mult == 2.0


def test_export_refuses_a_mup_model_by_name():
    from tst.config import parse_args
    from tst.export.common import ExportError
    from tst.export.mapping import hf_architecture

    with pytest.raises(ExportError, match="--use-mup: the targets have no embedding or logit"):
        hf_architecture(parse_args([*FLAGS, *MUP]), None)
