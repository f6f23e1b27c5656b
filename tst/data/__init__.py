"""Data for TST: raw token chunks folded into bags, and the datasets that serve them."""

from tst.data.batch import (
    FULL_BAG,
    PAPER,
    chunk_length,
    make_tst_batch,
)

__all__ = ["FULL_BAG", "PAPER", "chunk_length", "make_tst_batch"]
