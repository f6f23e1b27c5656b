"""--fim-data under parallel layouts: a unit's rearranged form depends on its place in the
data only, so data parallelism (each rank reading its rows), tensor parallelism (every rank
reading all rows) and pipeline parallelism train the same model through the switch.

Reference: the same run on one layout; tolerance 2e-4 relative (fp32 reductions in another
order), as the layout tests without FIM (no dropout: its masks follow the layout's RNG).
"""

from __future__ import annotations

import pytest
from data_support import make_fim_corpus
from flags import SMALL_GPT
from test_trainer import _assert_close, _losses, _train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return make_fim_corpus(str(tmp_path_factory.mktemp("fim")))


def _args(data, cache: str) -> list[str]:
    return [
        "--data-path", data["prefix"], "--split", "90,10,0", "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", data["tokenizer"], "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
        "--tst-bag-size", "3", "--tst-iters", "3", "--lr", "3e-3", "--log-interval", "1",
        "--eval-interval", "3", "--eval-iters", "1", "--data-cache-path", cache,
        *SMALL_GPT, "--fim-data", "--fim-rate", "0.9",
    ]  # fmt: skip


def test_fim_runs_agree_across_layouts(world2, data, tmp_path):
    argv = _args(data, str(tmp_path / "cache"))
    want = world2.run(_train, argv, str(tmp_path / "dp2.jsonl"))[0]  # DP 2
    for name, extra in (("TP2", ["--tensor-model-parallel-size", "2"]),
                        ("PP2", ["--pipeline-model-parallel-size", "2"])):  # fmt: skip
        got = world2.run(_train, argv + extra, str(tmp_path / f"{name}.jsonl"))[0]
        _assert_close(_losses(got), _losses(want), 2e-4, name)
    assert len(_losses(want)) == 6
