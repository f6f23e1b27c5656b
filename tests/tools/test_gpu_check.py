"""bench/gpu_check.sh passes its CPU dry run: the GPU command lines are accepted as they stand.

``DRY_RUN=1`` runs the script's own ``pretrain_tst.py`` command lines with ``--dry-run``
(the model built on the meta device, no GPU, no data), for the bf16 run and the FP8 one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, OUT_DIR=str(tmp_path))
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== bf16 (dry run)" in out and "== fp8 (dry run)" in out
    total = float(re.search(r"total ([\d.]+)M", out).group(1))
    assert 330 <= total <= 400, f"the check wants a ~350M model, got {total}M"
    assert "superposition" in out and "recovery" in out
    assert "bf16 + FP8 (hybrid" in out
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"
