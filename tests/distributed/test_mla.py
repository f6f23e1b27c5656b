"""Multi-latent attention (MLA) through the flags, megatron-core's layer spec and the trainer.

- One MLA layer's attention equals a plain single-process reference written from the
  DeepSeek-V2 formulation (low-rank query and key/value latents, RoPE on a separate part of
  each head, value heads of their own width) on the module's own weights (fp32, 1e-5).
- A tiny MLA GPT trains through the TST switch with pretrain_tst.py and resumes exactly
  (rel 1e-6: the same ops replayed); TP 2 with sequence parallelism trains the model TP 1
  trains across the switch (rel 2e-4: reductions reorder), vocabulary 512.
- The dry run's closed-form count includes MLA's shapes (equal to the meta-device build).
- Bad combinations are refused in one line naming the flag.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from flags import SMALL_GPT

import pretrain_tst

MLA = ["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16",
       "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "12",
       "--qk-layernorm"]  # fmt: skip
BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "64",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "4", "--tst-bag-size", "3", "--tst-iters", "2",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "0",
    "--rotary-scaling-factor", "4", "--mscale-all-dim", "1.0", *SMALL_GPT,
]  # fmt: skip
TINY = BASE + MLA


# ------------------------------------------------------------------ attention vs a reference


def _rope_pairs(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as DeepSeek writes it: dimension pairs (2i, 2i+1) rotated by position x theta_i,
    returned as [rotated first members..., rotated second members...] (megatron-core's MLA
    order). x: [s, ..., d]."""
    s, d = x.shape[0], x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    angle = torch.arange(s, dtype=torch.float64)[:, None] * theta[None, :]  # [s, d/2]
    shape = (s,) + (1,) * (x.dim() - 2) + (d // 2,)
    cos, sin = angle.cos().view(shape).to(x.dtype), angle.sin().view(shape).to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, even * sin + odd * cos], dim=-1)


def _reference_mla(attn, x: torch.Tensor, cfg) -> torch.Tensor:
    """Plain MLA forward on ``attn``'s weights. x: [s, b, h] -> [s, b, h]."""
    a = cfg.mla
    s, b, _ = x.shape
    heads = cfg.model.num_attention_heads

    def rms(t, norm):
        return torch.nn.functional.rms_norm(t, t.shape[-1:], norm.weight, norm.eps)

    q_latent = rms(x @ attn.linear_q_down_proj.weight.T, attn.q_layernorm)
    q = (q_latent @ attn.linear_q_up_proj.weight.T).view(s, b, heads, -1)
    kv_down = x @ attn.linear_kv_down_proj.weight.T
    kv_latent, k_rope = kv_down.split([a.kv_lora_rank, a.qk_pos_emb_head_dim], dim=-1)
    kv = (rms(kv_latent, attn.kv_layernorm) @ attn.linear_kv_up_proj.weight.T).view(s, b, heads, -1)
    q_nope, q_rope = q.split([a.qk_head_dim, a.qk_pos_emb_head_dim], dim=-1)
    k_nope, v = kv.split([a.qk_head_dim, a.v_head_dim], dim=-1)
    base = cfg.model.rotary_base
    query = torch.cat([q_nope, _rope_pairs(q_rope, base)], dim=-1)  # [s, b, n, qk + pos]
    k_rope = _rope_pairs(k_rope[:, :, None, :], base).expand(-1, -1, heads, -1)
    key = torch.cat([k_nope, k_rope], dim=-1)
    # DeepSeek's YaRN attention temperature: the softmax scale grows by mscale^2, where
    # mscale = 0.1 x mscale_all_dim x ln(scaling factor) + 1 (for a factor above 1).
    mscale = 0.1 * a.mscale_all_dim * math.log(a.rotary_scaling_factor) + 1
    scale = mscale**2 / math.sqrt(query.shape[-1])
    scores = torch.einsum("sbnd,tbnd->bnst", query, key) * scale
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    context = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, heads * a.v_head_dim)
    return context @ attn.linear_proj.weight.T


def test_mla_attention_matches_a_plain_reference():
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from tst.config import parse_args
    from tst.export.loading import single_process_world
    from tst.megatron_config import transformer_config
    from tst.model import LatentDotProductAttention, ModelShape, build_gpt
    from tst.plan import validate

    cfg = parse_args(TINY + ["--rope-type", "rope"])
    with single_process_world() as layout:
        plan = validate(cfg, 1, 512)
        config = transformer_config(cfg, plan, layout)
        model = build_gpt(config, ModelShape.from_config(cfg.model, 512, False))
        attn = model.decoder.layers[0].self_attention
        assert isinstance(attn, MLASelfAttention)
        assert isinstance(attn.core_attention, LatentDotProductAttention)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():  # norm weights away from 1 so that the latent norms matter
            attn.q_layernorm.weight.copy_(1 + 0.5 * torch.randn(32, generator=gen))
            attn.kv_layernorm.weight.copy_(1 + 0.5 * torch.randn(16, generator=gen))
        x = torch.randn(8, 2, 64, generator=gen)
        mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).triu(1)
        got, _ = attn(x, mask)
        want = _reference_mla(attn, x, cfg)
    assert got.shape == (8, 2, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- training, resume, layouts


def _train(argv: list[str], metrics: str) -> dict:
    """Run pretrain_tst.main; return the records and the attention class of layer 0."""
    import torch.distributed as dist

    from tst.trainer import Trainer

    original, seen = Trainer.train, {}

    def train(self):
        attn = self.raw_chunks[0].decoder.layers[0].self_attention
        seen["attention"] = type(attn).__name__
        rc = original(self)
        # The latent norms' weights after training (replicated over TP: each rank's copy).
        seen["latent_norms"] = torch.cat([attn.q_layernorm.weight, attn.kv_layernorm.weight])
        seen["latent_norms"] = seen["latent_norms"].detach().clone()
        return rc

    Trainer.train = train
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        Trainer.train = original
    if dist.is_initialized():
        dist.barrier()
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    seen["losses"] = [r["loss"] for r in records if "loss" in r]
    seen["phases"] = [r["phase"] for r in records if "loss" in r]
    return seen


def test_tiny_mla_gpt_trains_through_the_switch_and_resumes_exactly(tmp_path):
    full = _train(TINY, str(tmp_path / "full.jsonl"))
    assert full["attention"] == "MLASelfAttention"
    assert full["phases"] == ["superposition"] * 2 + ["recovery"] * 2
    assert all(math.isfinite(x) for x in full["losses"])
    # The first multi-hot loss of an untrained model is near log(vocabulary).
    assert full["losses"][0] == pytest.approx(math.log(512), rel=0.05)
    ckpt = str(tmp_path / "ckpt")
    _train(TINY + ["--save", ckpt, "--exit-interval", "2"], str(tmp_path / "a.jsonl"))
    resumed = _train(TINY + ["--load", ckpt], str(tmp_path / "b.jsonl"))
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-6)


