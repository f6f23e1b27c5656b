"""The TST training loop on megatron-core: model, optimizer, schedule, phases, checkpoints.

One step = ``num_microbatches`` micro-batches through ``get_forward_backward_func`` (no
pipelining, 1F1B or interleaved), megatron-core DDP gradient reduction and its optimizer.
Losses come back from the last stage as (sum, count) and are normalised once over the
global batch (``calculate_per_token_loss``), so gradient accumulation, DP and PP are exact.

The phase of a step is :meth:`PhaseSchedule.phase_at`; a step of either phase sends
``[L, b, h]`` between pipeline stages, so switching needs no new communication plan: the
first stage changes its embedding's bag size, the last stage its targets and loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

from tst import checkpointing, grad_dumps, megatron_fixes, qk_clip, rerun, rerun_record
from tst.config import Config
from tst.data.batch import PAPER, batch_for_phase, document_positions_and_mask
from tst.data.context_parallel import kept_positions, split_for_context_parallel
from tst.errors import NonFiniteLossError, RunError
from tst.fsdp import (
    check_checkpointable,
    fsdp2_model_chunk,
    is_sharded,
    reduced_gradients,
    reshard,
)
from tst.losses import (
    global_slot_counts,
    paper_form_slot_weights,
    slot_weights_for,
    vocab_parallel_multi_hot_cross_entropy,
    vocab_parallel_multi_hot_cross_entropy_alt,
)
from tst.megatron_config import transformer_config, use_transformer_engine
from tst.metrics import (
    MetricsWriter,
    PeakRate,
    flops_per_position,
    git_hash,
    library_versions,
)
from tst.model import ModelShape, apply_phase, build_model_chunks
from tst.mtp import take_mtp_stats
from tst.optim import build_scheduler, ddp_config, optimizer_config, optimizer_overrides
from tst.phases import RECOVERY, SUPERPOSITION, Phase
from tst.plan import RunPlan
from tst.platform import Layout
from tst.processes import STOP_SIGNALS
from tst.train_stats import RoutingMonitor, StepStats

__all__ = ["NonFiniteLossError", "Trainer"]

# The timers Megatron-LM's training log names, by --timing-log-level (its training.py).
TIMERS_LEVEL_1 = (
    "forward-backward", "layernorm-grads-all-reduce", "embedding-grads-all-reduce",
    "all-grads-sync", "params-all-gather", "optimizer-copy-to-main-grad",
    "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad", "optimizer-count-zeros",
    "optimizer-inner-step", "optimizer-copy-main-to-model-params", "optimizer",
)  # fmt: skip
TIMERS_LEVEL_2 = (
    "batch-generator", "forward-compute", "backward-compute", "forward-recv", "forward-send",
    "backward-recv", "backward-send", "forward-send-forward-recv", "forward-send-backward-recv",
    "backward-send-forward-recv", "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
)  # fmt: skip

_LOSSES = {
    "mce": vocab_parallel_multi_hot_cross_entropy,
    "mce-alt": vocab_parallel_multi_hot_cross_entropy_alt,
    "lm": vocab_parallel_multi_hot_cross_entropy,  # one target slot: ordinary CE
}


@contextlib.contextmanager
def _activation_offload_paused(config):
    """Fine-grained activation offloading off for an evaluation: megatron-core's offload
    manager records each training step's micro-batches (the first step's, as its plan) and
    knows no forward-only pass; an evaluation's forwards between two steps were taken for
    the next step's and broke its backward ("Chunk mismatch"). Nothing is kept for a
    backward in an evaluation, so nothing is lost by pausing it."""
    if not getattr(config, "fine_grained_activation_offloading", False):
        yield
        return
    from megatron.core.pipeline_parallel import fine_grained_activation_offload as offload

    config.fine_grained_activation_offloading = False  # the model's forwards read it
    offload.fine_grained_offloading_disable_offload()
    try:
        yield
    finally:
        config.fine_grained_activation_offloading = True
        offload.fine_grained_offloading_enable_offload()


class Trainer:
    """Builds everything for one run and trains it; one instance per process."""

    def __init__(self, cfg: Config, layout: Layout, plan: RunPlan, tokenizer, datasets):
        from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.timers import Timers
        from megatron.core.transformer.module import Float16Module

        from tst.data.stream import SampleStream
        from tst.init import initialize_layout_independent

        self.cfg, self.layout, self.plan = cfg, layout, plan
        self.tokenizer = tokenizer
        m, t, tst = cfg.model, cfg.training, cfg.tst
        if cfg.log.record_memory_history:  # before the model is built, as Megatron-LM
            _record_memory_history(cfg.log.memory_snapshot_path)
        self.energy = None
        if cfg.log.log_energy:  # a GPU or driver without the counter fails here, at start
            from tst.energy import EnergyMeter, nvml_energy_reader

            self.energy = EnergyMeter(nvml_energy_reader(layout.device))
        self.schedule = plan.schedule
        self.bag_size = self.schedule.data_bag_size  # units per big sample of the data
        self.seq_length = m.seq_length
        # Per target bag size: a multi-stage schedule scores bags of several sizes.
        self.slot_weights = {
            p.target_bag: slot_weights_for(tst.tst_slot_weights, p.target_bag)
            for p in self.schedule.phases
            if p.target_bag > 1
        }
        self.config = transformer_config(cfg, plan, layout)
        if self.config.fine_grained_activation_offloading:
            from megatron.core.pipeline_parallel.fine_grained_activation_offload import (
                PipelineOffloadManager,
            )

            # A process-wide singleton that learns the run's micro-batches at its first
            # step: a fresh one for each run (an earlier run's in this process would not fit).
            PipelineOffloadManager.reset_instance()
        # megatron-core's timers (--timing-log-level): its schedules (forward-backward and
        # below), gradient reductions and optimizer parts time themselves through the
        # configs; the data read and the optimizer step as a whole are timed here.
        self.timers = Timers(cfg.log.timing_log_level, cfg.log.timing_log_option)
        self.config.timers = self.timers
        self.config.barrier_with_L1_time = cfg.log.barrier_with_L1_time  # forward-backward's
        self.shape = ModelShape.from_config(
            m,
            plan.padded_vocab_size,
            use_transformer_engine(cfg, layout),
            on_gpu=layout.device.type == "cuda",
            context_parallel=plan.grid.cp > 1,
        )
        if cfg.data.reset_attention_mask and self.shape.use_transformer_engine:
            self.shape = dataclasses.replace(self.shape, arbitrary_attention_mask=True)
        chunks = build_model_chunks(self.config, self.shape, plan.vpp, layout.device,
                                    meta=t.init_model_with_meta_device)  # fmt: skip
        written = initialize_layout_independent(chunks, self.config, t.seed, layout)
        params = sum(1 for c in chunks for _ in c.parameters())
        if written != params:  # with a meta build, an unwritten one would hold garbage
            raise RuntimeError(f"{params - written} of {params} parameters were not initialised")
        self.raw_chunks = chunks
        if m.qk_clip or m.log_max_attention_logit:
            qk_clip.record_max_logits(chunks)  # the local attention's (TE records its own)
        if t.bf16 or t.fp16:
            chunks = [Float16Module(self.config, c) for c in chunks]
        if cfg.parallel.use_torch_fsdp2:  # one chunk: no pipeline parallelism with FSDP2
            after_forward = cfg.parallel.torch_fsdp2_reshard_after_forward
            self.model = [fsdp2_model_chunk(self.config, c, after_forward) for c in chunks]
            if cfg.run.save or cfg.run.load:
                for chunk in self.raw_chunks:
                    check_checkpointable(chunk, self.config.gated_linear_unit)
        else:
            ddp = ddp_config(cfg, sum(p.numel() for c in chunks for p in c.parameters()))
            # Megatron-LM's bucketing: the first chunk's only (the others' communication
            # overlaps compute anyway), none when the optimizer step starts its all-gather.
            whole = cfg.parallel.overlap_param_gather_with_optimizer_step
            self.model = [
                DistributedDataParallel(
                    config=self.config, ddp_config=ddp, module=c, disable_bucketing=i > 0 or whole
                )
                for i, c in enumerate(chunks)
            ]
        opt_config = optimizer_config(cfg)
        opt_config.timers = self.timers
        self.optimizer = get_megatron_optimizer(
            opt_config, self.model, config_overrides=optimizer_overrides(opt_config, self.config),
            use_gloo_process_groups=cfg.parallel.enable_gloo_process_groups,
            dump_param_to_param_group_map=t.dump_param_to_param_group_map,
        )  # fmt: skip
        megatron_fixes.fix_expert_optimizer(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg, plan)
        if tst.tst_restart_schedule_at_switch:
            self._recovery_schedule_steps()  # refuse a warm-up that cannot fit, at start
        self._wire_overlap(finalize_model_grads)

        train, valid, test = datasets
        mbs, dp = t.micro_batch_size, layout.dp
        self.train_stream = SampleStream(
            train, m.seq_length, self.bag_size, mbs, layout.dp_rank, dp
        )
        # The validation split: one dataset, or one per prefix (--multiple-validation-sets).
        self.valid_sets = valid if isinstance(valid, list) else [] if valid is None else [valid]
        self.named_valid_sets = isinstance(valid, list)
        names = cfg.log.validation_set_names
        if self.named_valid_sets and names is not None and len(names) != len(self.valid_sets):
            raise ValueError(
                f"--validation-set-names gives {len(names)} names for "
                f"{len(self.valid_sets)} validation sets (--valid-data-path prefixes): give one "
                "name per prefix, in order"
            )
        self.valid_set_names = names or [str(k) for k in range(len(self.valid_sets))]
        self.test = test  # evaluated once at the end of a run that completes, as Megatron-LM does
        self.eval_iters = [cfg.log.eval_iters] * len(self.valid_sets)  # global batches, per set
        self.iteration = 0
        log = cfg.log
        wandb = dict(project=log.wandb_project, name=log.wandb_exp_name,
                     save_dir=log.wandb_save_dir, entity=log.wandb_entity, config=cfg.to_dict())  # fmt: skip
        skip = frozenset() if log.log_loss_scale_to_tensorboard else frozenset({"loss_scale"})
        self.writer = MetricsWriter(layout.rank == 0, log.metrics_file, log.tensorboard_dir,
                                    log.tensorboard_log_interval, wandb, skip)  # fmt: skip
        self.flops_per_position = flops_per_position(cfg, plan.padded_vocab_size)
        self.peak = PeakRate(cfg.log.peak_tflops, layout.device.type, measure=layout.rank == 0)
        self._stop_signal = None
        self._memory_report_due = True  # at the first logged steps, as Megatron-LM does
        self._gc_state: _ManualGC | None = None  # set by train(); _finish() restores Python's gc
        self._stop_votes = [0.0, 0.0]  # summed over ranks by each training step
        self.async_saves = None  # megatron-core's queue of pending saves (--async-save)
        # --ckpt-assume-constant-structure: the writer and its cached plans, between saves.
        self._save_structure = {} if cfg.run.ckpt_assume_constant_structure else None
        if cfg.run.async_save and cfg.run.save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            if cfg.run.use_persistent_ckpt_worker:
                checkpointing.use_persistent_writer_loop()
            self.async_saves = AsyncCallsQueue(persistent=cfg.run.use_persistent_ckpt_worker)
        self._saves_pending: dict[int, str] = {}
        # --load, or its non-persistent folder when that holds the newer checkpoint (load()).
        self.load_dir = cfg.run.load
        self.start_time = time.time()
        self.elapsed_before = 0.0
        # Megatron-LM's consumed / skipped train samples (skipped: a global batch decreased by
        # --decrease-batch-size-if-needed); checkpointed, as a resume may run another batch.
        self.trained_samples = self.skipped_samples = 0
        self._dgrads = None  # --save-dgrads-interval's recorder, during a recorded step
        self._transitions = frozenset(cfg.run.transition_iterations())  # parsed once
        routing = (RoutingMonitor(self.raw_chunks, self.config, layout.device)
                   if m.num_experts else None)  # fmt: skip
        self.step_stats = StepStats(routing, self.config.mtp_num_layers or 0, layout.dp,
                                    layout.device)  # fmt: skip
        self._routers = rerun.expert_bias_routers(self.raw_chunks)
        self.rerun = None  # megatron-core's rerun engine (--rerun-mode and its flags)
        if cfg.rerun.engine_on:  # it replaces a previous run's machine in this process
            self.rerun = rerun.RerunEngine(cfg, self.raw_chunks, self.writer.print,
                                           log.log_interval)  # fmt: skip
        else:
            from megatron.core.rerun_state_machine import destroy_rerun_state_machine

            destroy_rerun_state_machine()  # a previous run's, in this process
        self.iterations_to_skip = self._iterations_to_skip()

    def _iterations_to_skip(self) -> frozenset[int]:
        """--iterations-to-skip (completed-iteration counts, Megatron-LM's), and the steps
        the --result-rejected-tracker-filename file names (1-based: the step itself)."""
        r = self.cfg.rerun
        skip = set(r.iterations_to_skip)
        if r.result_rejected_tracker_filename:
            steps = rerun.iterations_from_tracker_file(r.result_rejected_tracker_filename)
            if steps:
                self.writer.print(
                    f"--result-rejected-tracker-filename: steps {steps} were rejected twice "
                    "on the same rank; they are skipped"
                )
            skip |= {n - 1 for n in steps if n >= 1}
        return frozenset(skip)

    def _skip_iteration(self, phase: Phase) -> None:
        """Megatron-LM's --iterations-to-skip: the step's micro-batches are read and dropped
        (the data position moves on), its samples count as consumed and skipped, and no
        update is made (the LR schedule does not advance)."""
        for _ in range(self.plan.microbatches_at(self.iteration)):
            self.train_stream.next_micro_batch(phase.units_per_row)
        batch_size = self.plan.batch_size_at(self.iteration)
        self.iteration += 1
        self.trained_samples += batch_size
        self.skipped_samples += batch_size
        self.writer.print(f"iteration {self.iteration}: skipped (--iterations-to-skip or the "
                          f"tracker file): {batch_size} samples read and dropped")  # fmt: skip
        self.writer.write(
            {"iteration": self.iteration, "phase": phase.name, "skipped": True,
             "iteration_skipped": True, "loss": None, "elapsed_s": round(self.elapsed(), 3)},
            "train",
        )  # fmt: skip

    def _rerun_exit(self, result: dict) -> int:
        """The rerun engine stops the run after a rejected result: a checkpoint of the
        step's start when it asks for one (the step is re-run from it), and its exit code."""
        code, run = result["rerun_exit"], self.cfg.run
        where, saved = "", None
        if result["rerun_checkpoint"] and run.save:
            self.save()
            saved = checkpointing.checkpoint_dir(run.save, self.iteration)
            where = f"; saved a checkpoint of its start to {run.save}"
        elif result["rerun_checkpoint"]:
            where = "; no --save, so no checkpoint to resume it from"
        elif code == 16 and run.load:  # resumed on the same GPU: the same checkpoint again
            saved = checkpointing.checkpoint_dir(self.load_dir, self.iteration)
        record = self.rerun.exit_record(code, self.iteration, saved)
        why = {
            16: "resume from the checkpoint (on another GPU: the engine refuses the same "
            "one) to re-run this step and tell a faulty GPU from a real divergence",
            17: "a result failed validation (the log above says which, and whether the GPU "
            "or the run is at fault)",
        }.get(code, "see the log above")
        self.writer.print(f"iteration {self.iteration + 1}: the rerun engine stops the run with "
                          f"exit code {code}: {why}{where}")  # fmt: skip
        path = rerun_record.path(run.save) if run.save else None
        if path:
            nodes = ", ".join(record["nodes"]) or "none"
            self.writer.print(f"rerun exit record for the launcher: {path} (next: "
                              f"{record['next']}; rejected on node(s) {nodes})")  # fmt: skip
        self._finish()  # the checkpoint complete before the record names it
        if path and self.layout.rank == 0:
            rerun_record.write(run.save, record)
        return code

    def _wire_overlap(self, finalize_model_grads) -> None:
        """Hook megatron-core's DDP into the pipeline schedules, as Megatron-LM's loop does.

        ``no_sync`` holds gradient reduction back until the last micro-batch; with
        ``--overlap-grad-reduce`` the schedules start each bucket's reduction as soon as its
        gradients are complete (``grad_sync_func``, aligned over pipeline stages unless
        ``--no-align-grad-reduce``), and ``finalize_model_grads`` waits for them. With
        ``--overlap-param-gather`` the distributed optimizer's parameter all-gather runs in the
        next forward (pre-hooks, or ``param_sync_func`` when aligned).
        """
        p, config = self.cfg.parallel, self.config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        single = len(self.model) == 1

        def per_chunk(name: str):
            funcs = [getattr(chunk, name) for chunk in self.model]
            return funcs[0] if single else funcs

        config.no_sync_func = per_chunk("no_sync")
        if p.overlap_grad_reduce and p.align_grad_reduce:
            config.grad_sync_func = per_chunk("start_grad_sync")
        if p.overlap_param_gather and p.align_param_gather:
            config.param_sync_func = per_chunk("start_param_sync")
        self._param_sync_func = config.param_sync_func
        # Megatron-LM starts with the pre-hooks off (a bad load must not reach every rank
        # through the first all-gather) and turns them on after the first good step.
        self._pre_hooks_on = False
        if self._gathers_in_forward:
            for chunk in self.model:
                chunk.disable_forward_pre_hook(param_sync=False)
            config.param_sync_func = None

    @property
    def _gathers_in_forward(self) -> bool:
        p = self.cfg.parallel
        return p.use_distributed_optimizer and p.overlap_param_gather

    def _set_pre_hooks(self, on: bool, param_sync: bool = True) -> None:
        """Turn the distributed optimizer's forward pre-hooks on or off (evaluation, saves)."""
        if not self._gathers_in_forward or on == self._pre_hooks_on:
            return
        for chunk in self.model:
            if on:
                chunk.enable_forward_pre_hook()
            else:
                chunk.disable_forward_pre_hook(param_sync=param_sync)
        self.config.param_sync_func = self._param_sync_func if on else None
        self._pre_hooks_on = on

    # ---------------------------------------------------------------- data and loss

    def _batch(self, chunk: torch.Tensor, phase: Phase):
        """Rows from the stream -> (input ids, targets, loss mask) for this phase; with
        --eod-mask-loss the tokens after end-of-document tokens are no targets."""
        eod = self.tokenizer.eod if self.cfg.data.eod_mask_loss else None
        return batch_for_phase(chunk, phase, eod=eod)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A micro-batch's tensor on the run's device without waiting for the device: torch's
        blocking host-to-GPU copy synchronises the stream, which would leave the GPU idle
        after every copy until the host has queued the next kernels (Megatron-LM's batches
        are copied with ``non_blocking=True`` too). The copy is stream-ordered before every
        kernel that reads it; a pageable source is staged before the call returns."""
        return tensor.to(self.layout.device, non_blocking=True)

    def _forward_step(self, phase: Phase, data_iterator, model, return_schedule_plan=False):
        batch = next(data_iterator)
        b = batch.input_ids.shape[0]
        device = self.layout.device
        input_ids = None  # on the device: the whole rows where the document flags need them
        positions = torch.arange(self.seq_length, device=device).expand(b, -1)
        attention_mask = None
        data = self.cfg.data
        if data.reset_position_ids or data.reset_attention_mask:
            # Per document (Megatron-LM's rule, per bag in a bag phase), from the whole row:
            # every pipeline stage reads the same rows, so each builds the same mask.
            input_ids = self._to_device(batch.input_ids)
            doc_positions, attention_mask = document_positions_and_mask(
                input_ids, phase.input_bag, self.tokenizer.eod, data.reset_position_ids,
                data.reset_attention_mask,
            )  # fmt: skip
            if data.reset_position_ids:
                positions = doc_positions
        if self.layout.cp > 1:
            # This CP rank's 2 of 2 x CP chunks (megatron-core's load balancing), in whole
            # bags, with their global positions. The loss tokens counted below are this
            # rank's; megatron-core sums them, and the gradients, over DP x CP.
            batch, positions = split_for_context_parallel(batch, positions, self.layout.cp_group)
            input_ids = None  # the model reads this rank's share
            if attention_mask is not None:
                # The document mask's rows of this rank's queries; every key stays (the local
                # spec's CP attention gathers the keys back in sequence order).
                kept = kept_positions(self.seq_length, self.layout.cp, self.layout.cp_rank)
                attention_mask = attention_mask.index_select(2, self._to_device(kept))
        if input_ids is None:
            input_ids = self._to_device(batch.input_ids)
        targets, mask = self._to_device(batch.targets), self._to_device(batch.loss_mask)
        # The last stage scores the targets inside the model: [b, L] per-position losses.
        # The mask also reaches the model: the MTP depths roll it with their targets.
        if return_schedule_plan:
            # --overlap-moe-expert-parallel-comm: megatron-core's combined 1F1B schedule runs
            # the model as per-layer pieces, overlapping one micro-batch's expert all-to-all
            # with another's compute. The pieces are the model's own: the bag embedding
            # (its pre-process) and the phase's loss (its post-process).
            output = model.build_schedule_plan(input_ids, positions, attention_mask,
                                               labels=targets, loss_mask=mask)  # fmt: skip
        else:
            output = model(input_ids, positions, attention_mask=attention_mask, labels=targets,
                           loss_mask=mask)  # fmt: skip

        def loss_func(loss):
            # The MTP depths' statistics of this micro-batch: taken here, after its forward
            # (the combined 1F1B schedule runs the forward after this function returns).
            mtp = take_mtp_stats(model)
            if mtp is not None and self.layout.tp_rank == 0:
                self.step_stats.add_mtp(mtp)
            total = (loss * mask).sum()
            count = mask.sum()
            return total, count.int(), {"loss": torch.stack([total.detach(), count])}

        return output, loss_func

    def _run_schedule(self, batches, phase: Phase, forward_only: bool,
                      force_all_reduce: bool = False, micro_batch_size: int | None = None):  # fmt: skip
        from megatron.core.pipeline_parallel import get_forward_backward_func

        weights = self.slot_weights.get(phase.target_bag)  # None: uniform, or no bags
        form = {}
        if phase.loss == "mce" and phase.target_bag > 1 and phase.layout == PAPER:
            # The paper's per-slot average over the global batch (tst.losses): per-slot
            # weights from the step's valid-slot counts, summed over micro-batches and DP.
            counts, positions = global_slot_counts(
                [b.targets for b in batches], group=self.layout.dp_group, device=self.layout.device
            )
            weights = paper_form_slot_weights(counts, positions, weights)
            form = {"normalise_slot_weights": False}
        # Every target id was checked against the vocabulary on the host when its sample was
        # read (TSTGPTDataset), so the loss skips its own check (a device sync on a GPU); the
        # logits are dead after the loss, so fp32 ones double as its work buffer.
        loss = partial(
            _LOSSES[phase.loss],
            tp_group=self.layout.tp_group,
            slot_weights=weights,
            check_targets=False,
            # In place, to save memory; not while --save-dgrads-interval's hooks watch the
            # output layer (an in-place change of a hooked output breaks autograd).
            overwrite_logits=self._dgrads is None,
            **form,
        )
        apply_phase(self.model, phase, loss)
        iterators = [iter(batches) for _ in self.model]
        vpp = self.plan.vpp
        # megatron-core 0.16.1's interleaved schedule run forward only (an evaluation) with
        # overlapped p2p: with the warm-up / flush overlap it leaves a receive posted that
        # takes the next step's message (the next training step hung, every time at PP 4),
        # and with the steady-state overlap alone an evaluation hung now and then (PP 2, VPP
        # 2, uneven chunks, on a loaded machine). Evaluations send and receive in order and
        # wait for each (neither overlapped nor batched): nothing is left in flight.
        p2p = (self.config.overlap_p2p_comm, self.config.batch_p2p_comm,
               self.config.overlap_p2p_comm_warmup_flush)  # fmt: skip
        if forward_only:
            self.config.overlap_p2p_comm = self.config.batch_p2p_comm = False
            self.config.overlap_p2p_comm_warmup_flush = False
            # Evaluations are kept out of the training timers (as Megatron-LM does).
            self.config.timers = None
        try:
            return get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, phase),
                data_iterator=iterators if vpp else iterators[0],
                model=self.model if vpp else self.model[0],
                num_microbatches=len(batches),
                seq_length=self.seq_length,
                micro_batch_size=micro_batch_size or self.cfg.training.micro_batch_size,
                forward_only=forward_only,
                force_all_reduce=force_all_reduce,
            )
        finally:
            (self.config.overlap_p2p_comm, self.config.batch_p2p_comm,
             self.config.overlap_p2p_comm_warmup_flush) = p2p  # fmt: skip
            self.config.timers = self.timers
            if forward_only and self.cfg.parallel.use_torch_fsdp2:
                for chunk in self.model:  # no backward to reshard what the forward gathered
                    reshard(chunk)

    def _global_loss(self, outputs, *flags: float) -> list[float]:
        """[loss sum, count, *flags] summed over micro-batches and ranks, known on every rank.

        ``flags`` are per-rank votes that ride along in the same (single) all-reduce. The
        buffer lives on the run's device: NCCL reduces no CPU tensors.
        """
        device = self.layout.device
        local = torch.zeros(2 + len(flags), dtype=torch.float64, device=device)
        if self.layout.is_last_stage and self.layout.tp_rank == 0:
            for out in outputs:
                local[:2] += out["loss"].double()
        local[2:] = torch.tensor(flags, dtype=torch.float64, device=device)
        dist.all_reduce(local)
        return local.tolist()

    # ---------------------------------------------------------------- steps

    def _seed_step(self) -> None:
        """Reseed from (seed, iteration): a resumed run draws what the unbroken one drew;
        with --data-parallel-random-init each data-parallel rank from its own seed.

        Only a model that draws random numbers while training (dropout, the MoE router's
        input jitter or forced random routing) needs it; rebuilding megatron-core's RNG
        tracker costs a few milliseconds a step, so others skip it.
        """
        c = self.config
        if not (
            c.hidden_dropout
            or c.attention_dropout
            or c.moe_input_jitter_eps
            or c.moe_router_force_load_balancing
        ):
            return
        from tst.platform import seed_everything

        t = self.cfg.training
        seed = t.seed * 100_003 + self.iteration
        if t.data_parallel_random_init:
            # Mixed, not offset: torch's CPU generator keeps a seed's low 32 bits only.
            digest = hashlib.blake2b(f"{seed}/{self.layout.dp_rank}".encode(), digest_size=8)
            seed = int.from_bytes(digest.digest(), "little")
        seed_everything(seed % 2**63, self.layout)

    def train_step(self, phase: Phase) -> dict:
        self._seed_step()
        data_start = self.train_stream.state_dict()
        timers, barrier = self.timers, self.cfg.log.barrier_with_L1_time
        timers("batch-generator", log_level=2).start()
        with profiled_region("tst: read data"):
            batches = [
                self._batch(self.train_stream.next_micro_batch(phase.units_per_row), phase)
                for _ in range(self.plan.microbatches_at(self.iteration))
            ]
        timers("batch-generator").stop()
        run = self.cfg.run
        step = self.iteration + 1  # 1-based, as the dumps are named
        wgrads = bool(run.save_wgrads_interval) and step % run.save_wgrads_interval == 0
        # megatron-core updates the aux-loss-free routers' bias inside the forward-backward:
        # a skipped step puts it back, as it leaves every weight.
        routers = rerun.router_state(self._routers) if self._routers else None
        # The rerun engine (--rerun-mode) may run the forward-backward again on the same
        # micro-batches; without it, once.
        for _ in self.rerun.runs(self.iteration) if self.rerun is not None else (None,):
            outputs, dumps = self._forward_backward(batches, phase, wgrads)
        if self.rerun is not None:
            checkpoint, stop, code = self.rerun.outcome()
            if stop:
                # The step did not happen: its data is read again by the run that resumes.
                self.train_stream.load_state_dict(data_start)
                return {"rerun_exit": code, "rerun_checkpoint": checkpoint}
        if "dgrads" in dumps:
            grad_dumps.save_grads(run.save, dumps["dgrads"].grads, step, "dgrads")
        if "activations" in dumps:
            grad_dumps.save_grads(run.save, dumps["activations"].activations, step, "activations")
        if "tokens_per_expert" in dumps:
            dumps["tokens_per_expert"].save(run.save, step)
        if wgrads:
            grad_dumps.save_grads(run.save, grad_dumps.weight_grads(self.raw_chunks), step,
                                  "wgrads")  # fmt: skip
        self._empty_cache(2)
        # One all-reduce per step carries the loss, the gradients' health and the stop votes.
        # Under fp16 the loss scaler owns the gradients' health: an overflow is how it learns
        # to lower the scale, so it must see them.
        fp16 = self.cfg.training.fp16
        with profiled_region("tst: loss and checks"):
            healthy = fp16 or self._gradients_finite()
            loss_sum, count, non_finite, *self._stop_votes = self._global_loss(
                outputs, float(not healthy), *self._local_stop_votes()
            )
        loss = loss_sum / max(count, 1)
        if not math.isfinite(loss) or non_finite:
            # Skip before the optimizer sees anything: weights, Adam moments and step count,
            # the LR schedule and the routers' expert bias stay as they were.
            if routers is not None:
                rerun.restore_router_state(self._routers, routers)
            return self._attention_logits(
                {"loss": loss, "skipped": True, "grad_norm": float("nan")}, stepped=False
            )
        timers("optimizer", log_level=1).start(barrier=barrier)
        with profiled_region("tst: optimizer"):
            update_ok, grad_norm, num_zeros = self.optimizer.step()
        stepped = bool(update_ok) and grad_norm is not None and math.isfinite(grad_norm)
        # Megatron-LM clips inside the optimizer's timer too.
        result = self._attention_logits({"loss": loss}, stepped)
        timers("optimizer").stop()
        if run.save_params_interval and step % run.save_params_interval == 0:
            self._dump_parameters(step)
        if fp16 and not update_ok:  # the scaler halved its scale; nothing was updated
            return {**result, "skipped": False, "overflow": True, "grad_norm": float("nan"),
                    "num_zeros": None}  # fmt: skip
        if not stepped:
            if routers is not None:
                rerun.restore_router_state(self._routers, routers)
            return {**result, "skipped": True, "grad_norm": float(grad_norm or float("nan"))}
        self.scheduler.step(increment=self.plan.batch_size_at(self.iteration))
        self._empty_cache(1)
        self.step_stats.commit(phase.name, len(batches))
        return {**result, "skipped": False, "overflow": False, "grad_norm": float(grad_norm),
                "num_zeros": num_zeros}  # fmt: skip

    def _attention_logits(self, result: dict, stepped: bool) -> dict:
        """--log-max-attention-logit / --qk-clip (collective): the step's largest attention
        logit into ``result``; the clip after a step that was applied."""
        m = self.cfg.model
        if m.qk_clip or m.log_max_attention_logit:
            result["max_attention_logit"] = qk_clip.after_step(
                self.raw_chunks, self.optimizer, m.qk_clip, stepped, self.layout.device
            )
        return result

    def _dump_parameters(self, step: int) -> None:
        """--save-params-interval: the weights the step's optimizer step left. Where the
        distributed optimizer gathers them in the next forward (--overlap-param-gather) they
        are gathered here first (Megatron-LM refuses the two together instead)."""
        if self._gathers_in_forward:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
        params = grad_dumps.parameters(self.raw_chunks)
        grad_dumps.save_grads(self.cfg.run.save, params, step, "params")

    def _forward_backward(self, batches, phase: Phase, wgrads: bool):
        """One forward-backward of the step's micro-batches from zeroed gradients: (the
        last stage's per-micro-batch losses, the recorders of the step's dumps by kind:
        --save-dgrads-interval's, --save-activations-interval's,
        --save-tokens-per-expert-interval's)."""
        run = self.cfg.run
        step = self.iteration + 1
        self.step_stats.begin_step()
        dumps = {kind: recorder(self.raw_chunks) for kind, every, recorder in (
            ("dgrads", run.save_dgrads_interval, grad_dumps.DataGradRecorder),
            ("activations", run.save_activations_interval, grad_dumps.ActivationRecorder),
            ("tokens_per_expert", run.save_tokens_per_expert_interval,
             grad_dumps.TokensPerExpertRecorder),
        ) if every and step % every == 0}  # fmt: skip
        self._dgrads = dumps.get("dgrads")
        for chunk in self.model:
            chunk.zero_grad_buffer()
            # Whole gradients on every rank for the dump (all-reduce, not reduce-scatter).
            chunk.force_all_reduce = wgrads
        self.optimizer.zero_grad()
        try:
            with profiled_region("tst: forward-backward"):
                outputs = self._run_schedule(batches, phase, forward_only=False,
                                             force_all_reduce=wgrads)  # fmt: skip
        finally:
            for chunk in self.model:
                chunk.force_all_reduce = False
            for recorder in dumps.values():
                recorder.remove()
            self._dgrads = None
        if self.rerun is not None:
            self.rerun.validate(outputs)
        return outputs, dumps

    def _empty_cache(self, level: int) -> None:
        """--empty-unused-memory-level: hand cached CUDA blocks back (Megatron-LM's points)."""
        if (
            self.cfg.training.empty_unused_memory_level >= level
            and self.layout.device.type == "cuda"
        ):
            torch.cuda.empty_cache()

    def _synchronize_device(self) -> None:
        """--train-sync-interval: wait for the accelerator's queued work (Megatron-LM's
        torch.cuda.synchronize); a CPU run's operations have finished when they return."""
        if self.layout.device.type == "cuda":
            torch.cuda.synchronize()

    def _gradients_finite(self) -> bool:
        """Whether this rank's reduced gradients are all finite (the step reduces the vote).

        megatron-core's bf16/fp32 optimizers clip and step whatever the gradients hold; only
        its fp16 loss scaler checks for inf/NaN. One NaN would reach every weight.
        """
        # The sum of a buffer is NaN/inf if any element is; a reduction needs no full-size
        # mask (an fp32 sum of real gradients cannot overflow to inf).
        sums = [grad.sum() for chunk in self.model for grad in reduced_gradients(chunk)]
        finite = not sums or bool(torch.isfinite(torch.stack(sums)).all())
        if not finite:  # every rank that sees it says so: the log names the ranks
            print(
                f"rank {self.layout.rank} (TP {self.layout.tp_rank}, PP {self.layout.pp_rank}, "
                f"DP {self.layout.dp_rank}): non-finite gradients at iteration "
                f"{self.iteration + 1}",
                flush=True,
            )
        return finite

    def _full_validation_iters(self, index: int) -> int:
        """--full-validation: the global batches of next-token rows validation set ``index``
        (one epoch, built whole) fills; the rows of a last, partial batch are not read (as
        Megatron-LM's data loader drops them)."""
        dataset = self.valid_sets[index]
        rows = len(dataset) * self.bag_size  # units of L + 1 tokens
        batch = self.plan.eval_batch_size
        name = "the validation split"
        if self.named_valid_sets:
            name = f"validation set {index} ({getattr(dataset, 'dataset_path', None)})"
        if rows < batch:
            raise ValueError(
                f"--full-validation: {name} holds {rows} sequences of {self.seq_length + 1} "
                f"tokens, fewer than one global batch ({batch}): give it more data (--split, "
                "--valid-data-path) or use a smaller --eval-global-batch-size"
            )
        left = (
            f" (the last {rows % batch}, fewer than a batch, are left out)" if rows % batch else ""
        )
        self.writer.print(
            f"--full-validation: each evaluation reads {rows // batch} global batches, "
            f"{rows // batch * batch} of {name}'s {rows} sequences{left}"
        )
        return rows // batch

    def evaluate(self, dataset, iters: int) -> float:
        """Held-out next-token loss on ``dataset`` over ``iters`` global batches."""
        total, count = self._loss_sums(dataset, iters)
        return total / max(count, 1)

    def _loss_sums(self, dataset, iters: int) -> tuple[float, float]:
        """Summed next-token loss and target count on ``dataset`` (from its start, the same
        rows at every call): ordinary inputs and targets, in either phase, over ``iters``
        global batches."""
        from tst.data.stream import SampleStream

        recovery = self.schedule.eval_phase()
        mbs, micro = self.plan.eval_micro_batch_size, self.plan.eval_microbatches
        stream = SampleStream(
            dataset, self.seq_length, self.bag_size, mbs, self.layout.dp_rank, self.layout.dp
        )
        # --num-workers read the evaluation's micro-batches ahead too (forked for this
        # evaluation, stopped after it): the same rows as reading them here.
        requests = iters * micro
        stream.start_workers(self.cfg.data.num_workers, [1] * requests)
        for chunk in self.model:
            chunk.eval()
        total = count = 0.0
        try:
            with torch.no_grad(), _activation_offload_paused(self.config):
                for _ in range(iters):
                    batches = [
                        self._batch(stream.next_micro_batch(1), recovery) for _ in range(micro)
                    ]
                    outputs = self._run_schedule(batches, recovery, forward_only=True,
                                                 micro_batch_size=mbs)  # fmt: skip
                    s, c = self._global_loss(outputs)
                    total, count = total + s, count + c
        finally:
            stream.close()
        for chunk in self.model:
            chunk.train()
        return total, count

    # ---------------------------------------------------------------- switch controls

    def _switch(self, phase: Phase) -> None:
        """Entering ``phase`` at a switch: the controls act at the switch to recovery only
        (a multi-stage schedule changes bag size between its bag stages without them)."""
        what = ("the recovery phase" if phase.name == RECOVERY
                else f"stage {phase.stage} (bag {phase.bag_size})")  # fmt: skip
        self.writer.print(
            f"iteration {self.iteration}: switching to {what} "
            f"(raw tokens so far {self.train_stream.consumed_raw_tokens})"
        )
        if phase.name == RECOVERY:
            self.apply_switch_controls()

    @torch.no_grad()
    def apply_switch_controls(self) -> None:
        """The paper's ablations and a restart, applied once at the phase switch (all off by
        default).

        ``--tst-reinit-embeddings-at-switch``: the input word embeddings and the output layer
        get their initial values again (the same layout-independent draw as step 0), so what
        they learned in the superposition phase is lost; ``--tst-reinit-input-embedding-at-
        switch`` / ``--tst-reinit-output-layer-at-switch`` do so for one of them (untied
        models only). Under bf16 the optimizer's fp32 main weights are reloaded from the model
        (rounding the other main weights to bf16 once).
        ``--tst-reset-optimizer-at-switch``: Adam's moments and step count go back to zero in
        place (the LR schedule is kept). ``--tst-restart-schedule-at-switch``: the same reset,
        and a fresh LR schedule for the recovery phase (:meth:`_restart_schedule`). All act
        before the first recovery step; a run resumed from a checkpoint taken at the switch
        applies them when it reaches it, as the unbroken run does.
        """
        tst = self.cfg.tst
        fresh_optimizer = tst.tst_reset_optimizer_at_switch or tst.tst_restart_schedule_at_switch
        heads = self._heads_to_reinit()
        if heads:
            from tst.init import initialize_layout_independent

            # Each tensor gets its step-0 draw again; a tied output copy on the last pipeline
            # stage is drawn as the embedding, so the two stay equal.
            initialize_layout_independent(
                self.raw_chunks, self.config, self.cfg.training.seed, self.layout,
                only=lambda name: name.endswith(heads),
            )  # fmt: skip
            self.optimizer.reload_model_params()
        if fresh_optimizer:
            inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
            for opt in (o.optimizer for o in inner if getattr(o, "optimizer", None)):
                for state in opt.state.values():
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                        if key in state:
                            state[key].zero_()
                    if torch.is_tensor(state.get("step")):
                        state["step"].zero_()
                    elif "step" in state:
                        state["step"] = 0
                for group in opt.param_groups:  # fused Adams keep the step per group
                    if "step" in group:
                        group["step"] = 0
        if tst.tst_restart_schedule_at_switch:
            self._restart_schedule()
        if heads or fresh_optimizer:
            self.writer.print(
                f"iteration {self.iteration}: switch controls applied (re-initialised: "
                f"{', '.join(heads) or 'none'}; optimizer state "
                f"reset: {fresh_optimizer}, LR schedule restarted: "
                f"{tst.tst_restart_schedule_at_switch})"
            )

    def _heads_to_reinit(self) -> tuple[str, ...]:
        """Parameter-name suffixes the --tst-reinit-*-at-switch flags re-initialise."""
        tst = self.cfg.tst
        both = tst.tst_reinit_embeddings_at_switch
        return tuple(
            name
            for name, on in (
                (
                    "embedding.word_embeddings.weight",
                    both or tst.tst_reinit_input_embedding_at_switch,
                ),
                ("output_layer.weight", both or tst.tst_reinit_output_layer_at_switch),
            )
            if on
        )

    def _recovery_schedule_steps(self) -> int:
        """Length of a schedule restarted at the switch, in the scheduler's unit (samples):
        the recovery phase's. Refuses a warm-up that does not fit in it."""
        switch, end = self.schedule.switch_iteration, self.plan.train_iters
        samples = self.plan.samples_between(switch, end)
        warmup = self.plan.lr_warmup_steps
        if 0 < switch < end and warmup >= samples:
            raise ValueError(
                f"--tst-restart-schedule-at-switch restarts the LR warm-up ({warmup} samples) "
                f"in the recovery phase, which has only {samples} samples ({end - switch} "
                "steps): lower --lr-warmup-iters (or --lr-warmup-samples / "
                "--lr-warmup-fraction), or give the recovery phase more steps"
            )
        return samples

    def _schedule_restarted_before(self, iteration: int) -> bool:
        """Whether a run at ``iteration`` has restarted its schedule (it does so just before
        the first recovery step, under --tst-restart-schedule-at-switch)."""
        switch = self.schedule.switch_iteration
        return self.cfg.tst.tst_restart_schedule_at_switch and 0 < switch < iteration

    def _restart_schedule(self) -> None:
        """A fresh LR schedule for the recovery phase (--tst-restart-schedule-at-switch).

        The run's own schedule (:func:`tst.optim.build_scheduler`: the same initial, peak and
        minimum LR, warm-up length and decay style) with its clock at zero, decaying over the
        recovery phase's samples, so it ends with the run. A checkpoint stores this schedule's
        state; a run resumed past the switch restarts it before loading that state, so it
        continues exactly.
        """
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg, self.plan, steps=self._recovery_schedule_steps()
        )

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        """The checkpoint's common state: identical on every rank (dist_checkpointing
        compares them), so the elapsed time is the slowest rank's."""
        elapsed = torch.tensor([self.elapsed()], dtype=torch.float64, device=self.layout.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        pending = {}
        if self.rerun is not None and self.rerun.rerun_pending:  # the same on every rank
            pending = {"rerun": {**self.rerun.state_dict(), "layout": self._rerun_layout()}}
        return {
            **pending,
            "iteration": self.iteration,
            "phase": self._phase_now().name,
            "stage": self._phase_now().stage,
            "data": self.train_stream.state_dict(),
            "samples": {"trained": self.trained_samples, "skipped": self.skipped_samples},
            "global_batch_size": self.plan.global_batch_size,
            "scheduler": self.scheduler.state_dict(),
            "elapsed_s": round(float(elapsed), 3),
            "config": self.cfg.to_dict(),
            "optimizer_layout": self._optimizer_layout(),
        }

    def _optimizer_layout(self) -> dict:
        grid = self.plan.grid
        run = self.cfg.run
        return checkpointing.optimizer_layout(
            self.cfg.parallel.use_distributed_optimizer,
            grid.tp,
            grid.pp,
            grid.vpp,
            grid.ep,
            grid.etp,
            fully_reshardable=run.dist_ckpt_optim_fully_reshardable,
            mem_efficient=run.distrib_optim_fully_reshardable_mem_efficient,
            first_chunk_apart=self.cfg.parallel.overlap_param_gather_with_optimizer_step,
        )

    def _phase_now(self) -> Phase:
        """The phase of the next step (of the last one once the run is done)."""
        return self.schedule.phase_at(min(self.iteration, self.plan.train_iters - 1))

    def save(self, directory: str | None = None, non_persistent: bool = False) -> None:
        """A checkpoint of this iteration into --save (or ``directory``); ``non_persistent``:
        into --non-persistent-global-ckpt-dir (SAVE/non_persistent by default), where it
        replaces the previous one once complete."""
        # The distributed optimizer's pending parameter gathers finish before the weights
        # are read (Megatron-LM does the same around its saves).
        hooks = self._pre_hooks_on
        self._set_pre_hooks(False)
        optimizer = None if self.cfg.run.no_save_optim else self.optimizer
        run = self.cfg.run
        # One save in flight at a time (Megatron-LM's rule too): the previous one completes
        # before this one's writer starts.
        self._finalize_saves(blocking=True)
        if non_persistent:
            directory = self.cfg.run.non_persistent_dir(run.save)
        path = checkpointing.save(directory or run.save, self.iteration, self.raw_chunks, optimizer,
                                  self.state(), run.ckpt_fully_parallel_save,
                                  self.async_saves,
                                  None if non_persistent else run.save_retain_interval,
                                  self._save_structure, newest_only=non_persistent,
                                  hash_all=run.verify_integrity)  # fmt: skip
        self._set_pre_hooks(hooks)
        kind = "non-persistent checkpoint" if non_persistent else "checkpoint"
        if self.async_saves is None:
            self.writer.print(f"saved {kind} {path} (iteration {self.iteration})")
        else:
            self._saves_pending[self.iteration] = path
            self.writer.print(f"saving {kind} {path} in the background (--async-save)")

    def convert_checkpoint(self) -> int:
        """--ckpt-convert-format / --ckpt-convert-save (Megatron-LM's): the loaded checkpoint
        saved again, at its iteration, into ``CKPT_CONVERT_SAVE/<format>``; no step is run."""
        run = self.cfg.run
        target = os.path.join(run.ckpt_convert_save, run.ckpt_convert_format)
        self.save(target)
        self._finish()
        self.writer.print(f"converted checkpoint: {run.load} (iteration {self.iteration}) -> "
                          f"{target} ({run.ckpt_convert_format}"
                          + (", weights only)" if run.no_save_optim else ")"))  # fmt: skip
        return 0

    def _load_rerun_state(self, saved: dict) -> None:
        """A checkpoint the rerun engine saved to re-run its next step: the engine takes
        the step up again (each rank its own part of the state: on the same grid only)."""
        step = self.iteration + 1
        if self.rerun is None or self.rerun.mode == "disabled":
            self.writer.print(
                f"--load {self.cfg.run.load}: saved by the rerun engine to re-run step {step}; "
                "the engine is off in this run (no --rerun-mode, or disabled): it trains on "
                "from there as usual"
            )
            return
        now = self._rerun_layout()
        if saved.get("layout") != now:
            # Megatron-LM's rule: each rank's part of the state belongs to its place in the
            # grid; under another layout the step is not re-run.
            self.writer.print(
                f"--load {self.cfg.run.load}: saved by the rerun engine to re-run step {step} "
                f"at (world, TP, PP, DP) {tuple(saved.get('layout') or ())}, this run is at "
                f"{tuple(now)}: Job sharding has changed: Rerun state will be ignored (as "
                "Megatron-LM does); it trains on from there as usual"
            )
            return
        self.rerun.load_state_dict(saved, self.layout.rank, self.layout.device)
        self.writer.print(f"--load: the rerun engine re-runs step {step} "
                          f"(--rerun-mode {self.rerun.mode})")  # fmt: skip

    def _rerun_layout(self) -> list[int]:
        """(world, TP, PP, DP): the grid a rerun checkpoint's per-rank state belongs to."""
        lay = self.layout
        return [lay.world_size, lay.tp, lay.pp, lay.dp]

    def _check_replicas_agree(self) -> None:
        """--check-weight-hash-across-dp-replicas-interval: every data-parallel replica holds
        the same weights (each parameter's SHA-1 compared with data-parallel rank 0's; routed
        experts over the expert-data-parallel group). Collective; a difference on any rank
        stops every rank, naming the parameters."""
        hooks = self._pre_hooks_on
        self._set_pre_hooks(False)  # the distributed optimizer's pending gathers finish first
        differing = _replica_weight_mismatches(self.raw_chunks, self.layout.device)
        self._set_pre_hooks(hooks)
        count = torch.tensor([float(len(differing))], device=self.layout.device)
        dist.all_reduce(count)
        if count.item():
            shown = "; ".join(differing[:5]) or "on other ranks (see their output)"
            print(f"rank {self.layout.rank}: weights differ across data-parallel replicas after "
                  f"iteration {self.iteration}: {shown}", flush=True)  # fmt: skip
            raise RunError(
                f"the data-parallel replicas' weights differ after iteration {self.iteration} "
                f"({int(count.item())} parameter copies; the ranks printed which): a replica "
                "diverged (a faulty GPU or link, or a non-deterministic update). Resume from "
                "the last checkpoint; if it recurs, find the rank named and exclude its node"
            )
        self.writer.print(f">>> Weight hashes match after {self.iteration} iterations")

    def _finalize_saves(self, blocking: bool) -> None:
        """Complete the --async-save writes that are done on every rank (all of them when
        ``blocking``); each becomes the latest checkpoint only here. Collective."""
        if self.async_saves is None:
            return
        checkpointing.finalize_async_saves(self.async_saves, blocking)
        pending = self.async_saves.get_num_unfinalized_calls()
        for iteration in sorted(self._saves_pending)[: len(self._saves_pending) - pending]:
            path = self._saves_pending.pop(iteration)
            self.writer.print(f"saved checkpoint {path} (iteration {iteration}; written in the "
                              f"background, completed at iteration {self.iteration})")  # fmt: skip

    def load(self) -> None:
        """Resume from --load: everything (default), or only the weights (--finetune), or all
        but the optimizer state (--no-load-optim). A directory with no checkpoint at all
        starts the run from scratch, as Megatron-LM does (refused with
        --exit-on-missing-checkpoint), or from the weights of --pretrained-checkpoint when
        given (as --finetune loads them); a damaged one is refused."""
        run = self.cfg.run
        if self.cfg.model.moe_use_upcycling:
            self._upcycle()
            return
        self.load_dir, why = checkpointing.load_dir(run.load, run.non_persistent_ckpt_type,
                                                    run.non_persistent_global_ckpt_dir,
                                                    run.ckpt_step)  # fmt: skip
        if why:
            self.writer.print(why)
        source, finetune, how = self.load_dir, run.finetune, "--finetune"
        empty = source is None or checkpointing.find_checkpoint(source) is None
        if empty and run.ckpt_step is None and run.pretrained_checkpoint:
            source, finetune = run.pretrained_checkpoint, True
            how = f"--load {run.load}: no checkpoint there yet;" if run.load else "no --load;"
            how += " --pretrained-checkpoint"
            if checkpointing.find_checkpoint(source, "--pretrained-checkpoint") is None:
                raise ValueError(
                    f"--pretrained-checkpoint {source}: no checkpoint there (and none in --load "
                    f"{run.load}): give the directory a pretraining run saved into (--save), "
                    "the one holding latest_checkpointed_iteration.txt"
                )
        elif empty and run.ckpt_step is None:
            if run.exit_on_missing_checkpoint:
                raise ValueError(
                    f"--load {run.load}: no checkpoint there, and --exit-on-missing-checkpoint "
                    "asks not to start from scratch: check the path (or drop the flag)"
                )
            self.writer.print(f"--load {run.load}: no checkpoint there yet; starting from scratch")
            return
        finetune, how = self._foreign_start(source, finetune, how)
        weights_only = finetune or run.no_load_optim
        rates = self._group_rates()  # this run's, before the checkpoint's replace them
        common = checkpointing.load(source, self.raw_chunks,
                                    None if weights_only else self.optimizer,
                                    run.ckpt_fully_parallel_load,
                                    self._optimizer_layout(), run.ckpt_step,
                                    run.dist_ckpt_strictness, self.writer.print,
                                    run.verify_integrity,
                                    run.ckpt_load_validate_sharding_integrity,
                                    run.ckpt_fully_parallel_load_exchange_algo)  # fmt: skip
        self._settle_group_rates(rates)
        # An upcycled checkpoint (saved before any step) loads its weights only.
        upcycled = bool(common.get("upcycled"))
        if weights_only or upcycled:
            # The fp32 main weights of a mixed-precision optimizer follow the loaded model.
            self.optimizer.reload_model_params()
        if finetune:
            self.writer.print(
                f"{how}: loaded the weights of {source} (iteration {common['iteration']});"
                " iteration, optimizer, LR schedule and data position start fresh"
            )
            return
        if run.override_ckpt_iteration is not None:
            common = self._override_iteration(common)
        self._check_phase_order(common)
        saved_batch = common.get("global_batch_size")
        if run.phase_transition_iterations and saved_batch not in (
            None,
            self.plan.global_batch_size,
        ):
            raise checkpointing.CheckpointError(
                f"--phase-transition-iterations: the checkpoint in {run.load} was trained with a "
                f"global batch of {saved_batch}, this run's is {self.plan.global_batch_size}; "
                "every data phase needs the same global batch (Megatron-LM's rule): give "
                f"--global-batch-size {saved_batch}"
            )
        self.iteration = common["iteration"]
        self.writer.resume_at(self.iteration)
        self.train_stream.load_state_dict(common["data"])
        # Checkpoints from before the counts were kept: the plan's count at this batch.
        samples = common.get("samples", {"trained": self.plan.samples_before(self.iteration)})
        self.trained_samples = samples["trained"]
        self.skipped_samples = samples.get("skipped", 0)
        if self._schedule_restarted_before(self.iteration):
            self._restart_schedule()  # the checkpoint holds the restarted schedule's state
        self._load_scheduler(common["scheduler"])
        self.elapsed_before = common.get("elapsed_s", 0.0)
        if "rerun" in common:
            self._load_rerun_state(common["rerun"])
        self.writer.print(
            f"resumed from {self.load_dir} at iteration {self.iteration} ({common['phase']} phase)"
            + (" without its optimizer state (--no-load-optim)" if run.no_load_optim else "")
            + (" (upcycled with --moe-use-upcycling; the optimizer starts fresh)" if upcycled
               else "")
        )  # fmt: skip

    def _override_iteration(self, common: dict) -> dict:
        """--override-ckpt-iteration N (Megatron-LM 0.19's): the checkpoint's weights,
        optimizer and LR schedule, with the run's iteration and data position set to N's
        (the samples N steps read at this run's batch, as if from the start), e.g. to replay
        the data from an earlier step. Megatron-LM's rule: the checkpoint's global batch
        must be this run's. A step in another phase or bag stage than the checkpoint's is
        refused: the switch and its controls happen once, at their step."""
        run, plan = self.cfg.run, self.plan
        target, saved = run.override_ckpt_iteration, common["iteration"]
        flag = f"--override-ckpt-iteration {target}"
        _require_state(target <= plan.train_iters, f"{flag}: past --train-iters "
                       f"({plan.train_iters})")  # fmt: skip
        batch = common.get("global_batch_size")
        _require_state(batch in (None, plan.global_batch_size), f"{flag} replays the data from "
                       f"iteration {target} at this run's global batch ({plan.global_batch_size}), "
                       f"but the checkpoint was trained with {batch}: the data would start at the "
                       f"wrong sample; give --global-batch-size {batch}")  # fmt: skip
        here = self.schedule.phase_at(min(target, plan.train_iters - 1))
        there = self.schedule.phase_at(min(saved, plan.train_iters - 1))
        _require_state((here.name, here.stage) == (there.name, there.stage),
                       f"{flag}: the checkpoint (iteration {saved}) is in the {there.name} phase"
                       f"{f' stage {there.stage}' if there.stage else ''}, iteration {target} in "
                       f"the {here.name} phase{f' stage {here.stage}' if here.stage else ''}: an "
                       "override stays within the checkpoint's phase (the switch happens once, "
                       "at its step)")  # fmt: skip
        consumed = served = 0
        for phase in self.schedule.phases:
            if phase.start >= target:
                break
            rows = plan.samples_between(phase.start, min(phase.end, target))
            consumed = -(-consumed // phase.units_per_row) * phase.units_per_row
            consumed += rows * phase.units_per_row
            served += rows * phase.units_per_row
        data = {**common["data"], "consumed_units": consumed, "served_units": served}
        self.writer.print(f"{flag}: the checkpoint of iteration {saved} continues at iteration "
                          f"{target} ({plan.samples_before(target)} samples read)")  # fmt: skip
        return {**common, "iteration": target, "data": data,
                "samples": {"trained": plan.samples_before(target), "skipped": 0}}  # fmt: skip

    def _mup_line(self) -> str:
        """What muP does in this run, in one line (its derived settings)."""
        c, t = self.config, self.cfg.training
        m = c.mup_width_mult
        rates = (f"vector-like parameters at lr x {m:g}" if t.optimizer == "sgd"
                 else f"hidden matrices at lr x {1 / m:g}, eps x {1 / m:g}")  # fmt: skip
        return (f"muP: width multiplier {m:g} (--hidden-size {c.hidden_size} / base "
                f"{self.cfg.mup.mup_base_hidden_size or c.hidden_size}); {rates}; hidden init "
                f"std / {math.sqrt(m):.4g}; logits x {c.mup_output_mult:g}, embeddings x "
                f"{c.mup_embedding_mult:g}, softmax scale "
                + (f"{c.softmax_scale:.4g}" if c.softmax_scale is not None
                   else "MLA's own (megatron-core's MLA ignores muP's)"))  # fmt: skip

    def _group_rates(self) -> list[tuple]:
        """Each optimizer parameter group's peak and final learning rate (``max_lr`` /
        ``min_lr``: --lr / --min-lr, or --decoupled-lr / --decoupled-min-lr for the embedding
        and output weights), which megatron-core's scheduler reads from the group."""
        return [(g.get("max_lr"), g.get("min_lr")) for g in self.optimizer.param_groups]

    def _settle_group_rates(self, ours: list[tuple]) -> None:
        """Loading optimizer state replaces the groups' settings with the checkpoint's, their
        learning rates too: a new --lr or --decoupled-lr was then ignored, even with
        --override-opt_param-scheduler (whose log line named the new peak). The flags win
        with that flag, the checkpoint with --use-checkpoint-opt_param-scheduler; without
        either, a difference is refused as the scheduler's own check refuses one."""
        run, groups = self.cfg.run, self.optimizer.param_groups
        saved = self._group_rates()
        if saved == ours:
            return
        if run.override_opt_param_scheduler:
            for group, (peak, final) in zip(groups, ours, strict=True):
                group["max_lr"], group["min_lr"] = peak, final
        elif not run.use_checkpoint_opt_param_scheduler:

            def listed(rates):
                return ", ".join(f"{peak:g} -> {final:g}" for peak, final in rates)

            raise ValueError(
                f"--load {run.load}: the checkpoint's learning rates per parameter group (peak "
                f"-> final: {listed(saved)}) differ from this run's flags ({listed(ours)}; "
                "--lr / --min-lr, --decoupled-lr / --decoupled-min-lr); pass "
                "--override-opt_param-scheduler to follow the flags from here on, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            )

    def _foreign_start(self, source: str, finetune: bool, how: str) -> tuple[bool, str]:
        """Another trainer's checkpoint (Megatron-LM's legacy ``--ckpt-format torch``, what
        its converter writes, or a torch_dist one Megatron-LM saved) starts a run from its
        weights, never resumes one: its optimizer, scheduler and data position are another
        trainer's. A legacy "release" checkpoint loads that way by itself (as in
        Megatron-LM); any other needs --finetune or --pretrained-checkpoint."""
        run = self.cfg.run
        step = run.ckpt_step if source == run.load else None
        iteration = checkpointing.latest_iteration(source) if step is None else step
        if finetune or not checkpointing.is_foreign(source, iteration):
            return finetune, how
        path = checkpointing.checkpoint_dir(source, iteration)
        if iteration == checkpointing.RELEASE:
            return True, f"--load {source}: a release checkpoint (weights only, as Megatron-LM)"
        kind = (
            "a Megatron-LM checkpoint in the legacy torch format (mp_rank_* folders)"
            if checkpointing.is_legacy(source, iteration)
            else "a torch_dist checkpoint saved by Megatron-LM, not by this trainer"
        )
        raise checkpointing.CheckpointError(
            f"--load {source}: {path} is {kind}. Its weights can start this run but not "
            "resume it (its optimizer state, LR schedule and data position are Megatron-LM's):"
            f" pass --finetune, or --pretrained-checkpoint {source} with --load and --save "
            "naming this run's own folder (a relaunch then resumes from there)"
        )

    def _upcycle(self) -> None:
        """--moe-use-upcycling: build the dense model this MoE run grows from (every MoE
        layer's MLP dense, --moe-ffn-hidden-size x granularity wide, the rest as here), load
        --load's checkpoint into it, convert it with megatron-core's upcycling (each expert a
        copy or slice of its layer's dense MLP, scaled by its rule; the routers keep their
        initial weights) and save the result to --save at once, as Megatron-LM does.
        Iteration, optimizer, LR schedule and data position start fresh."""
        from megatron.core.transformer.moe.moe_layer import BaseMoELayer
        from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

        run, m = self.cfg.run, self.cfg.model
        if checkpointing.find_checkpoint(run.save, "--save") is not None:
            raise checkpointing.CheckpointError(
                f"--moe-use-upcycling: --save {run.save} already holds a checkpoint. Upcycling "
                "is for the first launch only: to go on from that MoE checkpoint, drop "
                f"--moe-use-upcycling and pass --load {run.save} (Megatron-LM's rule)"
            )
        if checkpointing.find_checkpoint(run.load) is None:
            raise ValueError(f"--moe-use-upcycling: no checkpoint in --load {run.load}: give the "
                             "directory the dense run saved into")  # fmt: skip
        moe_ffn = m.moe_ffn_hidden_size or m.resolved_ffn_hidden_size
        dense_ffn = moe_ffn * m.moe_upcycling_granularity
        dense_model = dataclasses.replace(
            m, num_experts=None, ffn_hidden_size=dense_ffn, moe_ffn_hidden_size=None,
            moe_use_upcycling=False,
        )  # fmt: skip
        dense_cfg = dataclasses.replace(self.cfg, model=dense_model)
        # Built as Megatron-LM builds it: expert parallelism 1 (a dense model has no experts).
        plan = dataclasses.replace(self.plan, grid=dataclasses.replace(self.plan.grid, ep=1))
        config = transformer_config(dense_cfg, plan, self.layout)
        shape = ModelShape.from_config(
            dense_model, self.plan.padded_vocab_size,
            use_transformer_engine(dense_cfg, self.layout),
            on_gpu=self.layout.device.type == "cuda", context_parallel=plan.grid.cp > 1,
        )  # fmt: skip
        dense = build_model_chunks(config, shape, self.plan.vpp, self.layout.device, meta=True)
        path = checkpointing.checkpoint_path(run.load, run.ckpt_step)
        # (A Megatron-LM legacy checkpoint has no saved config: an MoE one fails the load
        # below, its expert weights named as what the dense model lacks.)
        source = (
            {}
            if checkpointing.legacy_checkpoint.is_legacy(path)
            else checkpointing.saved_common_state(path).get("config", {}).get("model", {})
        )
        if source.get("num_experts"):
            raise checkpointing.CheckpointError(
                f"--moe-use-upcycling: {path} is an MoE checkpoint ({source['num_experts']} "
                "experts per layer): upcycling starts from a dense one"
            )
        try:
            common = checkpointing.load(run.load, dense, None, run.ckpt_fully_parallel_load,
                                        None, run.ckpt_step, verify_all=run.verify_integrity,
                                        validate_sharding=run.ckpt_load_validate_sharding_integrity,
                                        exchange_algo=run.ckpt_fully_parallel_load_exchange_algo)  # fmt: skip
        except checkpointing.CheckpointError as error:
            raise checkpointing.CheckpointError(
                f"--moe-use-upcycling: the dense model this run grows from (its MoE layers' "
                f"MLPs {dense_ffn} wide: --moe-ffn-hidden-size {moe_ffn} x "
                f"--moe-upcycling-granularity {m.moe_upcycling_granularity}) does not match "
                f"{path}: {error}"
            ) from error
        for moe_chunk, dense_chunk in zip(self.raw_chunks, dense, strict=True):
            if any(isinstance(module, BaseMoELayer) for module in moe_chunk.modules()):
                state = upcycle_state_dict([moe_chunk], [dense_chunk])["model"]
            else:  # a stage without decoder layers: nothing to grow
                state = dense_chunk.state_dict()
            moe_chunk.load_state_dict(state, strict=True)
        del dense
        # The fp32 main weights of a mixed-precision optimizer follow the model.
        self.optimizer.reload_model_params()
        self.writer.print(
            f"--moe-use-upcycling: grew {path} (iteration {common['iteration']}) into "
            f"{m.num_experts} experts per layer (granularity {m.moe_upcycling_granularity}); "
            "iteration, optimizer, LR schedule and data position start fresh"
        )
        # Before any step there is no optimizer state: the weights and the run's state only.
        written = checkpointing.save(run.save, self.iteration, self.raw_chunks, None,
                                     {**self.state(), "upcycled": True},
                                     run.ckpt_fully_parallel_save,
                                     hash_all=run.verify_integrity)  # fmt: skip
        self.writer.print(f"--moe-use-upcycling: upcycled checkpoint saved to {written}: later "
                          f"launches drop the flag and pass --load {run.save}")  # fmt: skip

    def _check_phase_order(self, common: dict) -> None:
        """A run never goes back to an earlier phase or stage: a checkpoint taken in the
        recovery phase (or a later bag stage) resumed with a later switch would train in the
        superposition phase (or an earlier stage) again. Checkpoints from before stages were
        stored hold only the phase name."""
        saved = common["phase"]
        iteration = common["iteration"]
        if iteration >= self.plan.train_iters:
            return
        now = self.schedule.phase_at(iteration)
        saved_stage = common.get("stage", now.stage if saved == now.name else 0)
        earlier_stage = saved == now.name == SUPERPOSITION and now.stage < saved_stage
        if (saved == RECOVERY and now.name != RECOVERY) or earlier_stage:
            starts = ", ".join(map(str, self.schedule.stage_starts)) or "none"
            raise ValueError(
                f"--load {self.cfg.run.load}: the checkpoint (iteration {iteration}) is in "
                f"stage {saved_stage} ({saved} phase), but this run's schedule puts iteration "
                f"{iteration} in stage {now.stage} ({now.name} phase; switches at {starts}); a "
                "run never goes back to an earlier phase: give --tst-iters / --tst-fraction / "
                f"--tst-schedule that switch at or before iteration {iteration}"
            )

    def _load_scheduler(self, saved: dict) -> None:
        """megatron-core's checkpoint-vs-flags schedule check, with the choice spelt out."""
        run = self.cfg.run
        try:
            self.scheduler.load_state_dict(saved)
        except AssertionError as error:
            raise ValueError(
                f"--load {run.load}: the checkpoint's LR / weight-decay schedule differs from "
                f"this run's flags ({error}); pass --override-opt_param-scheduler to follow the "
                "flags from here on, or --use-checkpoint-opt_param-scheduler to keep the "
                "checkpoint's schedule"
            ) from None
        source = "the flags" if run.override_opt_param_scheduler else "the checkpoint"
        s = self.scheduler
        self.writer.print(
            f"LR schedule from {source}: peak {s.max_lr:g}, min {s.min_lr:g}, warm-up "
            f"{s.lr_warmup_steps} and decay {s.lr_decay_steps} samples ({s.lr_decay_style})"
        )

    # ---------------------------------------------------------------- the loop

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 (Slurm's warning), SIGUSR2 and Ctrl-C save at the next step and exit 0;
        a second Ctrl-C exits at once (the last complete checkpoint stays as it was)."""

        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_signal == signal.SIGINT:
                print("second Ctrl-C: exiting now, without saving", file=sys.stderr, flush=True)
                _end_child_processes()  # no exit hook runs after os._exit
                os._exit(130)
            if signum == signal.SIGINT:
                print("Ctrl-C: saving at the end of this step, then exiting (Ctrl-C again to "
                      "exit at once)", file=sys.stderr, flush=True)  # fmt: skip
            self._stop_signal = signum

        for sig in STOP_SIGNALS:  # the helpers the saves use ignore these (tst.processes)
            signal.signal(sig, handler)

    def _local_stop_votes(self) -> tuple[float, float]:
        """This rank's (signalled, out of time) votes; the step's all-reduce sums them."""
        limit = self.cfg.run.exit_duration_in_mins
        return (
            float(self._stop_signal is not None),
            # From this process's start, as Megatron-LM counts it (not the run's total time:
            # a resumed job gets its whole budget again).
            float(bool(limit) and (time.time() - self.start_time) / 60 >= limit),
        )

    def _should_stop(self) -> str | None:
        """Every rank reads the same reduced votes, so all stop at the same step."""
        run = self.cfg.run
        signalled, out_of_time = self._stop_votes
        if signalled:
            return "signal"
        if out_of_time:
            return "--exit-duration-in-mins"
        if run.exit_interval and self.iteration % run.exit_interval == 0:
            return "--exit-interval"
        if self.iteration in self._transitions:
            return "--phase-transition-iterations"
        return None

    def write_manifest(self) -> None:
        if self.layout.rank != 0 or not self.cfg.run.save:
            return
        os.makedirs(self.cfg.run.save, exist_ok=True)
        manifest = {
            "config": self.cfg.to_dict(),
            "plan": dataclasses.asdict(self.plan),
            "layout": self.layout.describe(),
            "phases": self.schedule.to_dict(),
            "git": git_hash(),
            "versions": library_versions(),
            "command": sys.argv,
        }
        with open(os.path.join(self.cfg.run.save, "run_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, default=str)

    def train(self) -> int:
        t, run, log = self.cfg.training, self.cfg.run, self.cfg.log
        train_iters = self.plan.train_iters
        self._install_signal_handlers()
        # Read ahead from here: a resumed run's loader plans from the loaded position.
        self.train_stream.start_workers(self.cfg.data.num_workers, self._coming_bag_sizes())
        if log.logging_level is not None:
            import logging

            logging.getLogger().setLevel(log.logging_level)
        self.write_manifest()
        if run.save and self.layout.rank == 0:  # the last run's end, read by its launcher
            rerun_record.clear(run.save)
        self.writer.print(f"layout: {self.layout.describe()}")
        self.writer.print("phase schedule:\n" + self.schedule.table())
        if getattr(self.config, "use_mup", False):
            self.writer.print(self._mup_line())
        self.writer.print(self.peak.describe())
        if log.full_validation:
            self.eval_iters = [self._full_validation_iters(k) for k in range(len(self.valid_sets))]
        self.writer.write({"phases": self.schedule.to_dict(), "train_iters": train_iters},
                          "plan")  # fmt: skip
        evaluate = self.plan.evaluate and bool(self.valid_sets)
        if self.plan.evaluate and not self.valid_sets:
            self.writer.print("no validation data (the split gives it no documents): "
                              "evaluation is skipped")  # fmt: skip
        gc_state = _ManualGC(log.manual_gc, log.manual_gc_interval, log.manual_gc_eval)
        self._gc_state = gc_state
        profiler = _Profiler(log, self.layout.rank, self.writer)
        window = {
            "t0": time.time(),
            "paused": 0.0,  # seconds of evaluations and saves since t0: not training time
            "positions": 0,
            "raw": self.train_stream.consumed_raw_tokens,
            "steps": 0,
            "loss": 0.0,
        }
        if self.energy is not None:
            self.energy.resume()
        skipped_in_a_row = 0
        if run.skip_train:  # Megatron-LM's --skip-train: evaluate what was loaded, and stop
            phase = self.schedule.phase_at(min(self.iteration, train_iters - 1))
            self.writer.print(f"--skip-train: evaluating at iteration {self.iteration}, no "
                              "training step")  # fmt: skip
            if evaluate:
                self._evaluate_valid_split(phase)
            if self.test is not None:
                self._evaluate_test_split(phase)
            profiler.close()
            self._finish()
            return 0
        first_step = True
        self._timers_logged_at = self.iteration
        while self.iteration < train_iters:
            phase = self.schedule.phase_at(self.iteration)
            if self.schedule.starting_at(self.iteration) is not None:
                self._switch(phase)
            if self.iteration in self.iterations_to_skip:
                self._skip_iteration(phase)
                continue
            batch_size = self.plan.batch_size_at(self.iteration)
            profiler.step_start(self.iteration)
            result = self.train_step(phase)
            if "rerun_exit" in result:
                profiler.close()
                return self._rerun_exit(result)
            self.iteration += 1
            self.trained_samples += batch_size
            if self.plan.rampup is None:
                self.skipped_samples += self.plan.global_batch_size - batch_size
            if first_step and self.cfg.parallel.distributed_timeout_seconds_after_init:
                from tst.platform import set_group_timeouts

                # After the first step of this process (the slow one), as Megatron-LM does.
                set_group_timeouts(self.cfg.parallel.distributed_timeout_seconds_after_init)
            first_step = False
            if t.train_sync_interval and self.iteration % t.train_sync_interval == 0:
                self._synchronize_device()
            if result["skipped"]:
                skipped_in_a_row += 1
                self.writer.print(
                    f"iteration {self.iteration}: non-finite loss {result['loss']} or "
                    f"gradients in the {phase.name} phase: step skipped (weights, optimizer "
                    f"state and LR schedule unchanged; {skipped_in_a_row} in a row)"
                )
                self.writer.write(
                    {"iteration": self.iteration, "phase": phase.name, "skipped": True,
                     "loss": None, "elapsed_s": round(self.elapsed(), 3)},
                    "train",
                )  # fmt: skip
                first_stops = self.rerun is not None and self.rerun.stops_at_first_non_finite
                if first_stops or skipped_in_a_row >= t.max_skipped_steps:
                    saved = ""
                    if run.save:
                        self.save()
                        self._finalize_saves(blocking=True)
                        saved = f"; the last good state was saved to {run.save}"
                    what = (f"a non-finite step at iteration {self.iteration} (--rerun-mode "
                            "disabled stops at the first, as Megatron-LM does)" if first_stops
                            else f"{skipped_in_a_row} consecutive non-finite steps up to "
                            f"iteration {self.iteration}")  # fmt: skip
                    raise NonFiniteLossError(
                        f"{what} ({phase.name} phase): lower --lr, raise "
                        f"--lr-warmup-iters or --clip-grad, or check the data{saved}"
                    )
                continue
            skipped_in_a_row = 0
            if result.get("overflow"):
                self.writer.print(
                    f"iteration {self.iteration}: fp16 gradient overflow, step skipped; loss "
                    f"scale now {self.optimizer.get_loss_scale().item():g}"
                )
                self.writer.write({"iteration": self.iteration, "phase": phase.name,
                                   "overflow": True, "loss_scale":
                                   self.optimizer.get_loss_scale().item()}, "train")  # fmt: skip
            elif not self._pre_hooks_on:
                self._set_pre_hooks(True)  # after the first good step, as Megatron-LM does
            window["steps"] += 1
            window["positions"] += batch_size * self.seq_length
            window["loss"] += result["loss"]
            if self.iteration % log.log_interval == 0 or self.iteration == train_iters:
                self._log(phase, result, window)
            start = log.start_eval_at_iter or 0  # (the end of training evaluates anyway)
            if evaluate and (
                (self.iteration % log.eval_interval == 0 and self.iteration >= start)
                or self.iteration == train_iters
            ):
                with self._not_training(window):
                    gc_state.before_eval()
                    self._set_pre_hooks(False)
                    self._evaluate_valid_split(phase)
                    self._set_pre_hooks(True)
                    gc_state.after_eval()
            every = self.cfg.training.check_weight_hash_across_dp_replicas_interval
            if every and self.iteration % every == 0:
                self._check_replicas_agree()
            saved = bool(run.save and run.save_interval and self.iteration % run.save_interval == 0)
            frequent = run.non_persistent_save_interval
            if saved:
                with self._not_training(window):
                    self.save()
            elif run.save and frequent and self.iteration % frequent == 0:
                with self._not_training(window):  # Megatron-LM's rule: not both at one step
                    self.save(non_persistent=True)
            gc_state.step(self.iteration)
            self._finalize_saves(blocking=False)
            reason = self._should_stop()
            if reason:
                if run.save and not saved:  # not this iteration twice (Megatron-LM's rule)
                    self.save()
                self.writer.print(f"stopping at iteration {self.iteration}: {reason}")
                profiler.close()
                self._finish()
                return 0
        profiler.close()
        if self.plan.evaluate and self.test is not None:
            self._evaluate_test_split(self.schedule.phase_at(train_iters - 1))
        if run.save and (not run.save_interval or self.iteration % run.save_interval != 0):
            self.save()
        self._finish()
        return 0

    def _evaluate_valid_split(self, phase: Phase) -> None:
        """Next-token loss on the validation split, logged and written as an eval record;
        with --multiple-validation-sets each set's as ``val_loss-K`` too (``val_loss``: all
        the sets' targets together)."""
        sums = [
            self._loss_sums(ds, n) for ds, n in zip(self.valid_sets, self.eval_iters, strict=True)
        ]
        val = sum(t for t, _ in sums) / max(sum(c for _, c in sums), 1)
        per_set = {}
        if self.named_valid_sets:
            per_set = {f"val_loss-{name}": t / max(c, 1)
                       for name, (t, c) in zip(self.valid_set_names, sums, strict=True)}  # fmt: skip
        record = {
            "iteration": self.iteration,
            "val_loss": val,
            **per_set,
            "elapsed_s": round(self.elapsed(), 3),
            "phase": phase.name,
            "stage": phase.stage,
            "raw_tokens": self.train_stream.consumed_raw_tokens,
        }
        if self.cfg.log.log_validation_ppl_to_tensorboard:
            record["val_ppl"] = math.exp(min(val, 700.0))
        self.writer.write(record, "eval")
        sets = "".join(f" | set {name} {loss:.4f}"
                       for name, loss in zip(self.valid_set_names, per_set.values(), strict=False))  # fmt: skip
        self.writer.print(f"  eval at {self.iteration}: next-token loss {val:.4f}{sets}")

    def _evaluate_test_split(self, phase: Phase) -> None:
        """Next-token loss on the test split (--split's third part or --test-data-path) once,
        at the end of a run that completes, as Megatron-LM does (not on an early stop)."""
        self._set_pre_hooks(False)
        loss = self.evaluate(self.test, self.cfg.log.eval_iters)
        record = {"iteration": self.iteration, "test_loss": loss, "phase": phase.name,
                  "elapsed_s": round(self.elapsed(), 3)}  # fmt: skip
        self.writer.write(record, "test")
        self.writer.print(f"  test at {self.iteration}: next-token loss {loss:.4f}")

    def _coming_bag_sizes(self):
        """The bag size of every micro-batch the run has left to read, in order: a step's
        phase is a pure function of its iteration, so the loader can read ahead."""
        for iteration in range(self.iteration, self.plan.train_iters):
            units = self.schedule.phase_at(iteration).units_per_row
            yield from [units] * self.plan.microbatches_at(iteration)

    def _finish(self) -> None:
        if self._gc_state is not None:
            self._gc_state.finish()
        self._finalize_saves(blocking=True)
        checkpointing.wait_for_retired()
        if self.async_saves is not None:
            self.async_saves.close()  # ends the persistent writer, if one was started
            # Dropped while the process group is up: megatron-core's caller closes itself
            # again when collected, and that names this rank's process-group rank.
            self.async_saves.persistent_caller = None
        self.train_stream.close()
        self._set_pre_hooks(False)
        self.writer.close()

    @contextlib.contextmanager
    def _not_training(self, window: dict):
        """An evaluation or a checkpoint save: its time and energy are kept out of the log
        window's throughput, MFU and power (Megatron-LM stops its interval timer and energy
        monitor around both)."""
        start = time.time()
        if self.energy is not None:
            self.energy.pause()
        try:
            yield
        finally:
            window["paused"] += time.time() - start
            if self.energy is not None:
                self.energy.resume()

    def _log(self, phase: Phase, result: dict, window: dict) -> None:
        log = self.cfg.log
        now = time.time()
        span = max(now - window["t0"] - window["paused"], 1e-9)
        raw = self.train_stream.consumed_raw_tokens
        steps = max(window["steps"], 1)
        tflops = (
            window["positions"] * self.flops_per_position / span / 1e12 / self.layout.world_size
        )
        name = phase.loss
        record = {
            "iteration": self.iteration,
            "phase": phase.name,
            "stage": phase.stage,
            "loss_name": name,
            "loss": window["loss"] / steps,
            # The base learning rate (Megatron-LM's logged one: the first group on the
            # default schedule, not a --decoupled-lr or muP-scaled group).
            "lr": next(
                (g["lr"] for g in self.optimizer.param_groups if g.get("default_config", True)),
                self.optimizer.param_groups[0]["lr"],
            ),
            "grad_norm": result["grad_norm"],
            "batch_size": self.plan.batch_size_at(self.iteration - 1),
            "raw_tokens": raw,
            "data_units": self.train_stream.consumed_units,  # the data position, for audits
            "positions": self.trained_samples * self.seq_length,
            "raw_tokens_per_s": (raw - window["raw"]) / span,
            "positions_per_s": window["positions"] / span,
            "tflops_per_device": tflops,
            "mfu": self.peak.mfu(tflops),
            "peak_tflops": self.peak.value,
            "elapsed_s": round(self.elapsed(), 3),
        }
        if self.skipped_samples:  # Megatron-LM logs them once there are any
            record["skipped_samples"] = self.skipped_samples
        if self.cfg.training.fp16:
            record["loss_scale"] = self.optimizer.get_loss_scale().item()
        if log.log_params_norm:
            record["params_norm"] = _params_norm(self.model)
        if log.log_num_zeros_in_grad and result.get("num_zeros") is not None:
            record["num_zeros_in_grad"] = int(result["num_zeros"])
        if "max_attention_logit" in result:  # the logged step's, as Megatron-LM logs it
            record["max_attention_logit"] = result["max_attention_logit"]
        if log.log_memory_to_tensorboard:
            record.update(_memory_record(self.layout.device))
        record.update(self.step_stats.window_record())  # every rank: one all-reduce
        if self.energy is not None:  # every rank: one all-reduce
            drawn = torch.tensor([self.energy.lap_mj()], dtype=torch.float64,
                                 device=self.layout.device)  # fmt: skip
            torch.distributed.all_reduce(drawn)
            joules = drawn.item() / 1000 / self.layout.world_size  # per device
            record["energy_j_per_iter_per_device"] = joules / steps
            record["power_w_per_device"] = joules / span
        self.writer.write(record, "train")
        extra = "".join(f" | {key} {value:.4f}" for key, value in record.items()
                        if key.startswith("mtp_"))  # fmt: skip
        extra += "".join(
            f" | {key} {record[key]:.4g}"
            for key in ("loss_scale", "params_norm", "max_attention_logit")
            if key in record
        )
        if "skipped_samples" in record:
            extra += f" | skipped samples {record['skipped_samples']}"
        if self.energy is not None:
            extra += (f" | {record['energy_j_per_iter_per_device']:.1f} J/iter/GPU | "
                      f"{record['power_w_per_device']:.1f} W/GPU")  # fmt: skip
        self.writer.print(
            f"iter {self.iteration:>6}/{self.plan.train_iters} | {phase.name:<13} | "
            f"{name} {record['loss']:.4f} | lr {record['lr']:.3e} | grad {result['grad_norm']:.3f}"
            f" | raw tok {raw} | {record['raw_tokens_per_s']:.0f} raw tok/s | "
            f"{record['positions_per_s']:.0f} pos/s | {tflops:.3f} TFLOP/s | "
            f"MFU {100 * record['mfu']:.1f}%{extra}"
        )
        self._log_timers()
        if log.record_memory_history and self.layout.rank == self.layout.world_size - 1:
            _dump_memory_snapshot(log.memory_snapshot_path)
        every = log.log_memory_interval
        if self._memory_report_due or (every and self.iteration % every == 0):
            self._report_memory()
            # Reported again at the next log while it comes before the second step's end:
            # after one step the optimizer state may not exist yet (Megatron-LM's rule).
            self._memory_report_due = self.iteration < 2
        window.update(t0=now, paused=0.0, positions=0, raw=raw, steps=0, loss=0.0)

    def _log_timers(self) -> None:
        """--timing-log-level: the timers Megatron-LM logs, per step over the log window (ms;
        min / max over ranks), printed and with --log-timers-to-tensorboard written to
        TensorBoard and W&B as NAME-time (their max). Collective: every rank calls it."""
        log = self.cfg.log
        if not log.timing_log_level:
            return
        names = list(TIMERS_LEVEL_1) + (list(TIMERS_LEVEL_2) if log.timing_log_level >= 2 else [])
        # The window's steps (the last log may close a shorter one).
        steps = self.iteration - self._timers_logged_at
        self._timers_logged_at = self.iteration
        if log.log_timers_to_tensorboard:
            self.timers.write(names, self.writer.tensorboard, self.iteration, normalizer=steps,
                              reset=False)  # fmt: skip
            if log.wandb_project:  # as Megatron-LM: the module, whose log reaches the run
                wandb = self.writer.wandb_module
                self.timers.write(names, wandb, self.iteration, normalizer=steps, reset=False)
        text = self.timers.get_all_timers_string(names, normalizer=steps, reset=True)
        if text is not None:
            self.writer.print(text)

    def _report_memory(self) -> None:
        """One line per rank of the first data-parallel replica (Megatron-LM's report): the
        CUDA allocator's figures, or on CPU the process's resident and peak resident memory."""
        if self.layout.dp_rank != 0:
            return
        device = self.layout.device
        whole = self.cfg.log.log_device_memory_used  # Megatron-LM's --log-device-memory-used
        if device.type == "cuda":
            mib = {"allocated": torch.cuda.memory_allocated(device),
                   "max allocated": torch.cuda.max_memory_allocated(device),
                   "reserved": torch.cuda.memory_reserved(device),
                   "max reserved": torch.cuda.max_memory_reserved(device)}  # fmt: skip
            if whole:
                mib["total device memory used"] = torch.cuda.device_memory_used(device)
        else:
            import resource

            import psutil

            now = psutil.Process().memory_info().rss
            # The kernel's peak (KiB on Linux) is kept a little behind the current figure.
            peak = max(now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            mib = {"resident": now, "max resident": peak}
            if whole:
                mib["total host memory used"] = psutil.virtual_memory().used
        figures = " | ".join(f"{name}: {value / 2**20:.1f}" for name, value in mib.items())
        print(f"[Rank {self.layout.rank}] (after {self.iteration} iterations) memory (MB) | "
              f"{figures}", flush=True)  # fmt: skip


def _require_state(condition: bool, message: str) -> None:
    """A checkpoint that cannot start this run as asked: one line naming why."""
    if not condition:
        raise checkpointing.CheckpointError(message)


def _record_memory_history(path: str) -> None:
    """Megatron-LM's --record-memory-history: CUDA's allocator records every allocation with
    its stack (the last 100,000 kept); an out-of-memory error dumps the snapshot to ``path``."""
    torch.cuda.memory._record_memory_history(max_entries=100_000)

    def oom_observer(device, alloc, device_alloc, device_free):
        print(f"out of memory on cuda:{device}: saving the allocator's snapshot to {path}",
              flush=True)  # fmt: skip
        _dump_memory_snapshot(path)

    attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)  # CUDA builds
    if attach is not None:
        attach(oom_observer)


def _dump_memory_snapshot(path: str) -> None:
    """The allocator's snapshot (torch.cuda.memory's pickle) to ``path``, whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.cuda.memory._dump_snapshot(tmp)
    os.replace(tmp, path)


def _end_child_processes() -> None:
    """Kill what this process started (loader workers, megatron-core's checkpoint writers and
    the result-queue manager it spawns): they would outlive an immediate exit, holding its
    output pipes."""
    import contextlib

    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _params_norm(model_chunks) -> float:
    """L2 norm of all parameters, each counted once over the model-parallel grid.

    As Megatron-LM counts it: dense parameters' tensor-parallel duplicates (norms, biases)
    on one TP rank, shards on all, squares summed over the model-parallel group; routed
    experts' (``allreduce = False``) duplicates on one expert-TP rank, summed over the
    expert-TP x EP x PP group.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate as counted

    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    tp_group = ps.get_tensor_model_parallel_group()
    etp_group = ps.get_expert_tensor_parallel_group()
    sharded = False  # FSDP2: every parameter is a DTensor, 1/DP of it on each rank
    for chunk in model_chunks:
        for param in chunk.parameters():
            if getattr(param, "shared", False) and not ps.is_pipeline_first_stage():
                continue  # a tied output copy: the embedding is counted on the first stage
            values = param.detach()
            if is_sharded(values):
                sharded, values = True, values.to_local()
            if not getattr(param, "allreduce", True):
                if counted(param, tp_group=etp_group):
                    expert += values.double().pow(2).sum().cpu()
            elif counted(param, tp_group=tp_group):
                dense += values.double().pow(2).sum().cpu()
    device = next(model_chunks[0].parameters()).device
    dense, expert = dense.to(device), expert.to(device)
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    total = dense + expert
    if sharded:  # the shards' squares, summed over the group FSDP2 shards over
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total.sqrt())


def _replica_weight_mismatches(model_chunks, device) -> list[str]:
    """The parameters whose values on this rank differ from data-parallel rank 0's (expert
    parameters: from expert-data-parallel rank 0's), each as 'name (ranks [...] differ)'.
    Collective over the data-parallel and expert-data-parallel groups."""
    import hashlib

    from megatron.core import parallel_state as ps

    dense, expert = [], []
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            values = param.detach().float().cpu().contiguous().numpy()
            digest = torch.frombuffer(bytearray(hashlib.sha1(values.tobytes()).digest()),
                                      dtype=torch.uint8)  # fmt: skip
            label = name if len(model_chunks) == 1 else f"chunk {index} {name}"
            (dense if getattr(param, "allreduce", True) else expert).append((label, digest))
    differing = []
    for entries, group in ((dense, ps.get_data_parallel_group()),
                           (expert, ps.get_expert_data_parallel_group())):  # fmt: skip
        size = dist.get_world_size(group)
        if not entries or size == 1:
            continue
        local = torch.stack([digest for _, digest in entries]).to(device)
        gathered = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(gathered, local, group=group)
        ranks = dist.get_process_group_ranks(group)
        for row, (label, _) in enumerate(entries):
            odd = [
                ranks[r]
                for r in range(1, size)
                if not torch.equal(gathered[r][row], gathered[0][row])
            ]
            if odd:
                differing.append(f"{label} (ranks {odd} differ from rank {ranks[0]})")
    return differing


def _memory_record(device) -> dict:
    """Memory in use on this rank (CUDA allocator figures, or the process's RSS on CPU)."""
    if device.type == "cuda":
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                "mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}  # fmt: skip
    import psutil

    return {"mem_rss_gib": psutil.Process().memory_info().rss / 2**30}


def profiled_region(name: str):
    """A named range in a --profile trace (``record_function``); nothing when no profiler
    runs. The trainer's ranges are named ``tst: ...``: bench/profile_summary.py splits the
    step's host time, and the GPU's idle time, by them."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class _Profiler:
    """--profile: a torch profiler trace of steps [--profile-step-start, --profile-step-end)
    on --profile-ranks, written as a Chrome trace into --tensorboard-dir (else the cwd).

    Each profiled step is recorded whole, the trainer's work after it (logging, evaluation,
    saves) included: the trace stops when the step after the last begins, or when the loop
    ends."""

    def __init__(self, log, rank: int, writer):
        self.enabled = log.profile and rank in log.profile_ranks
        self.with_stack = log.pytorch_profiler_collect_callstack
        self.chakra = log.pytorch_profiler_collect_chakra
        self.nvtx = log.nvtx_ranges  # megatron-core's NVTX markers while recording (CUDA)
        self.start, self.end = log.profile_step_start, log.profile_step_end
        self.out = log.tensorboard_dir or "."
        self.rank, self.writer, self._prof = rank, writer, None

    def _path(self, kind: str) -> str:
        return os.path.join(self.out, f"{kind}_rank{self.rank}_steps{self.start}-{self.end}.json")

    def step_start(self, iteration: int) -> None:
        if self._prof is not None and iteration >= self.end:
            self.close()
        if self.enabled and iteration == self.start and self._prof is None:
            observer = None
            if self.chakra:  # --pytorch-profiler-collect-chakra: torch's execution trace
                os.makedirs(self.out, exist_ok=True)
                observer = torch.profiler.ExecutionTraceObserver().register_callback(
                    self._path("chakra"))  # fmt: skip
            self._prof = torch.profiler.profile(record_shapes=True, with_stack=self.with_stack,
                                                execution_trace_observer=observer)  # fmt: skip
            self._prof.__enter__()
            self._markers(True)

    def _markers(self, on: bool) -> None:
        if self.nvtx:
            from megatron.core.utils import configure_nvtx_profiling

            configure_nvtx_profiling(on)

    def close(self) -> None:
        """Write the trace, if one is being recorded (idempotent)."""
        if self._prof is None:
            return
        self._markers(False)
        self._prof.__exit__(None, None, None)
        os.makedirs(self.out, exist_ok=True)
        path = self._path("profile")
        self._prof.export_chrome_trace(path)
        print(f"rank {self.rank}: profiler trace written to {path}"
              + (f" (execution trace: {self._path('chakra')})" if self.chakra else ""),
              flush=True)  # fmt: skip
        self._prof, self.enabled = None, False


class _ManualGC:
    """--manual-gc: Python's automatic collection off; collect every N steps and around
    evaluation (Megatron-LM's switch against collection pauses at random steps)."""

    def __init__(self, enabled: bool, interval: int, around_eval: bool):
        import gc

        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        if enabled:
            gc.disable()
            gc.collect()

    def step(self, iteration: int) -> None:
        import gc

        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def before_eval(self) -> None:
        import gc

        if self.enabled and self.around_eval:
            gc.collect()

    def after_eval(self) -> None:
        import gc

        if self.enabled and self.around_eval:
            gc.collect(generation=0)

    def finish(self) -> None:
        """Automatic collection back on when the run ends: the process may go on (tests,
        tools), and objects in reference cycles (process groups with their threads) must
        be freed."""
        import gc

        if self.enabled:
            gc.enable()
            self.enabled = False
