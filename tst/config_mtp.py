"""Multi-token prediction flags (Megatron-LM's names and defaults), forwarded to megatron-core.

megatron-core's MTP block (DeepSeek-V3's sequential MTP modules) adds ``D`` depths after the
decoder on the last stage; depth ``k`` predicts ``k`` positions past the main head. What that
means under TST is defined in :class:`tst.model.TSTGPTModel`: in the superposition phase
depth ``k`` predicts the bag ``k + 1`` positions ahead with the phase's multi-hot loss, in the
recovery phase the ordinary token ``k + 1`` ahead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tst.config_fields import _f, _require

__all__ = ["MTPConfig"]


@dataclass
class MTPConfig:
    mtp_num_layers: int | None = _f(
        None,
        "Multi-token prediction depths D (megatron-core's MTP block: on the last stage, or "
        "where --pipeline-model-parallel-layout puts its m's).",
    )
    mtp_loss_scaling_factor: float = _f(
        0.1, "Weight of the MTP loss, averaged over its depths, next to the main loss."
    )

    def __post_init__(self):
        _require(
            self.mtp_num_layers is None or self.mtp_num_layers >= 1,
            f"--mtp-num-layers must be >= 1 (or left out), got {self.mtp_num_layers}",
        )
        _require(
            self.mtp_loss_scaling_factor >= 0 and math.isfinite(self.mtp_loss_scaling_factor),
            f"--mtp-loss-scaling-factor must be a finite number >= 0, got "
            f"{self.mtp_loss_scaling_factor}",
        )

    def transformer_config_fields(self) -> dict:
        """The megatron-core ``TransformerConfig`` fields this section sets (names equal)."""
        if self.mtp_num_layers is None:
            return {}
        return {
            "mtp_num_layers": self.mtp_num_layers,
            "mtp_loss_scaling_factor": self.mtp_loss_scaling_factor,
        }
