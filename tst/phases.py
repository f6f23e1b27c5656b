"""The phase schedule: data plus a pure function of the iteration.

A run is a superposition phase (bags of ``bag_size`` tokens) for its first ``tst_iters``
steps, then a recovery phase (ordinary next-token training) to the end. Both phases share
one model, optimizer, LR schedule and data stream; only what a step feeds the model and
which loss it applies change. :func:`phase_at` is identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Phase", "PhaseSchedule", "SUPERPOSITION", "RECOVERY"]

SUPERPOSITION = "superposition"
RECOVERY = "recovery"


@dataclass(frozen=True)
class Phase:
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

    @property
    def steps(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PhaseSchedule:
    phases: tuple[Phase, ...]

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
            switch = 0
        elif tst_iters is not None:
            switch = tst_iters
        else:
            switch = round((0.3 if tst_fraction is None else tst_fraction) * train_iters)
        switch = min(max(switch, 0), train_iters)
        input_bag = bag_size if mode in ("full", "input-only") else 1
        target_bag = bag_size if mode in ("full", "output-only") else 1
        phases = []
        if switch > 0:
            phases.append(
                Phase(
                    SUPERPOSITION,
                    0,
                    switch,
                    input_bag,
                    target_bag,
                    loss if target_bag > 1 else "lm",
                    input_bag,
                    layout,
                )
            )
        if switch < train_iters:
            phases.append(Phase(RECOVERY, switch, train_iters, 1, 1, "lm", 1))
        return cls(tuple(phases))

    @classmethod
    def from_config(cls, cfg, train_iters: int) -> PhaseSchedule:
        """The schedule a :class:`tst.config.Config` asks for, over the run's ``train_iters``
        steps (the run plan's: --train-iters, or the steps --train-samples comes to)."""
        tst = cfg.tst
        return cls.build(train_iters, tst.tst_bag_size, tst.tst_iters,
                         tst.tst_fraction, tst.tst_mode, tst.tst_loss,
                         tst.tst_layout)  # fmt: skip

    @property
    def switch_iteration(self) -> int:
        """First step of the recovery phase (= train_iters when there is none)."""
        return self.phases[0].end if self.phases[0].name == SUPERPOSITION else 0

    def phase_at(self, iteration: int) -> Phase:
        """The phase of 0-based step ``iteration``."""
        for phase in self.phases:
            if phase.start <= iteration < phase.end:
                return phase
        raise ValueError(
            f"iteration {iteration} is outside the schedule [0, {self.phases[-1].end})"
        )

    def table(self) -> str:
        lines = [f"{'phase':<14} {'steps':>15} {'input bag':>9} {'target bag':>10} {'loss':>8}"]
        for p in self.phases:
            lines.append(
                f"{p.name:<14} {f'{p.start}..{p.end - 1}':>15} {p.input_bag:>9} "
                f"{p.target_bag:>10} {p.loss:>8}"
            )
        return "\n".join(lines)

    def to_dict(self) -> list[dict]:
        return [vars(p) | {"steps": p.steps} for p in self.phases]
