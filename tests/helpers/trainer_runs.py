"""pretrain_tst.main inside a test body: its metrics records, and a look at the trainer once
it has trained."""

from __future__ import annotations

import contextlib
import json


def main_records(argv: list[str], metrics: str) -> list[dict]:
    """Run ``pretrain_tst.main(argv)`` on this rank (it must return 0), wait for every rank,
    and return the records of its metrics file ``metrics``."""
    import torch.distributed as dist

    import pretrain_tst

    assert pretrain_tst.main(argv + ["--metrics-file", metrics]) == 0
    if dist.is_initialized():
        dist.barrier()
    with open(metrics) as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def after_training(look):
    """Within the block, every ``Trainer.train`` calls ``look(trainer)`` when it has trained
    (before the run shuts down, so collectives still work)."""
    from tst.trainer import Trainer

    original = Trainer.train

    def train(self):
        rc = original(self)
        look(self)
        return rc

    Trainer.train = train
    try:
        yield
    finally:
        Trainer.train = original
