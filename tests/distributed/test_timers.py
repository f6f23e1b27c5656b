"""--timing-log-level / --timing-log-option / --log-timers-to-tensorboard /
--no-barrier-with-level-1-timing: megatron-core's timers, logged as Megatron-LM logs them
(its training.py's names per level, per step over the log window, across ranks), on two
pipeline stages; the timers change no training, and evaluations stay out of them.

Reference: Megatron-LM's own timer names and formats (megatron.core.timers), and the run
without timers (exact).
"""

from __future__ import annotations

import contextlib
import io

from test_trainer import BASE, _losses, _train
from trainer_runs import after_training

PP2 = BASE + ["--pipeline-model-parallel-size", "2", "--log-interval", "3"]


def _train_printing(argv: list[str], metrics: str) -> tuple[list[dict], str, bool]:
    """_train, what this rank printed, and the L1 barrier setting megatron-core was given."""
    seen = []
    out = io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        after_training(lambda trainer: seen.append(trainer.config.barrier_with_L1_time)),
    ):
        records = _train(argv, metrics)
    return records, out.getvalue(), seen[0]


def _timer_lines(text: str) -> list[str]:
    return [line.split("...")[0].strip() for line in text.splitlines() if "...." in line]


def test_timers_are_logged_per_level_and_change_no_training(world2, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, text, barrier = world2.run(_train_printing, PP2, str(tmp_path / "a.jsonl"))[0]
    assert "time across ranks" not in text and barrier is True  # level 0: none

    tb = str(tmp_path / "tb")
    flags = ["--timing-log-level", "2", "--log-timers-to-tensorboard", "--tensorboard-dir", tb]
    records, text, _ = world2.run(_train_printing, PP2 + flags, str(tmp_path / "b.jsonl"))[0]
    assert _losses(records) == _losses(plain)
    assert text.count("(min, max) time across ranks (ms):") == 2  # steps 3 and 6
    names = set(_timer_lines(text))
    # The step's parts (here), the schedule's and the pipeline's (megatron-core), the
    # gradient reduction's and the optimizer's (megatron-core).
    assert {"batch-generator", "forward-backward", "forward-compute", "backward-compute",
            "forward-send", "forward-recv", "backward-send", "backward-recv",
            "all-grads-sync", "optimizer-inner-step", "optimizer"} <= names, names  # fmt: skip
    events = EventAccumulator(tb)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"forward-backward-time", "optimizer-time", "forward-compute-time"} <= tags, tags
    assert [e.step for e in events.Scalars("forward-backward-time")] == [3, 6]

    flags = ["--timing-log-level", "1", "--timing-log-option", "all",
             "--no-barrier-with-level-1-timing"]  # fmt: skip
    _, text, barrier = world2.run(_train_printing, PP2 + flags, str(tmp_path / "c.jsonl"))[0]
    assert barrier is False and "times across ranks (ms):" in text
    assert "rank  0:" in text and "rank  1:" in text
    assert "forward-compute" not in text and "  forward-backward:" in text  # level 1 only

    flags = ["--timing-log-level", "1", "--timing-log-option", "max"]
    _, text, _ = world2.run(_train_printing, PP2 + flags, str(tmp_path / "d.jsonl"))[0]
    assert text.count("max time across ranks (ms):") == 2


def test_timers_with_overlapped_reduction_and_gathers_and_interleaving(world2, tmp_path):
    """Level 2 with the distributed optimizer's overlapped gradient reduction and parameter
    gathers (DP 2), and with an interleaved pipeline (PP 2, VPP 2): megatron-core's timers
    in its hooks and schedules nest as they do in Megatron-LM; the training is unchanged."""
    level2 = ["--timing-log-level", "2"]
    for name, extra in (
        ("dp", ["--use-distributed-optimizer", "--overlap-grad-reduce",
                "--overlap-param-gather", "--log-interval", "3"]),
        ("vpp", ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-"
                 "stage", "1", "--log-interval", "3"]),
    ):  # fmt: skip
        plain = world2.run(_train, BASE + extra, str(tmp_path / f"{name}-a.jsonl"))[0]
        records, text, _ = world2.run(_train_printing, BASE + extra + level2,
                                      str(tmp_path / f"{name}-b.jsonl"))[0]  # fmt: skip
        assert _losses(records) == _losses(plain), name
        assert {"forward-backward", "forward-compute", "optimizer"} <= set(_timer_lines(text))
