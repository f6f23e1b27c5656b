"""Per-phase training statistics beyond the loss: MoE routing per layer and MTP loss per depth.

A training step gathers local sums (:meth:`StepStats.begin_step` discards what a skipped step
gathered, :meth:`StepStats.commit` adds a good step's to its phase); the logging window's
sums are reduced over all ranks once, at log time (:meth:`StepStats.window_record`), so a
step costs no extra collective. Every rank holds the same phases with buffers of the same
shape, whatever it holds of the model, so one all-reduce of their concatenation serves.

Routing, per MoE layer (``layer_<n>`` 1-based, ``mtp_<k>`` for an MTP depth's layer):
``tokens_per_expert`` (tokens each expert computed, summed over the window), its min / max
and ``load_imbalance`` (max over the even share), ``dropped_tokens`` (assignments over an
expert's capacity, ``--moe-expert-capacity-factor``), ``routed_tokens`` (tokens routed,
each to top-k experts: ``sum(tokens_per_expert) + dropped_tokens = routed_tokens x topk``)
and the balancing loss(es) megatron-core tracks (without their coefficient), averaged over
the window's micro-batches as Megatron-LM logs them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["RoutingMonitor", "StepStats"]

# megatron-core's tracker names of the balancing losses, and whether its value on a rank is
# a share of the data-parallel total (global_aux_loss: tokens counted over DP already).
_BALANCING = {
    "load_balancing_loss": False,
    "seq_load_balancing_loss": False,
    "global_load_balancing_loss": True,
}


class RoutingMonitor:
    """Forward hooks on every router of ``model_chunks``: tokens per expert and dropped
    tokens of this rank's training forwards, into a ``[layers, E + 2]`` fp64 buffer on
    ``device`` (no host sync per router call).

    Counts only forwards that train (``training`` and grad enabled): evaluation is left out,
    and a layer recomputed under full activation recompute counts once (its first forward
    runs without grad), as megatron-core counts the expert-bias token counts.
    """

    def __init__(self, model_chunks, config, device):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
        from megatron.core.transformer.moe.router import TopKRouter

        # megatron-core's loss tracker is a process global, sized by the first model that
        # logs into it: a run after another in the same process (a tool, a test world) with
        # more layers (e.g. MTP) would index past its end. Start this run with an empty one.
        get_moe_layer_wise_logging_tracker().clear()

        self.num_layers = config.num_layers
        self.num_experts = config.num_moe_experts or 0
        self.topk = config.moe_router_topk
        self.padded = bool(config.moe_pad_expert_input_to_capacity)
        self.layers = config.num_layers + (config.mtp_num_layers or 0)
        self.buffer = torch.zeros(
            self.layers, self.num_experts + 2, dtype=torch.float64, device=device
        )
        self._handles = [
            module.register_forward_hook(self._hook)
            for chunk in model_chunks
            for module in chunk.modules()
            if isinstance(module, TopKRouter)
        ]

    def _hook(self, router, inputs, outputs) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        probs, routing_map = outputs  # [tokens, E]
        with torch.no_grad():
            # Padded to capacity, the map marks padding rows too; real assignments keep
            # their probability, padding gets 0.
            kept = routing_map & (probs != 0) if self.padded else routing_map
            per_expert = kept.sum(dim=0).double()
            tokens = routing_map.shape[0]
            row = self.buffer[router.layer_number - 1]
            row[: self.num_experts] += per_expert
            row[self.num_experts] += tokens * self.topk - per_expert.sum()
            row[self.num_experts + 1] += tokens

    def take(self) -> torch.Tensor:
        """``[layers, E + 2 + 3]``: this rank's counts since the last call, then megatron-core's
        tracked balancing losses (summed over micro-batches); both trackers are cleared."""
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        losses = torch.zeros(
            self.layers, len(_BALANCING), dtype=torch.float64, device=self.buffer.device
        )
        tracker = get_moe_layer_wise_logging_tracker()
        for i, name in enumerate(_BALANCING):
            if name in tracker:
                values = tracker[name]["values"].detach().double()[: self.layers]
                losses[: len(values), i] = values.to(losses.device)
        clear_aux_losses_tracker()
        counts, self.buffer = self.buffer, torch.zeros_like(self.buffer)
        return torch.cat([counts, losses], dim=1)

    def records(self, summed: torch.Tensor, micro_batches: int, dp: int) -> dict:
        """Per MoE layer, the window's record from the world-summed :meth:`take` buffers."""
        E = self.num_experts
        out = {}
        for index in range(self.layers):
            row = summed[index]
            routed = float(row[E + 1])
            if routed == 0:
                continue  # a dense layer, or no MTP
            per_expert = row[:E]
            name = (f"layer_{index + 1}" if index < self.num_layers
                    else f"mtp_{index + 1 - self.num_layers}")  # fmt: skip
            record = {
                "tokens_per_expert": [int(v) for v in per_expert.tolist()],
                "min_tokens_per_expert": int(per_expert.min()),
                "max_tokens_per_expert": int(per_expert.max()),
                "load_imbalance": float(per_expert.max()) / (routed * self.topk / E),
                "dropped_tokens": int(row[E]),
                "routed_tokens": int(routed),
            }
            for i, (loss, over_dp) in enumerate(_BALANCING.items()):
                if row[E + 2 + i] != 0:
                    record[loss] = float(row[E + 2 + i]) / micro_batches / (1 if over_dp else dp)
            out[name] = record
        return out


