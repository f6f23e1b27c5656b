"""The paper's controls at the phase switch do what their flags say, and nothing else.

One process, mock data, a tiny untied GPT trained for two superposition and two recovery
steps. A spy around ``Trainer.apply_switch_controls`` records the weights and the Adam
state just before and just after the call, and the iteration it was called at.
"""

from __future__ import annotations

import pytest
import torch
from flags import SMALL_GPT

import pretrain_tst
from tst.config import parse_args
from tst.plan import validate

SWITCH = 2
BASE = [
    "--mock-data", "--vocab-size", "384", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--swiglu", "--seq-length", "8",
    "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "4",
    "--tst-bag-size", "3", "--tst-iters", str(SWITCH), "--lr", "1e-2",
    "--untie-embeddings-and-output-weights", "--log-interval", "1",
    "--eval-interval", "100", "--eval-iters", "1", "--peak-tflops", "1", *SMALL_GPT,
]  # fmt: skip
HEADS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.raw_chunks[0].named_parameters()}


def _adam_state(trainer) -> list[dict]:
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        for opt in inner
        for state in opt.optimizer.state.values()
    ]


def _train(*flags: str) -> dict:
    """Train BASE + flags in this process; returns what the spy saw and the initial weights."""
    from tst.platform import initialize, shutdown
    from tst.trainer import Trainer

    cfg = parse_args(BASE + list(flags))
    tokenizer = pretrain_tst.build_tokenizer(cfg)
    vocab = cfg.data.vocab_size
    layout = initialize(seed=cfg.training.seed)
    try:
        plan = validate(cfg, layout.world_size, vocab)
        datasets = pretrain_tst.build_datasets(cfg, plan, tokenizer, vocab)
        trainer = Trainer(cfg, layout, plan, tokenizer, datasets)
        seen = {"initial": _weights(trainer), "calls": []}
        apply = trainer.apply_switch_controls

        def spy():
            seen["calls"].append(trainer.iteration)
            seen["before"], seen["adam_before"] = _weights(trainer), _adam_state(trainer)
            apply()
            seen["after"], seen["adam_after"] = _weights(trainer), _adam_state(trainer)

        trainer.apply_switch_controls = spy
        assert trainer.train() == 0
        seen["final"] = _weights(trainer)
        return seen
    finally:
        shutdown(layout)


def _same(a: dict, b: dict, names) -> bool:
    return all(torch.equal(a[n], b[n]) for n in names)


def _adam_is_fresh(states: list[dict]) -> bool:
    moments = [s[k] for s in states for k in ("exp_avg", "exp_avg_sq") if k in s]
    steps = [int(s["step"]) for s in states if "step" in s]
    return bool(moments) and all(not m.any() for m in moments) and steps and set(steps) == {0}


def _adam_equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
        for x, y in zip(a, b, strict=True)
        for k in x
    )


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    return {
        "plain": _train(),
        "reinit": _train("--tst-reinit-embeddings-at-switch"),
        "reset": _train("--tst-reset-optimizer-at-switch"),
    }


def test_controls_run_once_at_the_switch(runs):
    for name, seen in runs.items():
        assert seen["calls"] == [SWITCH], name
        # Training went on after the switch: every weight moved again.
        assert not _same(seen["after"], seen["final"], HEADS), name


def test_no_flag_changes_nothing(runs):
    seen = runs["plain"]
    assert _same(seen["before"], seen["after"], seen["before"])
    assert _adam_equal(seen["adam_before"], seen["adam_after"])


def test_reinit_restores_the_initial_draw_of_embedding_and_output_only(runs):
    seen = runs["reinit"]
    others = [n for n in seen["before"] if n not in HEADS]
    for name in HEADS:
        assert not torch.equal(seen["before"][name], seen["initial"][name]), name  # it learned
        assert torch.equal(seen["after"][name], seen["initial"][name]), name  # fresh init
    assert _same(seen["before"], seen["after"], others)
    assert _adam_equal(seen["adam_before"], seen["adam_after"])


def test_reset_zeroes_adam_state_only(runs):
    seen = runs["reset"]
    assert not _adam_is_fresh(seen["adam_before"])  # two superposition steps were taken
    assert _adam_is_fresh(seen["adam_after"])
    assert _same(seen["before"], seen["after"], seen["before"])


def test_controls_need_a_switch():
    for flag in ("--tst-reinit-embeddings-at-switch", "--tst-reset-optimizer-at-switch"):
        with pytest.raises(ValueError, match="need --tst-bag-size > 1"):
            parse_args(BASE + ["--tst-bag-size", "1", flag])  # the last value wins
