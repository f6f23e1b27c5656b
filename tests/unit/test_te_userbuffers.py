"""--tp-comm-overlap sets up Transformer Engine's userbuffers as Megatron-LM does.

TE needs a GPU and is not installed here, so its ``initialize_ub`` is stood in for by a
recorder with the signatures of TE 2.7+ (quantization modes) and TE 1.9-2.6 (``use_fp8``):
the test checks what the trainer asks TE for (buffer shape for both phases, TP size,
precision, the YAML settings, the bootstrap backend), and the refusals.
"""

from __future__ import annotations

import enum
import sys
import types

import pytest
from flags import SMALL_GPT

from tst.config import parse_args
from tst.plan import validate
from tst.te_userbuffers import destroy, initialize

BASE = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "64",
    "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "3",
    "--train-iters", "4", "--lr", "1e-3", "--tensor-model-parallel-size", "2",
    "--sequence-parallel", "--tp-comm-overlap", *SMALL_GPT,
]  # fmt: skip


class Mode(enum.Enum):
    NONE = 0
    FP8 = 1


def _install_te(monkeypatch, new_api: bool) -> list:
    calls = []
    base = types.ModuleType("transformer_engine.pytorch.module.base")
    if new_api:

        def initialize_ub(shape, tp_size, quantization_modes=None, ub_cfgs=None,
                          bootstrap_backend=None):  # fmt: skip
            calls.append(dict(shape=shape, tp_size=tp_size, modes=quantization_modes,
                              ub_cfgs=ub_cfgs, backend=bootstrap_backend))  # fmt: skip

        base.UserBufferQuantizationMode = Mode
    else:

        def initialize_ub(shape, tp_size, use_fp8=False, ub_cfgs=None, bootstrap_backend=None):
            calls.append(dict(shape=shape, tp_size=tp_size, use_fp8=use_fp8, ub_cfgs=ub_cfgs,
                              backend=bootstrap_backend))  # fmt: skip

    base.initialize_ub = initialize_ub
    base.destroy_ub = lambda: calls.append("destroyed")
    module = types.ModuleType("transformer_engine.pytorch.module")
    module.base = base
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.module = module
    te = types.ModuleType("transformer_engine")
    te.pytorch = pytorch
    for name, mod in (("transformer_engine", te), ("transformer_engine.pytorch", pytorch),
                      ("transformer_engine.pytorch.module", module),
                      ("transformer_engine.pytorch.module.base", base)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def _grid(argv, world=2):
    cfg = parse_args(argv)
    return cfg, validate(cfg, world, 512).grid


def test_userbuffers_for_both_phases_at_megatron_lm_settings(monkeypatch, tmp_path):
    calls = _install_te(monkeypatch, new_api=True)
    cfg, grid = _grid(BASE)
    assert initialize(cfg, grid)
    # seq 32 x micro-batch 3 positions (a bag is one position), hidden 64; TP 2; bf16 buffers.
    assert calls == [dict(shape=[96, 64], tp_size=2, modes=[Mode.NONE], ub_cfgs={},
                          backend="nccl")]  # fmt: skip
    destroy()
    assert calls[-1] == "destroyed"

    settings = tmp_path / "ub.yaml"
    settings.write_text("qkv_fprop:\n  method: ring_exchange\n  aggregate: 0\n")
    cfg, grid = _grid(BASE + ["--tp-comm-overlap-cfg", str(settings),
                              "--tp-comm-bootstrap-backend", "gloo", "--fp8-format", "hybrid",
                              "--first-last-layers-bf16", "--transformer-impl",
                              "transformer_engine"])  # fmt: skip
    calls.clear()
    initialize(cfg, grid)
    assert calls == [dict(shape=[96, 64], tp_size=2, modes=[Mode.FP8, Mode.NONE],
                          ub_cfgs={"qkv_fprop": {"method": "ring_exchange", "aggregate": 0}},
                          backend="gloo")]  # fmt: skip


def test_older_transformer_engine_and_context_parallel(monkeypatch):
    calls = _install_te(monkeypatch, new_api=False)
    cfg, grid = _grid(BASE + ["--context-parallel-size", "2"], world=4)
    initialize(cfg, grid)
    assert calls == [
        dict(shape=[48, 64], tp_size=2, use_fp8=False, ub_cfgs={}, backend="nccl")
    ]  # fmt: skip  (the sequence split over CP 2)


def test_off_without_the_flag_and_refusals(monkeypatch, tmp_path):
    cfg, grid = _grid([a for a in BASE if a != "--tp-comm-overlap"])
    assert not initialize(cfg, grid)  # nothing imported, nothing set up
    cfg, grid = _grid(BASE)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    with pytest.raises(ValueError, match=r"--tp-comm-overlap needs Transformer Engine"):
        initialize(cfg, grid)
    _install_te(monkeypatch, new_api=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    for path, message in ((str(tmp_path / "missing.yaml"), r"No such file"),
                          (str(bad), r"must hold a mapping of GEMM names")):  # fmt: skip
        cfg, grid = _grid(BASE + ["--tp-comm-overlap-cfg", path])
        with pytest.raises(ValueError, match=message):
            initialize(cfg, grid)
