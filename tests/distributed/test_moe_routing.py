"""MoE routing flags reach megatron-core's router and route as a hand-written reference does.

The router is built from the flags through the trainer's own path (parse_args -> run plan ->
TransformerConfig); fixed logits go through its routing, and the chosen experts and their
weights are compared with a reference written from the routing rules (softmax / sigmoid
scores, pre-softmax, top-k scaling, device-limited groups, expert bias), exactly for the
choice and to 1e-6 for the weights. A small DeepSeek-V3-shaped MoE (a dense first layer,
a shared expert, sigmoid routing with the aux-loss-free expert bias) then trains through the
phase switch: the bias moves by the update rule, is checkpointed, and a resumed run is exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from flags import SMALL_GPT

import pretrain_tst

E, K, T = 8, 2, 12
MOE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "16",
    "--num-attention-heads", "2", "--seq-length", "8", "--micro-batch-size", "2",
    "--train-iters", "4", "--lr", "1e-2", "--num-experts", str(E), "--moe-router-topk", str(K),
    "--moe-ffn-hidden-size", "16", *SMALL_GPT,
]  # fmt: skip


def _routing(flags: list[str], logits: torch.Tensor, bias=None):
    from megatron.core.transformer.moe.router import TopKRouter

    from tst.config import parse_args
    from tst.export.loading import single_process_world
    from tst.megatron_config import transformer_config
    from tst.plan import validate

    cfg = parse_args(MOE + flags)
    with single_process_world() as layout:
        config = transformer_config(cfg, validate(cfg, 1, 512), layout)
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        router = TopKRouter(config, pg_collection=get_default_pg_collection())
        router.eval()  # no aux-loss hooks, no token counting: the routing alone
        if bias is not None:
            router.expert_bias.copy_(bias)
        with torch.no_grad():
            probs, routing_map = router.routing(logits.view(T, 1, E))
    return probs, routing_map


def _reference(logits, *, score="softmax", pre_softmax=False, scale=None, groups=None,
               group_topk=None, bias=None):  # fmt: skip
    """Routing written from the rules, one token at a time."""
    probs = torch.zeros(T, E)
    for t in range(T):
        z = logits[t].double()
        scores = torch.softmax(z, 0) if (score == "softmax" and pre_softmax) else (
            torch.sigmoid(z) if score == "sigmoid" else z)  # fmt: skip
        choose = scores + (bias.double() if bias is not None else 0)
        allowed = list(range(E))
        if groups:
            size = E // groups
            group_score = [sorted(choose[g * size:(g + 1) * size].tolist())[-(K // group_topk):]
                           for g in range(groups)]  # fmt: skip
            best = sorted(range(groups), key=lambda g: -sum(group_score[g]))[:group_topk]
            allowed = [e for e in allowed if e // size in best]
        top = sorted(allowed, key=lambda e: -choose[e].item())[:K]
        if score == "softmax" and not pre_softmax:
            weights = torch.softmax(z[top], 0)
        else:
            weights = scores[top]
            if score == "sigmoid":
                weights = weights / weights.sum()
        if scale:
            weights = weights * scale
        probs[t, top] = weights.float()
    return probs


VARIANTS = {
    "softmax": ([], {}),
    "pre-softmax": (["--moe-router-pre-softmax"], {"pre_softmax": True}),
    "sigmoid-scaled": (["--moe-router-score-function", "sigmoid",
                        "--moe-router-topk-scaling-factor", "2.5"],
                       {"score": "sigmoid", "scale": 2.5}),
    "groups": (["--moe-router-num-groups", "4", "--moe-router-group-topk", "2"],
               {"groups": 4, "group_topk": 2}),
    "sigmoid-bias-groups": (["--moe-router-score-function", "sigmoid",
                             "--moe-router-enable-expert-bias", "--moe-router-num-groups", "4",
                             "--moe-router-group-topk", "2"],
                            {"score": "sigmoid", "groups": 4, "group_topk": 2, "bias": True}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_routing_matches_the_reference(name):
    flags, rules = VARIANTS[name]
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.5 if rules.pop("bias", False) else None
    probs, routing_map = _routing(flags, logits, bias)
    want = _reference(logits, bias=bias, **rules)
    assert torch.equal(routing_map, want > 0), name
    torch.testing.assert_close(probs, want, rtol=1e-6, atol=1e-6)


def _train(argv: list[str], metrics: str) -> dict:
    """Run; return the records and every router's expert bias at the end."""
    from tst.trainer import Trainer

    original, seen = Trainer.train, {}

    def train(self):
        rc = original(self)
        seen["bias"] = {
            name: buf.detach().clone()
            for chunk in self.raw_chunks
            for name, buf in chunk.named_buffers()
            if name.endswith("expert_bias")
        }
        seen["layers"] = [type(layer.mlp).__name__ for layer in self.raw_chunks[0].decoder.layers]
        return rc

    Trainer.train = train
    try:
        assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    finally:
        Trainer.train = original
    with open(metrics) as f:
        seen["records"] = [json.loads(line) for line in f]
    return seen


DEEPSEEK_LIKE = MOE + [
    "--moe-layer-freq", "([0]*1+[1]*1)", "--moe-shared-expert-intermediate-size", "16",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate", "1e-2", "--moe-router-topk-scaling-factor", "2.5",
    "--moe-router-num-groups", "4", "--moe-router-group-topk", "2", "--ffn-hidden-size", "32",
    "--tst-bag-size", "2", "--tst-iters", "2", "--log-interval", "1", "--eval-iters", "0",
    "--untie-embeddings-and-output-weights",
]  # fmt: skip


