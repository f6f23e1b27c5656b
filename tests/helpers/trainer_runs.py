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


def main_error(argv: list[str], metrics: str, errors: tuple[type, ...] | None = None) -> str:
    """Run ``pretrain_tst.main(argv)`` on this rank, which must raise one of ``errors`` (the
    project's ``TSTError`` by default); return the error's message."""
    import pytest

    import pretrain_tst
    from tst.errors import TSTError

    with pytest.raises(errors or TSTError) as error:
        pretrain_tst.main(argv + ["--metrics-file", metrics])
    return str(error.value)


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


def tracker_rows(path: str) -> list[dict]:
    """The lines of a --result-rejected-tracker-filename file: rank, iteration, status (the
    RerunValidationStatus member's name, lower case) and result (as written) of each."""
    rows = []
    with open(path) as f:
        for line in f:
            fields = dict(part.split("=", 1) for part in line.split(" message=")[0].split()[2:])
            rows.append({"rank": int(fields["rank"]), "iteration": int(fields["iteration"]),
                         "status": fields["status"].split(".")[-1].lower(),
                         "result": fields["result"]})  # fmt: skip
    return rows
