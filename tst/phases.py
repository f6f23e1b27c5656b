"""The phase schedule: data plus a pure function of the iteration.

A run is one or more superposition *stages* (bags of ``bag_size`` tokens each) followed by a
recovery phase (ordinary next-token training) to the end. The two-phase run of the paper is
one bag stage (``--tst-bag-size`` / ``--tst-fraction`` / ``--tst-iters``); ``--tst-schedule
"8:0.1,4:0.2,1"`` gives several (bag size : share of the run's steps, then ``1`` for the
recovery phase). Every stage shares one model, optimizer, LR schedule and data stream; only
what a step feeds the model and which loss it applies change. :meth:`PhaseSchedule.phase_at`
is identical on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tst.errors import ConfigError

__all__ = [
    "MAX_BAG_SIZE",
    "RECOVERY",
    "SUPERPOSITION",
    "Phase",
    "PhaseSchedule",
    "next_token_phase",
    "parse_schedule",
]

SUPERPOSITION = "superposition"
RECOVERY = "recovery"
MAX_BAG_SIZE = 64  # --tst-bag-size's bound; also the data's big-sample units (see data_bag_size)


@dataclass(frozen=True)
class Phase:
    """One stage of the run: which steps, what a step feeds the model and how it is scored."""

    name: str  # SUPERPOSITION | RECOVERY
    start: int  # first iteration (0-based step index) of the phase
    end: int  # one past the last
    input_bag: int  # tokens averaged per input position
    target_bag: int  # target slots per position
    loss: str  # "mce" | "mce-alt" | "lm"
    units_per_row: int  # L+1-token units of the data stream one sample row consumes
    # Sample layout of bag rows, "full" | "paper" (tst.data.batch); the MCE's batch average
    # follows it (tst.losses). No effect on a phase without bags.
    layout: str = "full"
    # Index of the stage in the schedule as declared (0 = first); a stage given no steps
    # keeps its index, so checkpoints of one schedule compare stage by stage.
    stage: int = 0

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def bag_size(self) -> int:
        """The stage's bag size (input or target side, whichever --tst-mode superposes)."""
        return max(self.input_bag, self.target_bag)


def next_token_phase(start: int = 0, end: int = 1, stage: int = 0) -> Phase:
    """Ordinary next-token training: the recovery phase, and what evaluation always scores."""
    return Phase(name=RECOVERY, start=start, end=end, input_bag=1, target_bag=1, loss="lm",
                 units_per_row=1, stage=stage)  # fmt: skip


def _bag_phase(bag_size: int, start: int, end: int, stage: int, mode: str, loss: str,
               layout: str) -> Phase:  # fmt: skip
    input_bag = bag_size if mode in ("full", "input-only") else 1
    target_bag = bag_size if mode in ("full", "output-only") else 1
    return Phase(name=SUPERPOSITION, start=start, end=end, input_bag=input_bag,
                 target_bag=target_bag, loss=loss if target_bag > 1 else "lm",
                 units_per_row=input_bag, layout=layout, stage=stage)  # fmt: skip


def parse_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """``--tst-schedule "8:0.1,4:0.2,1"`` -> ``((8, 0.1), (4, 0.2))``: the bag stages as
    (bag size, share of the run's steps); the closing ``1`` is the recovery phase, which
    takes the rest. Refuses anything else with one line naming the flag and the fix."""
    example = 'e.g. --tst-schedule "8:0.1,4:0.2,1"'
    entries = [e.strip() for e in text.split(",")]
    if len(entries) < 2 or entries[-1] != "1":
        raise ConfigError(
            f"--tst-schedule {text!r}: give one or more BAG:FRACTION stages and end with 1 "
            f"(the next-token recovery phase), {example}"
        )
    stages = []
    for entry in entries[:-1]:
        bag, sep, fraction = entry.partition(":")
        try:
            stage = (int(bag), float(fraction))
        except ValueError:
            stage = None
        if not sep or stage is None:
            raise ConfigError(
                f"--tst-schedule {text!r}: stage {entry!r} is not BAG:FRACTION (an integer "
                f"bag size and a share of the run's steps), {example}"
            )
        if not 2 <= stage[0] <= MAX_BAG_SIZE:
            raise ConfigError(
                f"--tst-schedule {text!r}: bag size {stage[0]} must be between 2 and "
                f"{MAX_BAG_SIZE} (only the closing entry is 1)"
            )
        if not 0.0 < stage[1] < 1.0:
            raise ConfigError(
                f"--tst-schedule {text!r}: fraction {fraction} must be in (0, 1) (a share of "
                "--train-iters)"
            )
        stages.append(stage)
    if sum(f for _, f in stages) >= 1.0:
        raise ConfigError(
            f"--tst-schedule {text!r}: the fractions sum to {sum(f for _, f in stages):g}; "
            "keep them below 1 so the recovery phase (the closing 1) has steps"
        )
    units = math.lcm(*(b for b, _ in stages))
    if units > MAX_BAG_SIZE:
        raise ConfigError(
            f"--tst-schedule {text!r}: the data is cut in samples of lcm(bag sizes) = {units} "
            f"units, more than {MAX_BAG_SIZE}; pick bag sizes that divide one another "
            "(e.g. 8, 4, 2)"
        )
    return tuple(stages)