class StepStats:
    """Routing counts and MTP losses gathered per step, summed per phase over a logging
    window, reduced over ranks at log time. ``routing`` is a :class:`RoutingMonitor` or None;
    ``mtp_depths`` the number of MTP depths (0: none)."""

    def __init__(self, routing: RoutingMonitor | None, mtp_depths: int, dp: int, device):
        self.routing = routing
        self.mtp_depths = mtp_depths
        self.dp = dp
        self.device = device  # sums stay on the device (no host sync) until the window ends
        self._mtp = torch.zeros(max(mtp_depths, 1), 2, dtype=torch.float64, device=device)
        self._window: dict[str, list] = {}  # phase -> [routing sums, MTP sums, micro-batches]

    @property
    def enabled(self) -> bool:
        return self.routing is not None or self.mtp_depths > 0

    def begin_step(self) -> None:
        """Forget what an unfinished (skipped) step gathered."""
        self._mtp.zero_()
        if self.routing is not None:
            self.routing.take()

    def add_mtp(self, stats: torch.Tensor) -> None:
        """One micro-batch's ``[D, 2]`` (loss sum, positions) per MTP depth."""
        self._mtp += stats.detach().double()

    def commit(self, phase: str, micro_batches: int) -> None:
        """A good step of ``phase``: add what it gathered to the window."""
        routing = (self.routing.take() if self.routing is not None
                   else torch.zeros(0, device=self.device))  # fmt: skip
        entry = self._window.setdefault(
            phase, [torch.zeros_like(routing), torch.zeros_like(self._mtp), 0]
        )
        entry[0] += routing
        entry[1] += self._mtp
        entry[2] += micro_batches
        self._mtp.zero_()

    def window_record(self) -> dict:
        """The window's statistics, reduced over all ranks (every rank must call it), then
        reset: ``{"mtp_<k>_loss": ..., "routing": {phase: {layer: {...}}}}``."""
        if not self.enabled or not self._window:
            return {}
        phases = sorted(self._window)
        flat = torch.cat(
            [torch.cat([e[0].flatten(), e[1].flatten()]) for e in map(self._window.get, phases)]
        )
        dist.all_reduce(flat)
        flat = flat.cpu()
        record: dict = {}
        routing: dict = {}
        mtp = torch.zeros_like(self._mtp, device="cpu")
        offset = 0
        for phase in phases:
            sums, mtp_sums, micro = self._window[phase]
            part = flat[offset : offset + sums.numel()].view_as(sums)
            offset += sums.numel()
            mtp += flat[offset : offset + mtp_sums.numel()].view_as(mtp_sums)
            offset += mtp_sums.numel()
            if self.routing is not None:
                routing[phase] = self.routing.records(part, micro, self.dp)
        for k in range(self.mtp_depths):
            if mtp[k, 1] > 0:
                record[f"mtp_{k + 1}_loss"] = float(mtp[k, 0] / mtp[k, 1])
        if routing:
            record["routing"] = routing
        self._window = {}
        return record
