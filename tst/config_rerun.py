"""Megatron-LM's rerun-engine flags (its names, meanings and defaults, but one).

The engine is megatron-core's ``RerunStateMachine``, driven by :mod:`tst.rerun`. Megatron-LM
runs it by default (``--rerun-mode validate_results``); here it runs when any of these flags
is given. Without them a non-finite step is skipped before the optimizer sees it (up to
``--max-skipped-steps`` in a row), which needs no re-run and no restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from tst.config_fields import _f, _require

__all__ = ["RerunConfig", "RERUN_MODES", "INJECTION_TYPES"]

RERUN_MODES = ("disabled", "validate_results", "report_stats")
INJECTION_TYPES = ("correct_result", "transient_error", "persistent_error")


@dataclass
class RerunConfig:
    rerun_mode: str | None = _f(
        None,
        "Megatron-LM's rerun engine: validate_results re-runs a step whose loss (or gradient "
        "norm) is rejected, on this GPU and then, after a checkpoint and exit code 16, on "
        "another, to tell a faulty GPU from a real divergence (exit code 17 when established); "
        "report_stats re-runs every step once and logs how far results vary; disabled stops "
        "at the first non-finite step. Not given: the engine is off unless another rerun flag "
        "is given (then validate_results, Megatron-LM's default), and non-finite steps are "
        "skipped (--max-skipped-steps).",
        choices=list(RERUN_MODES),
    )
    check_for_nan_in_loss_and_grad: bool = _f(
        True,
        "With the rerun engine: do not validate losses and gradient norms for NaN / Inf "
        "(non-finite steps are then skipped, --max-skipped-steps).",
        flag="--no-check-for-nan-in-loss-and-grad",
    )
    check_for_spiky_loss: bool = _f(
        False,
        "Rerun engine: reject a micro-batch loss 10x above the largest of the first 100 "
        "(not fatal: the step is re-run once, then training goes on).",
    )
    check_for_large_grads: bool = _f(
        False,
        "Rerun engine: reject a gradient-bucket norm 10x above the largest of the first 100 "
        "(not fatal).",
    )
    error_injection_rate: int = _f(
        0, "Rerun engine: inject a rejected result once every N validations (0: never; tests)."
    )
    error_injection_type: str = _f(
        "transient_error",
        "Rerun engine: what the injected result behaves as on its re-runs.",
        choices=list(INJECTION_TYPES),
    )
    result_rejected_tracker_filename: str | None = _f(
        None,
        "Append every rejected result to this file (node, device, job, rank, iteration, "
        "status); an iteration rejected twice on the same rank, reproducibly or with the "
        "engine disabled, is skipped at the next launch.",
    )
    iterations_to_skip: list[int] = _f(
        [],
        "Skip the step begun after N completed iterations (logged as iteration N+1), as "
        "Megatron-LM counts: its data is read and dropped, no update is made.",
        type=int,
    )

    def __post_init__(self):
        _require(
            self.error_injection_rate >= 0,
            f"--error-injection-rate must be >= 0 (0: never), got {self.error_injection_rate}",
        )
        _require(
            all(i >= 0 for i in self.iterations_to_skip),
            f"--iterations-to-skip takes iteration counts >= 0, got {self.iterations_to_skip}",
        )

    @property
    def engine_on(self) -> bool:
        """Whether megatron-core's rerun state machine drives the training step."""
        return self.rerun_mode is not None or bool(
            self.check_for_spiky_loss
            or self.check_for_large_grads
            or self.error_injection_rate
            or self.result_rejected_tracker_filename
        )

    @property
    def mode(self) -> str | None:
        """The engine's mode (Megatron-LM's default when only other rerun flags are given)."""
        if not self.engine_on:
            return None
        return self.rerun_mode or "validate_results"