@dataclass(frozen=True)
class PhaseSchedule:
    phases: tuple[Phase, ...]
    # Units of L+1 tokens per big sample of the data (tst.data.stream): every stage's rows
    # are cut from these, so it is a multiple of every stage's bag size.
    data_bag_size: int = 1

    @classmethod
    def build(
        cls,
        train_iters: int,
        bag_size: int,
        tst_iters: int | None,
        tst_fraction: float | None,
        mode: str = "full",
        loss: str = "mce",
        layout: str = "full",
    ):
        """``tst_iters`` wins over ``tst_fraction``; the default fraction is the paper's 0.3.
        ``layout`` is the superposition phase's sample layout (``--tst-layout``)."""
        if bag_size == 1:
            return cls.from_stages(train_iters, (), mode, loss, layout)
        if tst_iters is not None:
            switch = tst_iters
        else:
            switch = round((0.3 if tst_fraction is None else tst_fraction) * train_iters)
        return cls.from_stages(train_iters, ((bag_size, switch),), mode, loss, layout)

    @classmethod
    def from_stages(
        cls,
        train_iters: int,
        stages: Sequence[tuple[int, int]],
        mode: str = "full",
        loss: str = "mce",
        layout: str = "full",
    ) -> PhaseSchedule:
        """Bag stages as ``(bag_size, end iteration)`` in order, then the recovery phase to
        ``train_iters``. Ends are clamped into the run; a stage left with no steps is
        dropped (it keeps its stage index). ``mode``, ``loss`` and ``layout`` apply to every
        bag stage."""
        phases, start = [], 0
        for index, (bag, end) in enumerate(stages):
            end = min(max(end, start), train_iters)
            if end > start:
                phases.append(_bag_phase(bag, start, end, index, mode, loss, layout))
            start = end
        if start < train_iters:
            phases.append(next_token_phase(start, train_iters, stage=len(stages)))
        data_bag = math.lcm(*(bag for bag, _ in stages)) if stages else 1
        return cls(tuple(phases), data_bag)

    @classmethod
    def from_config(cls, cfg, train_iters: int) -> PhaseSchedule:
        """The schedule a :class:`tst.config.Config` asks for, over the run's ``train_iters``
        steps (the run plan's: --train-iters, or the steps --train-samples comes to)."""
        tst = cfg.tst
        if tst.tst_schedule:
            ends, share = [], 0.0
            stages = parse_schedule(tst.tst_schedule)
            for bag, fraction in stages:
                # Cumulative shares, rounded once: "B:f,1" switches where --tst-fraction f does.
                share += fraction
                ends.append((bag, round(share * train_iters)))
            return cls.from_stages(train_iters, ends, tst.tst_mode, tst.tst_loss, tst.tst_layout)
        return cls.build(train_iters, tst.tst_bag_size, tst.tst_iters,
                         tst.tst_fraction, tst.tst_mode, tst.tst_loss,
                         tst.tst_layout)  # fmt: skip

    @property
    def switch_iteration(self) -> int:
        """First step of the recovery phase (= train_iters when there is none; 0 when the
        run has no bag stage)."""
        for phase in self.phases:
            if phase.name == RECOVERY:
                return phase.start
        return self.phases[-1].end

    @property
    def stage_starts(self) -> tuple[int, ...]:
        """The iterations where a stage begins after another (every switch, in order)."""
        return tuple(p.start for p in self.phases[1:])

    def starting_at(self, iteration: int) -> Phase | None:
        """The phase that a switch at ``iteration`` enters, or None where no switch is."""
        for phase in self.phases[1:]:
            if phase.start == iteration:
                return phase
        return None

    def eval_phase(self) -> Phase:
        """What evaluation scores in every stage: ordinary next-token inputs and targets."""
        return next_token_phase()

    def phase_at(self, iteration: int) -> Phase:
        """The phase of 0-based step ``iteration``."""
        for phase in self.phases:
            if phase.start <= iteration < phase.end:
                return phase
        raise ValueError(
            f"iteration {iteration} is outside the schedule [0, {self.phases[-1].end})"
        )

    def table(self) -> str:
        lines = [f"{'stage':>5} {'phase':<14} {'steps':>15} {'input bag':>9} "
                 f"{'target bag':>10} {'loss':>8}"]  # fmt: skip
        for p in self.phases:
            lines.append(
                f"{p.stage:>5} {p.name:<14} {f'{p.start}..{p.end - 1}':>15} {p.input_bag:>9} "
                f"{p.target_bag:>10} {p.loss:>8}"
            )
        return "\n".join(lines)

    def to_dict(self) -> list[dict]:
        return [vars(p) | {"steps": p.steps} for p in self.phases]
