"""Data for TST: raw token chunks folded into bags, and the datasets that serve them."""

from tst.data.batch import (
    FULL_BAG,
    PAPER,
    chunk_length,
    make_tst_batch,
)
from tst.data.stream import SampleStream, big_samples_needed

# tst.data.datasets (megatron-core datasets), tst.data.tokenizers and tst.data.indexed are
# imported by name where needed: importing megatron-core costs seconds.
__all__ = [
    "FULL_BAG",
    "PAPER",
    "SampleStream",
    "big_samples_needed",
    "chunk_length",
    "make_tst_batch",
]
