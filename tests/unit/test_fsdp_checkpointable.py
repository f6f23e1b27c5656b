"""The start-time rule for FSDP2 layouts whose shards megatron-core's sharded tensors cannot
hold (``tst.fsdp.check_checkpointable``), at data-parallel sizes the test worlds do not have.

The rows rule runs end to end in tests/distributed/test_torch_fsdp2.py (a 510-row vocabulary
at DP 4); the SwiGLU rule needs an odd DP size, so both are checked here on a model whose
parameters stand for FSDP2 shards over a mesh of 3 or 2 (every weight's rows divide by 6, so only
the fused gate / up weight's halves can fail).
"""

from __future__ import annotations

import types

import pytest
import torch

from tst import fsdp
from tst.errors import RunError


def _model(rows_fc1: int, mesh: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.embedding = torch.nn.Linear(48, 516, bias=False)  # 516 rows: 6 x 86
    model.linear_qkv = torch.nn.Linear(48, 144, bias=False)
    model.linear_fc1 = torch.nn.Linear(48, rows_fc1, bias=False)
    for param in model.parameters():
        param.device_mesh = types.SimpleNamespace(size=lambda: mesh)
    return model


def test_swiglu_at_an_odd_data_parallel_size_is_refused(monkeypatch):
    monkeypatch.setattr(fsdp, "is_sharded", lambda tensor: hasattr(tensor, "device_mesh"))
    # Without SwiGLU, or at an even size, the same shapes are fine.
    fsdp.check_checkpointable(_model(96, 3), gated_linear_unit=False)
    fsdp.check_checkpointable(_model(96, 2), gated_linear_unit=True)
    with pytest.raises(RunError, match=r"--use-torch-fsdp2 with --swiglu at data-parallel "
                       r"size 3: each rank's shard of linear_fc1.weight .* use an even "
                       r"data-parallel size"):  # fmt: skip
        fsdp.check_checkpointable(_model(96, 3), gated_linear_unit=True)
    # Rows that do not split into equal shards are named first.
    with pytest.raises(RunError, match=r"linear_fc1.weight has 98 rows, which FSDP2 cannot "
                       r"split into 3 equal shards"):  # fmt: skip
        fsdp.check_checkpointable(_model(98, 3), gated_linear_unit=True)
