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

import json
import math
import os
import signal
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

from tst import checkpointing
from tst.config import Config
from tst.data.batch import PAPER, make_output_only_batch, make_tst_batch
from tst.errors import NonFiniteLossError
from tst.losses import (
    slot_weights_for,
    vocab_parallel_multi_hot_cross_entropy,
    vocab_parallel_multi_hot_cross_entropy_alt,
)
from tst.megatron_config import transformer_config, use_transformer_engine
from tst.metrics import (
    MetricsWriter,
    flops_per_position,
    git_hash,
    library_versions,
    measure_cpu_peak_tflops,
)
from tst.model import (
    ModelShape,
    build_model_chunks,
    set_bag_size,
    set_target_loss,
)
from tst.phases import RECOVERY, Phase, PhaseSchedule
from tst.platform import Layout

__all__ = ["NonFiniteLossError", "Trainer"]

_LOSSES = {
    "mce": vocab_parallel_multi_hot_cross_entropy,
    "mce-alt": vocab_parallel_multi_hot_cross_entropy_alt,
    "lm": vocab_parallel_multi_hot_cross_entropy,  # one target slot: ordinary CE
}


class Trainer:
    """Builds everything for one run and trains it; one instance per process."""

    def __init__(self, cfg: Config, layout: Layout, derived: dict, tokenizer, datasets):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        from tst.data.stream import SampleStream
        from tst.init import initialize_layout_independent

        self.cfg, self.layout, self.derived = cfg, layout, derived
        self.tokenizer = tokenizer
        m, t, tst = cfg.model, cfg.training, cfg.tst
        self.schedule = PhaseSchedule.from_config(cfg)
        self.bag_size = tst.tst_bag_size
        self.seq_length = m.seq_length
        self.slot_weights = slot_weights_for(tst.tst_slot_weights, tst.tst_bag_size)
        self.config = transformer_config(cfg, derived, layout)
        self.shape = ModelShape.from_config(
            m, derived["padded_vocab_size"], use_transformer_engine(cfg, layout)
        )
        chunks = build_model_chunks(self.config, self.shape, derived["vpp"], layout.device)
        initialize_layout_independent(chunks, self.config, t.seed, layout)
        self.raw_chunks = chunks
        if t.bf16:
            chunks = [Float16Module(self.config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.model = [
            DistributedDataParallel(
                config=self.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
            )
            for i, c in enumerate(chunks)
        ]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=t.bf16,
            params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.model)
        decay_style = {"wsd": "WSD"}.get(t.lr_decay_style, t.lr_decay_style)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_iters,
            lr_decay_steps=t.train_iters,
            lr_decay_style=decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=t.train_iters,
            wd_incr_style="constant",
            wsd_decay_steps=t.lr_wsd_decay_iters,
            lr_wsd_decay_style="linear" if t.lr_decay_style == "wsd" else None,
        )
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [c.no_sync for c in self.model]
        if len(self.model) == 1:
            self.config.no_sync_func = self.config.no_sync_func[0]
        self.config.grad_scale_func = self.optimizer.scale_loss

        train, valid, _ = datasets
        mbs, dp = t.micro_batch_size, layout.dp
        self.train_stream = SampleStream(
            train, m.seq_length, self.bag_size, mbs, layout.dp_rank, dp
        )
        self.valid = valid
        self.iteration = 0
        self.writer = MetricsWriter(layout.rank == 0, cfg.run.metrics_file, cfg.run.tensorboard_dir)
        self.flops_per_position = flops_per_position(cfg, derived["padded_vocab_size"])
        self.peak_tflops = cfg.run.peak_tflops or (
            989.0 if layout.device.type == "cuda" else measure_cpu_peak_tflops()
        )
        self._stop_signal = None
        self._stop_votes = [0.0, 0.0]  # summed over ranks by each training step
        self.start_time = time.time()
        self.elapsed_before = 0.0

    # ---------------------------------------------------------------- data and loss

    def _batch(self, chunk: torch.Tensor, phase: Phase):
        """Rows from the stream -> (input ids, targets, loss mask) for this phase."""
        if phase.input_bag == 1 and phase.target_bag == 1:  # recovery (or plain) step
            return make_tst_batch(chunk, 1)
        if phase.input_bag == 1:  # output-only: ordinary inputs, next bag_size tokens as targets
            return make_output_only_batch(chunk, phase.target_bag)
        if self.cfg.tst.tst_layout == PAPER:
            chunk = chunk[:, : phase.input_bag * self.seq_length + 1]
            batch = make_tst_batch(chunk, phase.input_bag, PAPER)
        else:
            batch = make_tst_batch(chunk, phase.input_bag)
        if phase.target_bag == 1:  # input-only: predict the first token of the next bag
            targets = batch.targets[..., :1]
            return batch._replace(targets=targets, loss_mask=(targets != -100).any(-1).float())
        return batch

    def _forward_step(self, phase: Phase, data_iterator, model):
        batch = next(data_iterator)
        b = batch.input_ids.shape[0]
        device = self.layout.device
        positions = torch.arange(self.seq_length, device=device).expand(b, -1)
        targets, mask = batch.targets.to(device), batch.loss_mask.to(device)
        # The last stage scores the targets inside the model: [b, L] per-position losses.
        output = model(batch.input_ids.to(device), positions, attention_mask=None, labels=targets)

        def loss_func(loss):
            total = (loss * mask).sum()
            count = mask.sum()
            return total, count.int(), {"loss": torch.stack([total.detach(), count])}

        return output, loss_func

    def _run_schedule(self, batches, phase: Phase, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        weights = self.slot_weights if phase.target_bag > 1 else None
        # Every target id was checked against the vocabulary on the host when its sample was
        # read (TSTGPTDataset), so the loss skips its own check (a device sync on a GPU); the
        # logits are dead after the loss, so fp32 ones double as its work buffer.
        loss = partial(
            _LOSSES[phase.loss],
            tp_group=self.layout.tp_group,
            slot_weights=weights,
            check_targets=False,
            overwrite_logits=True,
        )
        set_target_loss(self.model, loss)
        iterators = [iter(batches) for _ in self.model]
        vpp = self.derived["vpp"]
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, phase),
            data_iterator=iterators if vpp else iterators[0],
            model=self.model if vpp else self.model[0],
            num_microbatches=len(batches),
            seq_length=self.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )

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
        """Reseed from (seed, iteration): a resumed run draws what the unbroken one drew.

        Only a model that draws random numbers while training (dropout) needs it; rebuilding
        megatron-core's RNG tracker costs a few milliseconds a step, so others skip it.
        """
        if not (self.config.hidden_dropout or self.config.attention_dropout):
            return
        from tst.platform import seed_everything

        seed_everything(self.cfg.training.seed * 100_003 + self.iteration, self.layout)

    def train_step(self, phase: Phase) -> dict:
        self._seed_step()
        set_bag_size(self.model, phase.input_bag)
        batches = [
            self._batch(self.train_stream.next_micro_batch(phase.units_per_row), phase)
            for _ in range(self.derived["num_microbatches"])
        ]
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run_schedule(batches, phase, forward_only=False)
        # One all-reduce per step carries the loss, the gradients' health and the stop votes.
        loss_sum, count, non_finite, *self._stop_votes = self._global_loss(
            outputs, float(not self._gradients_finite()), *self._local_stop_votes()
        )
        loss = loss_sum / max(count, 1)
        if not math.isfinite(loss) or non_finite:
            # Skip before the optimizer sees anything: weights, Adam moments and step count,
            # and the LR schedule stay as they were.
            return {"loss": loss, "skipped": True, "grad_norm": float("nan")}
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok or grad_norm is None or not math.isfinite(grad_norm):
            return {"loss": loss, "skipped": True, "grad_norm": float(grad_norm or float("nan"))}
        self.scheduler.step(increment=1)
        return {"loss": loss, "skipped": False, "grad_norm": float(grad_norm)}

    def _gradients_finite(self) -> bool:
        """Whether this rank's reduced gradients are all finite (the step reduces the vote).

        megatron-core's bf16/fp32 optimizers clip and step whatever the gradients hold; only
        its fp16 loss scaler checks for inf/NaN. One NaN would reach every weight.
        """
        # The sum of a buffer is NaN/inf if any element is; a reduction needs no full-size
        # mask (an fp32 sum of real gradients cannot overflow to inf).
        sums = [
            buffer.grad_data.sum()
            for chunk in self.model
            for buffer in chunk.buffers + chunk.expert_parallel_buffers
        ]
        finite = not sums or bool(torch.isfinite(torch.stack(sums)).all())
        if not finite:  # every rank that sees it says so: the log names the ranks
            print(
                f"rank {self.layout.rank} (TP {self.layout.tp_rank}, PP {self.layout.pp_rank}, "
                f"DP {self.layout.dp_rank}): non-finite gradients at iteration "
                f"{self.iteration + 1}",
                flush=True,
            )
        return finite

    def evaluate(self) -> float:
        """Held-out next-token loss: ordinary inputs and targets, in either phase."""
        from tst.data.stream import SampleStream

        if self.valid is None:
            return float("nan")
        recovery = Phase(RECOVERY, 0, 1, 1, 1, "lm", 1)
        set_bag_size(self.model, 1)
        stream = SampleStream(
            self.valid,
            self.seq_length,
            self.bag_size,
            self.cfg.training.micro_batch_size,
            self.layout.dp_rank,
            self.layout.dp,
        )
        for chunk in self.model:
            chunk.eval()
        total = count = 0.0
        with torch.no_grad():
            for _ in range(self.cfg.run.eval_iters):
                batches = [
                    self._batch(stream.next_micro_batch(1), recovery)
                    for _ in range(self.derived["num_microbatches"])
                ]
                outputs = self._run_schedule(batches, recovery, forward_only=True)
                s, c = self._global_loss(outputs)
                total, count = total + s, count + c
        for chunk in self.model:
            chunk.train()
        return total / max(count, 1)

    # ---------------------------------------------------------------- switch controls

    @torch.no_grad()
    def apply_switch_controls(self) -> None:
        """The paper's ablations, applied once at the phase switch (both off by default).

        ``--tst-reinit-embeddings-at-switch``: the input word embeddings and the output layer
        get their initial values again (the same layout-independent draw as step 0), so what
        they learned in the superposition phase is lost. Under bf16 the optimizer's fp32 main
        weights are reloaded from the model (rounding the other main weights to bf16 once).
        ``--tst-reset-optimizer-at-switch``: Adam's moments and step count go back to zero in
        place (the LR schedule is kept). Both act before the first recovery step; a run resumed
        from a checkpoint taken at the switch applies them when it reaches it, as the unbroken
        run does.
        """
        tst = self.cfg.tst
        if tst.tst_reinit_embeddings_at_switch:
            from tst.init import initialize_layout_independent

            # Each tensor gets its step-0 draw again; a tied output copy on the last pipeline
            # stage is drawn as the embedding, so the two stay equal.
            heads = ("embedding.word_embeddings.weight", "output_layer.weight")
            initialize_layout_independent(
                self.raw_chunks, self.config, self.cfg.training.seed, self.layout,
                only=lambda name: name.endswith(heads),
            )  # fmt: skip
            self.optimizer.reload_model_params()
        if tst.tst_reset_optimizer_at_switch:
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
        if tst.tst_reinit_embeddings_at_switch or tst.tst_reset_optimizer_at_switch:
            self.writer.print(
                f"iteration {self.iteration}: switch controls applied (re-initialised "
                f"embeddings/output: {tst.tst_reinit_embeddings_at_switch}, optimizer state "
                f"reset: {tst.tst_reset_optimizer_at_switch})"
            )

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        return {
            "iteration": self.iteration,
            "phase": self.schedule.phase_at(
                min(self.iteration, self.cfg.training.train_iters - 1)
            ).name,
            "data": self.train_stream.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "elapsed_s": self.elapsed(),
            "config": self.cfg.to_dict(),
        }

    def save(self) -> None:
        path = checkpointing.save(
            self.cfg.run.save, self.iteration, self.raw_chunks, self.optimizer, self.state()
        )
        self.writer.print(f"saved checkpoint {path} (iteration {self.iteration})")

    def load(self) -> None:
        common = checkpointing.load(self.cfg.run.load, self.raw_chunks, self.optimizer)
        self.iteration = common["iteration"]
        self.train_stream.load_state_dict(common["data"])
        self.scheduler.load_state_dict(common["scheduler"])
        self.elapsed_before = common.get("elapsed_s", 0.0)
        self.writer.print(
            f"resumed from {self.cfg.run.load} at iteration {self.iteration} "
            f"({common['phase']} phase)"
        )

    # ---------------------------------------------------------------- the loop

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _local_stop_votes(self) -> tuple[float, float]:
        """This rank's (signalled, out of time) votes; the step's all-reduce sums them."""
        limit = self.cfg.run.exit_duration_in_mins
        return (
            float(self._stop_signal is not None),
            float(bool(limit) and self.elapsed() / 60 >= limit),
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
        return None

    def write_manifest(self) -> None:
        if self.layout.rank != 0 or not self.cfg.run.save:
            return
        os.makedirs(self.cfg.run.save, exist_ok=True)
        manifest = {
            "config": self.cfg.to_dict(),
            "derived": self.derived,
            "layout": self.layout.describe(),
            "phases": self.schedule.to_dict(),
            "git": git_hash(),
            "versions": library_versions(),
            "command": sys.argv,
        }
        with open(os.path.join(self.cfg.run.save, "run_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, default=str)

    def train(self) -> int:
        t, run = self.cfg.training, self.cfg.run
        self._install_signal_handlers()
        self.write_manifest()
        self.writer.print(f"layout: {self.layout.describe()}")
        self.writer.print("phase schedule:\n" + self.schedule.table())
        gbs = self.derived["global_batch_size"]
        window = {
            "t0": time.time(),
            "positions": 0,
            "raw": self.train_stream.consumed_raw_tokens,
            "steps": 0,
            "loss": 0.0,
        }
        skipped_in_a_row = 0
        while self.iteration < t.train_iters:
            phase = self.schedule.phase_at(self.iteration)
            if self.iteration == phase.start and phase.name == RECOVERY and self.iteration > 0:
                self.writer.print(
                    f"iteration {self.iteration}: switching to the recovery phase "
                    f"(raw tokens so far {self.train_stream.consumed_raw_tokens})"
                )
                self.apply_switch_controls()
            result = self.train_step(phase)
            self.iteration += 1
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
                if skipped_in_a_row >= t.max_skipped_steps:
                    saved = ""
                    if run.save:
                        self.save()
                        saved = f"; the last good state was saved to {run.save}"
                    raise NonFiniteLossError(
                        f"{skipped_in_a_row} consecutive non-finite steps up to iteration "
                        f"{self.iteration} ({phase.name} phase): lower --lr, raise "
                        f"--lr-warmup-iters or --clip-grad, or check the data{saved}"
                    )
                continue
            skipped_in_a_row = 0
            window["steps"] += 1
            window["positions"] += gbs * self.seq_length
            window["loss"] += result["loss"]
            if self.iteration % run.log_interval == 0 or self.iteration == t.train_iters:
                self._log(phase, result, window)
            if self.iteration % run.eval_interval == 0 or self.iteration == t.train_iters:
                val = self.evaluate()
                record = {
                    "iteration": self.iteration,
                    "val_loss": val,
                    "elapsed_s": round(self.elapsed(), 3),
                    "phase": phase.name,
                    "raw_tokens": self.train_stream.consumed_raw_tokens,
                }
                self.writer.write(record, "eval")
                self.writer.print(f"  eval at {self.iteration}: next-token loss {val:.4f}")
            if run.save and run.save_interval and self.iteration % run.save_interval == 0:
                self.save()
            reason = self._should_stop()
            if reason:
                if run.save:
                    self.save()
                self.writer.print(f"stopping at iteration {self.iteration}: {reason}")
                return 0
        if run.save and (not run.save_interval or self.iteration % run.save_interval != 0):
            self.save()
        self.writer.close()
        return 0

    def _log(self, phase: Phase, result: dict, window: dict) -> None:
        now = time.time()
        span = max(now - window["t0"], 1e-9)
        raw = self.train_stream.consumed_raw_tokens
        steps = max(window["steps"], 1)
        tflops = (
            window["positions"] * self.flops_per_position / span / 1e12 / self.layout.world_size
        )
        name = phase.loss
        record = {
            "iteration": self.iteration,
            "phase": phase.name,
            "loss_name": name,
            "loss": window["loss"] / steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": result["grad_norm"],
            "raw_tokens": raw,
            "data_units": self.train_stream.consumed_units,  # the data position, for audits
            "positions": self.iteration * self.derived["global_batch_size"] * self.seq_length,
            "raw_tokens_per_s": (raw - window["raw"]) / span,
            "positions_per_s": window["positions"] / span,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops,
            "elapsed_s": round(self.elapsed(), 3),
        }
        self.writer.write(record, "train")
        self.writer.print(
            f"iter {self.iteration:>6}/{self.cfg.training.train_iters} | {phase.name:<13} | "
            f"{name} {record['loss']:.4f} | lr {record['lr']:.3e} | grad {result['grad_norm']:.3f}"
            f" | raw tok {raw} | {record['raw_tokens_per_s']:.0f} raw tok/s | "
            f"{record['positions_per_s']:.0f} pos/s | {tflops:.3f} TFLOP/s | "
            f"MFU {100 * record['mfu']:.1f}%"
        )
        window.update(t0=now, positions=0, raw=raw, steps=0, loss=0.0)
