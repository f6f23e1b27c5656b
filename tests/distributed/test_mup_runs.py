"""muP through pretrain_tst.py on 2 gloo ranks (Megatron-LM 0.19's --use-mup).

Each parameter's optimizer group has the learning rate and Adam epsilon muP's rules give
it, classified here by name and shape (embeddings and the output layer, 1-D weights, hidden
matrices): Adam, Adam with the distributed optimizer, SGD, --decoupled-lr, and FSDP2 (whose
wrapper keeps the parameters' marks). A muP run
(width multiplier 2, embedding multiplier 2, an MTP depth) trains the same losses across
the switch at DP 2, TP 2 and PP 2 (rel 1e-5), differs from the plain run, and resumes
exactly (rel 1e-6), also with --use-checkpoint-args and no muP flag on the command line.
"""

from __future__ import annotations

import pytest
from flags import SWITCH_RUN

BASE = SWITCH_RUN
MUP = ["--use-mup", "--mup-base-hidden-size", "16", "--mup-embedding-mult", "2"]
CONSTANT = ["--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--train-iters", "2",
            "--tst-iters", "1"]  # fmt: skip


def _groups(argv: list[str], metrics: str) -> dict:
    """pretrain_tst.main; once trained: each model parameter's (lr, eps) by name, where the
    optimizer holds the parameters themselves, with its dimensions, and the set of (lr, eps)
    over the groups."""
    from trainer_runs import after_training, main_records

    seen = {}

    def look(trainer):
        groups = trainer.optimizer.param_groups
        seen["rates"] = {(g["lr"], g.get("eps")) for g in groups if g["params"]}
        seen["line"] = trainer._mup_line()  # printed at the start of the run
        where = {id(p): (g["lr"], g.get("eps")) for g in groups for p in g["params"]}
        seen["by_name"] = {name: (*where.get(id(p), (None, None)), p.dim())
                           for chunk in trainer.raw_chunks
                           for name, p in chunk.named_parameters()}  # fmt: skip

    with after_training(look):
        main_records(argv, metrics)
    return seen


def test_the_other_mup_flags_reach_the_run(world2, tmp_path):
    """--mup-output-mult, --mup-base-head-dim, --mup-attn-scale-power and --mup-width-mult
    given (their defaults: the test above) through pretrain_tst.main: the logits multiplier
    as given, the softmax scale sqrt(4) / 8 ** 0.5, the width multiplier as computed."""
    given = ["--mup-output-mult", "0.7", "--mup-base-head-dim", "4", "--mup-attn-scale-power",
             "0.5", "--mup-width-mult", "2"]  # fmt: skip
    run = world2.run(_groups, BASE + CONSTANT + MUP + given, str(tmp_path / "m.jsonl"))[0]
    assert run["line"] == ("muP: width multiplier 2 (--hidden-size 32 / base 16); hidden "
                           "matrices at lr x 0.5, eps x 0.5; hidden init std / 1.414; logits "
                           "x 0.7, embeddings x 2, softmax scale 0.7071")  # fmt: skip


def _want(name: str, dim: int, hidden: tuple, embedding: tuple, vector: tuple) -> tuple:
    if "embedding" in name or "output_layer" in name:
        return embedding
    return vector if dim <= 1 else hidden


@pytest.mark.parametrize("case", ["adam", "adam-distributed", "sgd", "adam-decoupled",
                                  "adam-fsdp2", "adam-offload"])  # fmt: skip
