"""tst/megatron_import.py: without CUDA, megatron-core's first import after ``import tst``
leaves its fusions as the plain functions (no TorchDynamo import, no compile), defers
``wandb`` to its first use, and freezes the module graph out of the garbage collector;
``torch.compile`` itself is untouched afterwards. A fresh interpreter: this test process
imported megatron-core long ago."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch

PROBE = r"""
import gc, json, sys
import tst
import torch
compile_before = torch.compile
import tst.trainer  # megatron-core, its models and fusions
from megatron.core import timers
wandb_early = sys.modules.get("wandb")
wandb_deferred = type(wandb_early).__name__ == "_DeferredModule" and "wandb.sdk" not in sys.modules
frozen, collector_on = gc.get_freeze_count(), gc.isenabled()
import wandb.sdk  # a submodule first: the package runs first, in the same object
wandb_real = type(wandb_early).__name__ == "module" and callable(wandb_early.init)
from megatron.core import jit
from megatron.core.fusions import fused_bias_swiglu
from megatron.core.transformer.moe.router import TopKRouter

def plain(fn):
    return type(fn).__name__ == "function" and not hasattr(fn, "_torchdynamo_orig_callable")

dynamo_imported = "torch._dynamo" in sys.modules

@torch.compile
def twice(x):
    return 2 * x

print(json.dumps({
    "dynamo_imported": dynamo_imported,
    "compile_restored": torch.compile is compile_before,
    "jit_fuser_is_compile": jit.jit_fuser is torch.compile,
    "plain": [plain(fused_bias_swiglu.swiglu), plain(TopKRouter._apply_expert_bias)],
    "user_compile_still_compiles": hasattr(twice, "_torchdynamo_orig_callable"),
    "wandb": [wandb_deferred, wandb_real, timers.wandb is sys.modules["wandb"] is wandb_early],
    "frozen": frozen,
    "collector_on": collector_on,
}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the import is unchanged")
def test_first_megatron_import_compiles_nothing_on_cpu():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["dynamo_imported"]  # decorating no longer imports TorchDynamo
    assert got["compile_restored"] and not got["jit_fuser_is_compile"]
    assert got["plain"] == [True, True]
    assert got["user_compile_still_compiles"]  # torch.compile outside megatron-core as ever
    # wandb runs on first use, in the object megatron-core's modules already hold
    assert got["wandb"] == [True, True, True]
    # the module graph is out of the collector's reach, and the collector back on
    assert got["frozen"] > 100_000 and got["collector_on"]


class _Node:
    pass


def _cyclic_garbage() -> weakref.ref:
    node = _Node()
    node.self = node
    return weakref.ref(node)


def test_settled_imports_freezes_new_imports_and_never_earlier_garbage(tmp_path, monkeypatch):
    """A frozen object is never collected: a finished run's garbage (its model, its process
    groups and their threads) frozen by the next run's import block leaked in test worlds."""
    from tst.megatron_import import settled_imports

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        garbage = _cyclic_garbage()
        with settled_imports():
            assert not gc.isenabled()  # paused inside
        assert gc.get_freeze_count() == frozen  # nothing imported: nothing frozen
        assert gc.isenabled()
        gc.collect()  # (nor collected: a later run's block costs no collection)
        assert garbage() is None  # left to the collector, which frees it

        (tmp_path / "settled_probe.py").write_text("VALUE = [1, 2, 3]\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        garbage = _cyclic_garbage()
        with settled_imports():
            import settled_probe  # noqa: F401
        assert garbage() is None  # collected before the freeze
        assert gc.get_freeze_count() > frozen and gc.isenabled()
    finally:
        gc.unfreeze()  # this worker's collector as it was
        sys.modules.pop("settled_probe", None)


JIT_PROBE = r"""
import json, sys
import torch
torch.cuda.is_available = lambda: True  # as on a GPU host, where jit_fuser is torch.compile
import types
import pretrain_tst
# The dry run's report would query the pretended GPU: a stand-in module, imported by main
# beside tst.trainer (megatron-core, its models and fusions) after the flags are parsed.
stub = types.ModuleType("tst.dry_run")
stub.dry_run, stub.dry_run_vocab_size = (lambda cfg, vocab: 0), (lambda cfg: 512)
sys.modules["tst.dry_run"] = stub
assert "megatron.core" not in sys.modules
assert pretrain_tst.main([*sys.argv[1:], "--dry-run"]) == 0
from megatron.core import jit
from megatron.core.fusions import fused_bias_swiglu
print(json.dumps({
    "jit_fuser_is_compile": jit.jit_fuser is torch.compile,
    "swiglu_compiled": hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable"),
}))
"""


@pytest.mark.parametrize("flag", [[], ["--disable-jit-fuser"]])
def test_disable_jit_fuser_leaves_every_fusion_plain_with_cuda(flag):
    """With CUDA megatron-core's fusions are torch.compile'd; --disable-jit-fuser (Megatron-LM's)
    leaves them plain functions, from the first import on."""
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "512", *flag]  # fmt: skip
    out = subprocess.run([sys.executable, "-c", JIT_PROBE, *argv], capture_output=True,
                         text=True, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"jit_fuser_is_compile": not flag, "swiglu_compiled": not flag}, out.stderr