def _losses_and_norms(argv: list[str], metrics: str) -> tuple[list[float], torch.Tensor]:
    seen = _train(argv, metrics)
    return seen["losses"], seen["latent_norms"]


def test_mla_tp2_with_sequence_parallelism_matches_tp1(world2, tmp_path):
    """TP 2 splits the heads, the query / key-value down projections (gathered) and the
    latent norms' positions (sequence parallel): the losses equal TP 1's across the switch,
    and every rank's latent-norm weights end equal to TP 1's (their partial gradients are
    summed over TP; without that sum the losses still agree to 2e-4, the weights do not).
    Plain SGD here, so that a weight's change is its gradient (Adam's first steps move every
    weight by about the LR whatever its gradient, and amplify rounding in tiny ones)."""
    argv = TINY + ["--global-batch-size", "4", "--optimizer", "sgd", "--lr", "0.5"]
    (want, want_norms), _ = world2.run(_losses_and_norms, argv, str(tmp_path / "tp1.jsonl"))
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    results = world2.run(_losses_and_norms, argv + tp2, str(tmp_path / "tp2.jsonl"))
    got = results[0][0]
    assert len(got) == 4
    assert got == pytest.approx(want, rel=2e-4)
    assert (want_norms - 1).abs().max() > 1e-4  # they trained
    # atol: the weights are fp32 near 1 (an ulp is 1.2e-7) after 4 SGD steps of LR 0.5 on
    # gradients summed in another order; a missing TP sum moves them by ~1e-4.
    for _, norms in results:
        torch.testing.assert_close(norms - 1, want_norms - 1, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------- dry run and refusals


@pytest.mark.parametrize(
    "extra",
    [[], ["--q-lora-rank", "0"], ["--normalization", "LayerNorm", "<biases>"]],
    ids=["q-lora", "no-q-lora", "layernorm-biases"],
)
def test_dry_run_counts_mla_as_built(extra, capsys):
    argv = list(TINY)
    if "<biases>" in extra:
        argv.remove("--disable-bias-linear")
    if extra[:2] == ["--q-lora-rank", "0"]:  # no --q-lora-rank: a full query projection
        i = argv.index("--q-lora-rank")
        del argv[i : i + 2]
        extra = []
    argv += [a for a in extra if a != "<biases>"]
    assert pretrain_tst.main(argv + ["--dry-run"]) == 0
    assert "(agrees)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--group-query-attention", "--num-query-groups", "2"],
         "--group-query-attention and --multi-latent-attention exclude each other"),
        (["--tensor-model-parallel-size", "3", "--num-attention-heads", "3",
          "--hidden-size", "48"],
         r"--q-lora-rank = 32 is not divisible by --tensor-model-parallel-size 3"),
        (["--cache-mla-latents"], "--cache-mla-latents: MLA latent caching is for inference"),
    ],
    ids=["gqa", "tp-split", "cache-latents"],
)  # fmt: skip
def test_refused_mla_combinations(extra, message):
    with pytest.raises(ValueError, match=message):
        pretrain_tst.main(TINY + extra + ["--dry-run", "--dry-run-world-size", "3"])


def test_yarn_rope_needs_mla():
    argv = BASE + ["--rope-type", "yarn"]
    with pytest.raises(ValueError, match="--rope-type yarn needs --multi-latent-attention"):
        pretrain_tst.main(argv + ["--dry-run"])


def test_mla_checkpoint_resumes_under_another_tensor_parallel_size(world2, tmp_path):
    """A TP 1 checkpoint of an MLA model (down projections, latent norms, sharded up
    projections) loads at TP 2 + SP and continues as the unbroken TP 1 run (rel 2e-4)."""
    argv = TINY + ["--global-batch-size", "4"]
    full, _ = world2.run(_losses_and_norms, argv, str(tmp_path / "full.jsonl"))
    ckpt = str(tmp_path / "ckpt")
    world2.run(_losses_and_norms, argv + ["--save", ckpt, "--exit-interval", "2"],
               str(tmp_path / "a.jsonl"))  # fmt: skip
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--load", ckpt]
    (resumed, _), _ = world2.run(_losses_and_norms, argv + tp2, str(tmp_path / "b.jsonl"))
    assert resumed == pytest.approx(full[0][2:], rel=2e-4)