def test_each_parameter_group_has_mups_rate_and_eps(world2, tmp_path, case):
    extra = {"adam": [], "adam-distributed": ["--use-distributed-optimizer"],
             "sgd": ["--optimizer", "sgd"], "adam-decoupled": ["--decoupled-lr", "1e-2"],
             "adam-fsdp2": ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"],
             "adam-offload": ["--use-distributed-optimizer", "--optimizer-cpu-offload",
                              "--use-precision-aware-optimizer"]}[case]  # fmt: skip
    run = world2.run(_groups, BASE + CONSTANT + MUP + extra, str(tmp_path / "m.jsonl"))[0]
    base, half = (3e-3, 1e-8), (1.5e-3, 0.5e-8)  # lr, eps; hidden: / width multiplier 2
    if case == "sgd":
        # SGD: vector-like parameters (embeddings, output layer, 1-D) at lr x 2; eps unused.
        hidden, embedding, vector = (3e-3, None), (6e-3, None), (6e-3, None)
    elif case == "adam-decoupled":
        hidden, embedding, vector = half, (1e-2, 1e-8), base
    else:
        hidden, embedding, vector = half, base, base
    if case in ("adam-distributed", "adam-offload"):  # groups hold shards: the rates only
        assert run["rates"] == {hidden, vector}
        return
    by_name = run["by_name"]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in by_name
    for name, got in by_name.items():
        want = _want(name, got[2], hidden, embedding, vector)
        assert got[0] == pytest.approx(want[0], rel=1e-12), name
        assert (got[1] is None) == (want[1] is None), name
        if want[1] is not None:
            assert got[1] == pytest.approx(want[1], rel=1e-12), name
    assert run["rates"] == {hidden, embedding, vector}
    rates = ("vector-like parameters at lr x 2" if case == "sgd"
             else "hidden matrices at lr x 0.5, eps x 0.5")  # fmt: skip
    assert run["line"] == (f"muP: width multiplier 2 (--hidden-size 32 / base 16); {rates}; "
                           "hidden init std / 1.414; logits x 0.5, embeddings x 2, softmax "
                           "scale 0.125")  # fmt: skip


def _losses(argv: list[str], metrics: str) -> list[tuple[int, float]]:
    from trainer_runs import main_records

    return [(r["iteration"], r["loss"]) for r in main_records(argv, metrics)
            if r.get("loss") is not None]  # fmt: skip


def _close(got, want, rel, label):
    assert [i for i, _ in got] == [i for i, _ in want], label
    for (i, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=rel), f"{label}, step {i}: {got} vs {want}"


def test_mup_layouts_agree_across_the_switch_and_resume_exactly(world2, tmp_path):
    argv = BASE + MUP + ["--mtp-num-layers", "1"]
    want = world2.run(_losses, argv, str(tmp_path / "dp2.jsonl"))[0]
    assert [i for i, _ in want] == [1, 2, 3, 4, 5, 6]
    for name, layout in (("tp2", ["--tensor-model-parallel-size", "2"]),
                         ("pp2", ["--pipeline-model-parallel-size", "2"])):  # fmt: skip
        got = world2.run(_losses, argv + layout, str(tmp_path / f"{name}.jsonl"))[0]
        _close(got, want, 1e-5, name)
    plain = world2.run(_losses, BASE + ["--mtp-num-layers", "1"], str(tmp_path / "plain.jsonl"))[0]
    assert all(abs(a - b) > 1e-3 for (_, a), (_, b) in zip(plain, want, strict=True))
    # Stopped at 2 (inside the superposition phase) and resumed at TP 2.
    tp2 = argv + ["--tensor-model-parallel-size", "2"]
    ckpt = str(tmp_path / "ckpt")
    first = world2.run(_losses, tp2 + ["--save", ckpt, "--exit-interval", "2"],
                       str(tmp_path / "a.jsonl"))[0]  # fmt: skip
    second = world2.run(_losses, tp2 + ["--load", ckpt], str(tmp_path / "b.jsonl"))[0]
    _close(first + second, want, 1e-5, "resumed")
    # --use-checkpoint-args takes muP from the checkpoint: no muP flag given, same run.
    no_mup = BASE + ["--mtp-num-layers", "1", "--tensor-model-parallel-size", "2"]
    again = world2.run(_losses, no_mup + ["--load", ckpt, "--use-checkpoint-args"],
                       str(tmp_path / "c.jsonl"))[0]  # fmt: skip
    _close(again, second, 1e-6, "--use-checkpoint-args")
