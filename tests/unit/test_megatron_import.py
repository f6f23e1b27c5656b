"""tst/megatron_import.py: without CUDA, megatron-core's first import after ``import tst``
leaves its fusions as the plain functions (no TorchDynamo import, no compile), and
``torch.compile`` itself is untouched afterwards. A fresh interpreter: this test process
imported megatron-core long ago."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROBE = r"""
import json, sys
import tst
import torch
compile_before = torch.compile
import tst.trainer  # megatron-core, its models and fusions
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
