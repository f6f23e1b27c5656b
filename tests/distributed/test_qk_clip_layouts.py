"""--qk-clip and --log-max-attention-logit through pretrain_tst.main in bf16, across the
superposition -> recovery switch, with a threshold the model's logits pass from the first
step on (measured, GQA: 0.056 at step 1 against 0.03; the clipped run's later maxima 0.029-0.041,
the unclipped one's 0.045-0.058).

The distributed optimizer keeps each rank's shard of the fp32 main weights, which megatron-
core 0.16.1's clip would reshape as whole weights (tst.qk_clip): with it the run must equal
the plain mixed-precision optimizer's, whose main weights are whole (losses, logged maxima
and parameter norms, rel 1e-6), for grouped-query and multi-latent attention; the same run
at TP 2 (heads split; megatron-core's clip failed there, tst.megatron_fixes) and PP 2
(layers split; the logged maximum taken over every stage) agrees within rel 2e-4, as the
other layout tests, the logged maxima within two bf16 steps (rel 2^-7: the scores are bf16). A run that logs without clipping shows
the same first maximum, then larger ones at every later step (the clip acted).
"""

from __future__ import annotations

import pytest
from test_torch_fsdp2 import BASE

KEYS = ("loss", "max_attention_logit", "params_norm")
GQA = ["--group-query-attention", "--num-query-groups", "2"]
CLIP = ["--bf16", "--qk-clip", "--qk-clip-alpha", "0.3"]
THRESHOLD = {"gqa": 0.03, "mla": 0.002}  # below each model's first logits
MLA = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
       "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8"]  # fmt: skip


def _run(argv: list[str], metrics: str) -> dict:
    from trainer_runs import main_records

    records = main_records(argv, metrics)
    return {r["iteration"]: tuple(r.get(k) for k in KEYS) for r in records
            if r.get("loss") is not None and "grad_norm" in r}  # fmt: skip


def _assert_same(got: dict, want: dict, rel: float, label: str, logit_rel=None) -> None:
    """Losses and norms within ``rel``; the logged maxima within ``logit_rel`` (default
    ``rel``): the scores are bf16, one step of which is 2^-8 relative."""
    assert sorted(got) == sorted(want) == [1, 2, 3, 4], label
    for step, values in want.items():
        assert None not in values, (label, step, values)
        loss, logit, norm = got[step]
        assert (loss, norm) == pytest.approx((values[0], values[2]), rel=rel), (label, step)
        assert logit == pytest.approx(values[1], rel=logit_rel or rel), (label, step)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_qk_clip_with_the_distributed_optimizer_equals_the_plain_one(world2, tmp_path, attention):
    threshold = THRESHOLD[attention]
    argv = BASE + (GQA if attention == "gqa" else MLA) + CLIP + [
        "--qk-clip-threshold", str(threshold)]  # fmt: skip
    want = world2.run(_run, argv, str(tmp_path / "plain.jsonl"))[0]
    got = world2.run(_run, argv + ["--use-distributed-optimizer"], str(tmp_path / "d.jsonl"))[0]
    _assert_same(got, want, 1e-6, f"{attention}: distributed optimizer")
    assert want[1][1] > threshold  # the first step's logits pass the threshold: it clips
    if attention == "mla":
        return
    logged = world2.run(_run, [a for a in argv if a != "--qk-clip"] + [
        "--log-max-attention-logit"], str(tmp_path / "log.jsonl"))[0]  # fmt: skip
    assert logged[1][:2] == pytest.approx(want[1][:2], rel=1e-6)  # before any clip
    assert logged[1][2] != pytest.approx(want[1][2], rel=1e-4)  # the first clip scaled weights
    assert all(logged[step][1] > want[step][1] for step in (2, 3, 4))  # and lowered logits
    for name, extra in (("TP2", ["--tensor-model-parallel-size", "2"]),
                        ("PP2", ["--pipeline-model-parallel-size", "2"])):  # fmt: skip
        got = world2.run(_run, argv + extra, str(tmp_path / f"{name}.jsonl"))[0]
        got = got or world2.run(_run, argv + extra, str(tmp_path / f"{name}.jsonl"))[1]
        _assert_same(got, want, 2e-4, name, logit_rel=2**-7)