def test_deepseek_shaped_moe_trains_and_resumes_with_its_expert_bias(tmp_path):
    from torch._dynamo.utils import counters

    captured = counters["stats"]["calls_captured"]
    full = _train(DEEPSEEK_LIKE, str(tmp_path / "full.jsonl"))
    if not torch.cuda.is_available():
        # The router's expert-bias update is a torch.compile'd fusion in megatron-core: on CPU
        # it runs as plain Python (tst.cpu_compat), with no inductor compile in the run.
        from megatron.core.transformer.moe.router import TopKRouter

        assert not hasattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable")
        assert counters["stats"]["calls_captured"] == captured
    assert full["layers"] == ["MLP", "MoELayer"]  # the first layer dense
    (bias,) = full["bias"].values()
    # The update rule moves each bias by +-rate per step (towards under-loaded experts):
    # after 4 steps every entry is a multiple of the rate, and some moved.
    steps = bias / 1e-2
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert bias.abs().max() > 0 and steps.abs().max() <= 4
    ckpt = str(tmp_path / "ckpt")
    _train(DEEPSEEK_LIKE + ["--save", ckpt, "--exit-interval", "2"], str(tmp_path / "a.jsonl"))
    resumed = _train(DEEPSEEK_LIKE + ["--load", ckpt], str(tmp_path / "b.jsonl"))
    torch.testing.assert_close(next(iter(resumed["bias"].values())), bias, rtol=0, atol=0)
    losses = [r["loss"] for r in full["records"] if "loss" in r]
    got = [r["loss"] for r in resumed["records"] if "loss" in r]
    assert got == pytest.approx(losses[2:], rel=1e-6)


def _losses_of(argv: list[str], metrics: str) -> list[float]:
    from trainer_runs import main_records

    return [r["loss"] for r in main_records(argv, metrics) if "loss" in r]


def test_expert_tensor_parallelism_apart_from_tp_agrees(world4, tmp_path):
    """TP 2 + EP 2 with expert-TP 1 (megatron-core's expert grid apart from TP) trains the
    model TP 1 / EP 1 trains, across the switch (rel 2e-4: reductions reorder)."""
    argv = [a for a in DEEPSEEK_LIKE] + ["--global-batch-size", "8", "--seq-length", "8"]
    argv[argv.index("--num-attention-heads") + 1] = "4"
    want = world4.run(_losses_of, argv, str(tmp_path / "ref.jsonl"))[0]
    layout = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
              "--expert-tensor-parallel-size", "1", "--sequence-parallel"]  # fmt: skip
    got = world4.run(_losses_of, argv + layout, str(tmp_path / "etp.jsonl"))[0]
    assert got == pytest.approx(want, rel=2e-4)


def _step_records(argv: list[str], metrics: str) -> list[tuple[float, float, float]]:
    """(loss, grad norm, parameter norm) per step."""
    import torch.distributed as dist

    assert pretrain_tst.main(argv + ["--metrics-file", metrics, "--log-params-norm"]) == 0
    dist.barrier()
    with open(metrics) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    return [(r["loss"], r["grad_norm"], r["params_norm"]) for r in records]


# Megatron-LM's defaults (learned positions, LayerNorm, linear biases) on a small MoE, both
# phases; router losses strong enough that a layout-dependent scale shows at rel 1e-4.
LAYOUT_MOE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "6", "--tst-bag-size", "2", "--tst-iters", "3",
    "--lr", "3e-3", "--log-interval", "1", "--eval-iters", "0", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--num-experts", "4", "--moe-router-topk", "2",
    "--moe-ffn-hidden-size", "16",
]  # fmt: skip
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


def test_expert_replicas_and_router_losses_do_not_depend_on_the_layout(world2, tmp_path):
    """TP 2 + SP trains the model TP 1 trains (loss, gradient norm, parameter norm; rel 1e-6)
    with the router's balancing and z-losses on, across the switch. Three megatron-core
    0.16.1 defects made it differ (tst/megatron_fixes.py):
    - at expert-TP 1 / EP 1 under TP 2 the TP ranks' expert replicas were never
      gradient-reduced (each learned from its half of the sequence; rel 2e-4 at step 1);
    - the experts' row-parallel biases were also summed over the dense TP group, and left out
      of the gradient norm on TP rank 1;
    - under per-token loss normalisation the balancing / z-loss gradients shrank by TP x CP,
      and the sequence-level loss by the micro-batch size.
    """

    def run(name, argv):
        return world2.run(_step_records, LAYOUT_MOE + argv, str(tmp_path / f"{name}.jsonl"))[0]

    def agree(got, want, what):
        assert len(got) == len(want) == 6, what
        for step, (g, w) in enumerate(zip(got, want, strict=True), 1):
            assert g == pytest.approx(w, rel=1e-6), (what, step, g, w)

    aux = ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.1",
           "--moe-z-loss-coeff", "0.01"]  # fmt: skip
    want = run("aux-tp1", aux)
    agree(run("aux-etp1", aux + TP2_SP + ["--expert-tensor-parallel-size", "1"]), want,
          "TP 2 + SP, expert-TP 1, EP 1, with biases")  # fmt: skip
    seq = ["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "0.1",
           "--disable-bias-linear"]  # fmt: skip
    want = run("seq-tp1", seq)
    agree(run("seq-tp2", seq + TP2_SP), want, "sequence-level loss, TP 2 + SP (expert-TP 2)")
    agree(run("seq-mbs1", seq + ["--micro-batch-size", "1"]), want, "sequence-level loss, MBS 1")
