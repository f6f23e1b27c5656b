"""--log-max-attention-logit and --qk-clip on the local spec: the largest logit each head
records is the largest of q.k / sqrt(d) over unmasked (causal, or sliding-window) positions,
computed here from the layer's own queries and keys (fp32, rel 1e-5); evaluation forwards
record nothing; the clip scales each query group's query rows by eta^alpha and key rows by
eta^(1-alpha) (eta = threshold / the group's largest logit, capped at 1) and leaves the
value rows, as written out here from megatron-core's QKV layout; the flags' rules."""

from __future__ import annotations

import pytest
import torch
from flags import one_rank_gpt

from gpt_helpers import gpt_from_flags

VOCAB, L, BATCH = 64, 8, 2
FLAGS = [*one_rank_gpt(VOCAB, L, BATCH, layers=2), "--disable-bias-linear",
         "--group-query-attention", "--num-query-groups", "2", "--log-max-attention-logit"]  # fmt: skip


@pytest.fixture
def world():
    from tst.export.loading import single_process_world

    with single_process_world() as layout:
        yield layout


def _queries_and_keys(model, tokens):
    """Each layer's core-attention query and key ([s, b, heads, d], [s, b, groups, d])."""
    seen = {}

    def keep(index):
        def hook(module, args, kwargs):
            seen[index] = (args[0].detach().float(), args[1].detach().float())

        return hook

    handles = [layer.self_attention.core_attention.register_forward_pre_hook(
        keep(i), with_kwargs=True) for i, layer in enumerate(model.decoder.layers)]  # fmt: skip
    positions = torch.arange(tokens.size(1)).expand(tokens.size(0), -1)
    model(tokens, positions, attention_mask=None)
    for handle in handles:
        handle.remove()
    return [seen[i] for i in range(len(model.decoder.layers))]


def _largest_logits(query, key, window: int | None = None) -> torch.Tensor:
    """Per head: max over batch, query and key positions of q.k / sqrt(d), causal (and at
    most ``window`` positions back)."""
    s, _, heads, d = query.shape
    key = key.repeat_interleave(heads // key.size(2), dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", query, key) / d**0.5
    i, j = torch.arange(s).view(-1, 1), torch.arange(s).view(1, -1)
    masked = j > i
    if window is not None:
        masked |= j < i - window
    return scores.masked_fill(masked, float("-inf")).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("extra, window", [([], None), (["--window-size", "2,0"], 2)])
def test_recorded_logits_are_the_largest_unmasked_scaled_scores(world, extra, window):
    from tst.qk_clip import record_max_logits

    model = gpt_from_flags(world, [*FLAGS, *extra], VOCAB).train()
    assert record_max_logits([model]) == 2
    tokens = torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(3))
    first = _queries_and_keys(model, tokens)
    for layer, (query, key) in zip(model.decoder.layers, first, strict=True):
        got = layer.self_attention.core_attention.current_max_attn_logits
        torch.testing.assert_close(got, _largest_logits(query, key, window), rtol=1e-5, atol=1e-6)
    # A second forward keeps the larger of the two per head.
    other = torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(4))
    second = _queries_and_keys(model, other)
    both = [_largest_logits(q1, k1, window).maximum(_largest_logits(q2, k2, window))
            for (q1, k1), (q2, k2) in zip(first, second, strict=True)]  # fmt: skip
    for layer, want in zip(model.decoder.layers, both, strict=True):
        got = layer.self_attention.core_attention.current_max_attn_logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Evaluation forwards record nothing.
    model.eval()
    for layer in model.decoder.layers:
        layer.self_attention.core_attention.current_max_attn_logits = None
    _queries_and_keys(model, other)
    assert all(layer.self_attention.core_attention.current_max_attn_logits is None
               for layer in model.decoder.layers)  # fmt: skip


def test_clip_scales_query_and_key_rows_of_the_groups_above_the_threshold(world):
    """megatron-core's clip of the layer, given the recorded maxima: group 0 (heads 0, 1)
    peaks at 8 > threshold 2 (eta 1/4), group 1 at 1.5 (untouched); alpha 0.3."""
    model = gpt_from_flags(world, [*FLAGS, "--qk-clip", "--qk-clip-threshold", "2",
                                   "--qk-clip-alpha", "0.3"], VOCAB)  # fmt: skip
    attention = model.decoder.layers[0].self_attention
    attention.core_attention.current_max_attn_logits = torch.tensor([8.0, 3.0, 1.5, 0.5])
    before = attention.linear_qkv.weight.detach().clone()
    with torch.no_grad():
        attention.clip_qk()
    after = attention.linear_qkv.weight.detach()
    # Megatron's QKV rows, per query group: its 2 query heads, then its key head, then its
    # value head (8 rows each, head size 32 / 4).
    want = before.clone().view(2, 4, 8, -1)
    eta = 2.0 / 8.0
    want[0, :2] *= eta**0.3
    want[0, 2] *= eta**0.7
    torch.testing.assert_close(after, want.view_as(before), rtol=1e-6, atol=0)
    assert attention.core_attention.current_max_attn_logits is None  # recorded afresh


