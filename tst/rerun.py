"""Megatron-LM's rerun engine in this trainer's step (``--rerun-mode`` and its flags).

megatron-core's ``RerunStateMachine`` decides whether a step's forward-backward runs again
and how a run ends; this module gives it what Megatron-LM's training loop gives it:

- the validations of Megatron-LM's ``pretrain_gpt.py`` loss function, per micro-batch on
  the last pipeline stage (NaN and Inf, fatal; with ``--check-for-spiky-loss`` a loss 10x
  above the largest of the first 100, not fatal), and megatron-core's own checks of each
  gradient bucket's norm in DDP (``--check-for-large-grads`` adds the large-norm one);
- the state a re-run must start from: the micro-batches (read once per step and replayed),
  the RNG tracker's states, and what megatron-core changes inside the forward-backward
  itself: the aux-loss-free router's expert bias and token counts, which its
  ``finalize_model_grads`` updates (restored, so a re-run sees the step's starting bias);
- a checkpoint at the step's start (data position included) when the machine asks to
  re-run the step on another GPU (exit code 16), and the machine's state in it, gathered
  from every rank; a resumed run re-runs the step and ends as the machine decides (17 when
  a result failed validation, 16 again when it landed on the same GPU);
- for whatever launches the job again, a record of how the run ended
  (``<--save>/rerun_exit.json``: the exit code, the nodes whose result was rejected, and
  what to do next), which a launcher cannot get from the exit code alone: torchrun turns a
  worker's 16 or 17 into its own 1. ``examples/train_slurm.sbatch`` requeues the job
  without those nodes.

Iterations are counted as this trainer logs them (1-based step numbers), in the tracker
file too. Deliberate differences from Megatron-LM 0.16.1, each a defect there:
``report_stats`` is accepted (Megatron-LM builds ``RerunMode("report_stats")``, which has no
such member) and its report names each validation by its message (megatron-core's report
reads fields ``Caller`` does not have); an exit-17 checkpoint does not carry the machine's
state (resuming it would restore a state never saved in this process); iterations read from
the tracker file skip the rejected step itself, not the one after it.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from tst.errors import ConfigError
from tst.rerun_record import EXIT_RECORD

__all__ = [
    "EXIT_RECORD",
    "RerunEngine",
    "node_name",
    "SPIKY_LOSS_FACTOR",
    "iterations_from_tracker_file",
    "expert_bias_routers",
    "router_state",
    "restore_router_state",
]

SPIKY_LOSS_FACTOR = 10  # Megatron-LM's pretrain_gpt.py


def node_name() -> str:
    """This process's node as the scheduler names it (Slurm's node name, which
    ``--exclude`` takes), else the host name (megatron-core's own notion of a node)."""
    return os.environ.get("SLURMD_NODENAME") or os.uname()[1]


def iterations_from_tracker_file(path: str) -> list[int]:
    """Step numbers (1-based) the tracker file says to skip: rejected twice on the same rank
    with reruns disabled or reproducibly (megatron-core's rule; an iteration rejected on
    several ranks of one job is not skipped). An absent file holds none."""
    from megatron.core.rerun_state_machine import RerunStateMachine

    if not os.path.exists(path):
        return []
    return RerunStateMachine.get_skipped_iterations_from_tracker_file(path)


def expert_bias_routers(raw_chunks) -> list:
    """The aux-loss-free routers (``--moe-router-enable-expert-bias``): megatron-core's
    ``finalize_model_grads`` updates their bias inside the step's forward-backward."""
    return [
        m for chunk in raw_chunks for m in chunk.modules()
        if getattr(m, "expert_bias", None) is not None
    ]  # fmt: skip


def router_state(routers: list) -> list:
    """Copies of each router's expert bias and token counts."""
    return [
        (r.expert_bias.detach().clone(), r.local_tokens_per_expert.detach().clone())
        for r in routers
    ]


@torch.no_grad()
def restore_router_state(routers: list, state: list) -> None:
    for router, (bias, counts) in zip(routers, state, strict=True):
        router.expert_bias.copy_(bias)
        router.local_tokens_per_expert.copy_(counts)


class RerunEngine:
    """megatron-core's rerun state machine for one run; one instance per process."""

    def __init__(self, cfg, raw_chunks, print_fn, report_interval: int) -> None:
        from megatron.core import rerun_state_machine as rsm

        r = cfg.rerun
        self.mode = r.mode
        self.check_nan = r.check_for_nan_in_loss_and_grad
        self.check_spiky = r.check_for_spiky_loss
        self._print = print_fn
        self._report_interval = max(1, report_interval)
        self._routers = expert_bias_routers(raw_chunks)
        modes = {
            "disabled": rsm.RerunMode.DISABLED,
            "validate_results": rsm.RerunMode.VALIDATE_RESULTS,
            "report_stats": rsm.RerunMode.REPORT_DETERMINISM_STATS,
        }
        rsm.destroy_rerun_state_machine()  # a previous run's, in this process
        try:
            rsm.initialize_rerun_state_machine(
                state_save_func=self._save_state,
                state_restore_func=self._restore_state,
                mode=modes[self.mode],
                error_injector=rsm.RerunErrorInjector(
                    error_injection_rate=r.error_injection_rate,
                    error_injection_type=rsm.RerunDiagnostic(r.error_injection_type),
                ),
                result_rejected_tracker_filename=r.result_rejected_tracker_filename,
            )
        except RuntimeError as e:
            raise ConfigError(
                f"--result-rejected-tracker-filename {r.result_rejected_tracker_filename}: "
                f"cannot be appended to ({e}): give a writable path"
            ) from e
        self.machine = rsm.get_rerun_state_machine()
        self.machine._maybe_report_stats = self._report_stats
        self._rsm = rsm

    @property
    def stops_at_first_non_finite(self) -> bool:
        """--rerun-mode disabled: Megatron-LM stops at the first rejected NaN / Inf."""
        return self.mode == "disabled" and self.check_nan

    # ------------------------------------------------------------------ the step

    def runs(self, iteration: int):
        """Yields once per forward-backward the machine asks for in the step begun after
        ``iteration`` completed ones."""
        m = self.machine
        # The machine adds one as it starts a step; a step resumed to be re-run is counted.
        resumed = m.state != self._rsm.RerunState.NOT_RUNNING_YET
        m.current_iteration = iteration + 1 if resumed else iteration
        runs = 0
        while m.should_run_forward_backward(None):
            runs += 1
            if runs > 1 or resumed:
                self._print(f"iteration {iteration + 1}: re-running the step "
                            f"(--rerun-mode {self.mode})")  # fmt: skip
            yield

    def validate(self, outputs: list[dict]) -> None:
        """Megatron-LM's loss validations, per micro-batch, on this rank's local loss sums
        (only the last pipeline stage has any). With reruns disabled a rejected result is
        recorded and warned about here, and the trainer stops every rank together."""
        m = self.machine
        fatal = self.mode != "disabled"
        for out in outputs:
            loss = out["loss"][0]
            if self.check_nan:
                m.validate_result(result=loss, rejection_func=torch.isnan,
                                  message="found NaN in local forward loss calculation",
                                  tolerance=0.0, fatal=fatal)  # fmt: skip
                m.validate_result(result=loss, rejection_func=torch.isinf,
                                  message="found Inf in local forward loss calculation",
                                  tolerance=0.0, fatal=fatal)  # fmt: skip
            if self.check_spiky:
                large = partial(m.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                context="loss")  # fmt: skip
                m.validate_result(result=loss, rejection_func=large, message="Spiky loss",
                                  tolerance=0.0, fatal=False)  # fmt: skip

    def outcome(self) -> tuple[bool, bool, int]:
        """(save a checkpoint, stop, exit code) after the step's forward-backward runs."""
        return self.machine.should_checkpoint_and_exit()

    def _save_state(self) -> dict:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        return {
            "rng_tracker": get_cuda_rng_tracker().get_states(),
            "routers": router_state(self._routers),
        }

    def _restore_state(self, state: dict) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["rng_tracker"])
        restore_router_state(self._routers, state["routers"])

    # ------------------------------------------------------------------ report_stats

    def _report_stats(self) -> None:
        """report_stats: every --log-interval steps, how far each validated value moved
        between a step's run and its re-run, over all ranks (collective)."""
        m = self.machine
        if m.current_iteration % self._report_interval:
            return
        local = {caller.message: stats for caller, stats in m.stats.items()}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        for stats in m.stats.values():
            stats.reset()
        messages = sorted({msg for part in gathered for msg in part})
        lines = []
        for msg in messages:
            total = self._rsm.QuickStats()
            total.combine([part[msg] for part in gathered if msg in part])
            lines.append(f"  {msg}: {total.print_stats()}")
        self._print(f"rerun report_stats up to iteration {m.current_iteration} (relative "
                    "difference of each value between a step's run and its re-run):\n"
                    + "\n".join(lines or ["  no validated value"]))  # fmt: skip

    def exit_record(self, code: int, iteration: int, checkpoint: str | None) -> dict:
        """How the engine ends the run at step ``iteration + 1``, for the launcher: the
        ranks whose validation rejected a result, their nodes, and what comes next:
        ``resume_elsewhere`` (resume from ``checkpoint`` on other nodes: 16, or a
        transient error whose step start was saved) or ``stop`` (a diagnosis is reached,
        the log says which; a person decides). Collective; the same on every rank."""
        m, states = self.machine, self._rsm.RerunState
        device = (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                  else "cpu")  # fmt: skip
        own = {"rank": dist.get_rank(), "node": node_name(), "host": os.uname()[1],
               "device": device, "rejected": m.failed_validation_call is not None}  # fmt: skip
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, own)
        rejected = [r for r in ranks if r["rejected"]]
        diagnosis = {
            (16, states.WILL_RERUN_FROM_CHECKPOINT): "reproducible on the same GPU: re-run "
            "the step on another to tell a faulty GPU from a real divergence",
            (16, states.RERUNNING_AGAIN_FROM_CHECKPOINT): "resumed on the same GPU as the "
            "first re-run: re-run the step on another",
            (17, states.RERUNNING_IN_PLACE): "transient: the re-run on the same GPU gave "
            "another result (a faulty GPU; the data and the model are fine)",
            (17, states.RERUNNING_FROM_CHECKPOINT): "re-run on another GPU: a persistent "
            "error of the first GPU or a correct result (an application error); the log says "
            "which",
        }.get((code, m.state), f"the machine's state {m.state.name}")
        # 16 asks for the step to be re-run elsewhere; a transient error's step start is
        # clean (no machine state in it) and trains on elsewhere.
        resumable = checkpoint is not None and (
            code == 16 or (code == 17 and m.state == states.RERUNNING_IN_PLACE)
        )
        return {
            "exit_code": code,
            "iteration": iteration + 1,
            "rerun_state": m.state.name,
            "diagnosis": diagnosis,
            "next": "resume_elsewhere" if resumable else "stop",
            "nodes": sorted({r["node"] for r in rejected}),
            "rejected_ranks": [r["rank"] for r in rejected],
            "checkpoint": checkpoint,
            "ranks": ranks,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }

    # ------------------------------------------------------------------ checkpoints

    @property
    def rerun_pending(self) -> bool:
        """The step is to be re-run from the checkpoint saved now (on another GPU)."""
        return self.machine.state == self._rsm.RerunState.WILL_RERUN_FROM_CHECKPOINT

    def state_dict(self) -> dict:
        """The machine's state for a checkpoint: the same on every rank (each rank's own
        part gathered into a list by rank). Collective."""
        m = self.machine
        call = m.failed_validation_call
        injector = m.error_injector.state_dict()
        own = {
            "rerun_requested": m.rerun_requested,
            "checkpoint_requested": m.checkpoint_requested,
            "restart_again_requested": m.restart_again_requested,
            "continue_requested": m.continue_requested,
            "error_injector": {
                "error_injection_rate": injector["error_injection_rate"],
                "error_injection_type": injector["error_injection_type"].value,
                "injected_error_type": (None if injector["injected_error_type"] is None
                                        else injector["injected_error_type"].value),
            },  # fmt: skip
            "failed_validation_call": (None if call is None
                                       else [call.caller.message, call.caller.rank,
                                             call.sequence]),
            "initial_result": (None if m.initial_result is None
                               else float(m.initial_result.detach().float().item())),
            "suspicious_node": m.suspicious_node,
            "suspicious_device": (None if m.suspicious_device is None
                                  else str(m.suspicious_device)),
            "large_value_counts": dict(m.large_value_counts),
            "max_values": dict(m.max_values),
        }  # fmt: skip
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, own)
        return {"mode": m.mode.value, "state": m.state.value,
                "current_iteration": m.current_iteration, "ranks": ranks}  # fmt: skip

    def load_state_dict(self, saved: dict, rank: int, device: torch.device) -> None:
        """Resume the machine's state from :meth:`state_dict` (same world size)."""
        rsm = self._rsm
        own = dict(saved["ranks"][rank])
        call = own.pop("failed_validation_call")
        injector = own.pop("error_injector")
        result = own.pop("initial_result")
        device_name = own["suspicious_device"]
        own.update(
            failed_validation_call=(None if call is None
                                    else rsm.Call(rsm.Caller(call[0], call[1]), call[2])),
            initial_result=(None if result is None
                            else torch.tensor(result, dtype=torch.float32, device=device)),
            error_injector_checkpoint={
                "error_injection_rate": injector["error_injection_rate"],
                "error_injection_type": rsm.RerunDiagnostic(injector["error_injection_type"]),
                "injected_error_type": (None if injector["injected_error_type"] is None
                                        else rsm.RerunDiagnostic(injector["injected_error_type"])),
            },
            suspicious_device=(int(device_name) if device_name is not None
                               and device_name.isdigit() else device_name),
            data_iterator_checkpoints=None,  # the data position is the checkpoint's own
        )  # fmt: skip
        self.machine.load_state_dict(
            {
                "mode": rsm.RerunMode(saved["mode"]),
                "state": rsm.RerunState(saved["state"]),
                "current_iteration": saved["current_iteration"],
                "sharded": own,
            }  # fmt: skip
        )
