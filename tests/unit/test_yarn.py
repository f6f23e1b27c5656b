"""--position-embedding-type yarn for ordinary attention (Megatron-LM 0.19's YaRN flags, on
megatron-core 0.16.1's YarnRotaryEmbedding).

The frequencies are YaRN's (Peng et al. 2023), written out here: each dimension pair's
inverse frequency blends the extrapolated 1 / base^(2i/d) and the interpolated one divided by
the scaling factor, by a linear ramp between the correction dimensions of --yarn-beta-fast and
--yarn-beta-slow rotations over --yarn-original-max-position-embeddings (rounded outwards unless
--no-yarn-correction-range-round-to-int). The YaRN model's logits, in the token and the bag
phase, equal a RoPE model's whose frequencies are replaced by those and whose attention
scores are scaled by the square of YaRN's attention factor 0.1 ln(s) + 1 (cos and sin both
carry it; --mscale / --mscale-all-dim 1 and 0, Megatron-LM's defaults) (fp32, rel 1e-5).
What megatron-core's YaRN would ignore is refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from flags import one_rank_gpt

from gpt_helpers import gpt_from_flags

VOCAB, L, BATCH = 64, 8, 2
# hidden 32, 4 heads: kv_channels 8.
FLAGS = [*one_rank_gpt(VOCAB, L, BATCH, layers=2), "--disable-bias-linear", "--normalization",
         "RMSNorm", "--swiglu"]  # fmt: skip
YARN = ["--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
        "--yarn-original-max-position-embeddings", "64", "--yarn-beta-fast", "8",
        "--yarn-beta-slow", "0.5"]  # fmt: skip


@pytest.fixture
def world():
    from tst.export.loading import single_process_world

    with single_process_world() as layout:
        yield layout


def yarn_inv_freq(dim, base, factor, original, beta_fast, beta_slow, round_to_int=True):
    """YaRN's inverse frequencies (the paper's 'NTK-by-parts' interpolation)."""
    pairs = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    extrapolated = 1.0 / base**pairs
    interpolated = extrapolated / factor

    def correction_dim(rotations):  # the dimension that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return (interpolated * (1 - keep) + extrapolated * keep).float()


@pytest.mark.parametrize("round_to_int", [True, False])
@pytest.mark.parametrize("bag", [1, 3])
def test_yarn_logits_are_ropes_with_yarns_frequencies(world, bag, round_to_int):
    extra = [] if round_to_int else ["--no-yarn-correction-range-round-to-int"]
    model = gpt_from_flags(world, [*FLAGS, *YARN, *extra], VOCAB).eval()
    rope = gpt_from_flags(world, [*FLAGS, "--position-embedding-type", "rope"], VOCAB).eval()
    rope.load_state_dict(model.state_dict(), strict=False)
    want_freq = yarn_inv_freq(8, 10000, 4.0, 64, 8.0, 0.5, round_to_int)
    assert not torch.allclose(want_freq, rope.rotary_pos_emb.inv_freq)  # YaRN changes them
    rope.rotary_pos_emb.inv_freq = want_freq
    factor = 0.1 * math.log(4.0) + 1.0  # YaRN's attention factor (sqrt(1 / t)) at s = 4
    for layer in rope.decoder.layers:  # q and k both rotated with cos, sin x factor
        layer.self_attention.core_attention.softmax_scale *= factor**2
    model.embedding.bag_size = rope.embedding.bag_size = bag
    tokens = torch.randint(0, VOCAB, (BATCH, L * bag), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(L).expand(BATCH, -1)
    with torch.no_grad():
        got = model(tokens, positions, attention_mask=None)
        want = rope(tokens, positions, attention_mask=None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_yarn_defaults_are_megatron_lms(world):
    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.plan import validate

    cfg = parse_args([*FLAGS, "--position-embedding-type", "yarn"])
    config = transformer_config(cfg, validate(cfg, 1, VOCAB), world)
    assert {k: getattr(config, k) for k in dir(config) if k.startswith("yarn_")} == {
        "yarn_rotary_scaling_factor": 1.0, "yarn_original_max_position_embeddings": 4096,
        "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_mscale": 1.0,
        "yarn_mscale_all_dim": 0.0, "yarn_correction_range_round_to_int": True}  # fmt: skip
    plain = parse_args(FLAGS)
    assert not any(k.startswith("yarn_") for k in dir(transformer_config(
        plain, validate(plain, 1, VOCAB), world)))  # fmt: skip


@pytest.mark.parametrize("extra, message", [
    (["--rotary-interleaved"], "--rotary-interleaved with --position-embedding-type yarn"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5 with --position-embedding-type yarn"),
    (["--rotary-seq-len-interpolation-factor", "2"],
     "--rotary-seq-len-interpolation-factor with --position-embedding-type yarn"),
    (["--yarn-beta-fast", "0"], "--yarn-beta-fast must be a positive number"),
    (["--multi-latent-attention"], "--position-embedding-type yarn with --multi-latent-attention"),
])  # fmt: skip
def test_what_yarn_would_ignore_is_refused(extra, message):
    from tst.config import parse_args
    from tst.errors import ConfigError
    from tst.plan import validate

    with pytest.raises(ConfigError, match=message):
        validate(parse_args([*FLAGS, "--position-embedding-type", "yarn", *extra]), 1, VOCAB)


def test_yarn_flags_without_yarn_warn():
    from tst.config import parse_args

    with pytest.warns(UserWarning, match="--yarn-beta-fast apply to --position-embedding-type "
                                         "yarn only"):  # fmt: skip
        parse_args([*FLAGS, "--position-embedding-type", "rope", "--yarn-beta-fast", "16"])
    with pytest.warns(UserWarning, match="--use-rope-scaling .* changes nothing"):
        parse_args([*FLAGS, "--position-embedding-type", "yarn", "--use-rope-scaling"])
