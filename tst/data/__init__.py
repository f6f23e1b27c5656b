"""Data for TST: raw token chunks folded into bags, and the datasets that serve them.

The names below load on first use (PEP 562): ``tst.config`` imports
``tst.data.tokenizers`` for the ``--tokenizer-type`` choices, and that must not import torch.
tst.data.datasets (megatron-core datasets), tst.data.tokenizers and tst.data.indexed are
imported by name where needed: importing megatron-core costs seconds.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FULL_BAG": "tst.data.batch",
    "PAPER": "tst.data.batch",
    "chunk_length": "tst.data.batch",
    "make_tst_batch": "tst.data.batch",
    "SampleStream": "tst.data.stream",
    "big_samples_needed": "tst.data.stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tst.data' has no attribute {name!r}")