def test_fused_attention_gives_way_to_the_unfused_one():
    from tst.attention import use_sdpa
    from tst.config import parse_args

    plain = parse_args([*FLAGS[:-1], "--attention-backend", "flash"]).model
    assert use_sdpa("flash", False, True, plain)
    clipped = parse_args([*FLAGS, "--attention-backend", "flash"]).model
    with pytest.warns(UserWarning, match="no attention scores to take --qk-clip's"):
        assert not use_sdpa("flash", False, True, clipped)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--qk-clip", "--qk-clip-alpha", "1"], "--qk-clip-alpha must be between 0.0 and 1.0"),
        (["--qk-clip", "--qk-clip-threshold", "0"], "--qk-clip-threshold must be greater than 0"),
        (["--qk-clip", "--attention-output-gate"], "--qk-clip with --attention-output-gate"),
        (["--qk-clip", "--use-distributed-optimizer", "--overlap-param-gather"],
         "--qk-clip with --overlap-param-gather"),
        (["--qk-clip", "--use-distributed-optimizer", "--use-precision-aware-optimizer",
          "--optimizer-cpu-offload"], "--qk-clip with --use-precision-aware-optimizer"),
    ],
)  # fmt: skip
def test_qk_clip_rules(extra, message):
    from tst.config import parse_args
    from tst.plan import validate

    with pytest.raises(ValueError, match=message):
        validate(parse_args([*FLAGS, *extra]), 1, VOCAB)


def test_the_dry_run_names_the_clip(capsys):
    import pretrain_tst

    assert pretrain_tst.main([*FLAGS, "--qk-clip", "--qk-clip-threshold", "30", "--dry-run"]) == 0
    assert "QK-clip at 30 (alpha 0.5; largest logit logged)" in capsys.readouterr().out
    assert pretrain_tst.main([*FLAGS, "--qk-clip", "--dry-run"]) == 0  # Megatron-LM's defaults
    assert "QK-clip at 100 (alpha 0.5; largest logit logged)" in capsys.readouterr().out


def test_qk_clip_warnings():
    from tst.config import parse_args
    from tst.plan import validate

    with pytest.warns(UserWarning, match="--qk-clip-alpha / --qk-clip-threshold: no effect"):
        parse_args([*FLAGS, "--qk-clip-threshold", "5"])
    with pytest.warns(UserWarning, match="the norms after the QKV projection undo the clip"):
        validate(parse_args([*FLAGS, "--qk-clip", "--qk-layernorm"]), 1, VOCAB)


def test_a_clipped_run_resumes_exactly(tmp_path):
    """The clip keeps no state between steps (each step's maxima start afresh), so a run
    stopped inside the superposition phase and resumed repeats the unbroken run's losses
    and logged maxima exactly, across the switch (one rank, fp32)."""
    import json
    import os
    import sys

    import pretrain_tst

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import fault_injection

    argv = [*fault_injection.ARGS, "--train-iters", "8", "--qk-clip", "--qk-clip-threshold",
            "0.02"]  # fmt: skip

    def records(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        return {r["iteration"]: (r["loss"], r["max_attention_logit"]) for r in rows
                if r.get("loss") is not None and "max_attention_logit" in r}  # fmt: skip

    want = tmp_path / "want.jsonl"
    assert pretrain_tst.main([*argv, "--metrics-file", str(want)]) == 0
    got, ckpt = tmp_path / "got.jsonl", str(tmp_path / "ckpt")
    run = [*argv, "--save", ckpt, "--load", ckpt, "--metrics-file", str(got)]
    assert pretrain_tst.main([*run, "--exit-interval", "3"]) == 0
    assert pretrain_tst.main(run) == 0
    assert records(got) == records(want) and len(records(want)) == 8
    assert max(logit for _, logit in records(want).values()) > 0.02  # it clipped
