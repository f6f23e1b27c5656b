"""The run plan: everything derived from the flags and the world size, computed once.

:func:`validate` checks the flags against each other and the world (one place for the grid
rules megatron-core enforces: TP x PP x CP and ETP x EP x PP divide the world) and returns a
frozen :class:`RunPlan`: the parallel grid, batch sizes (with Megatron-LM's batch ramp-up),
the run's length in steps, the LR scheduler's lengths (in samples, as Megatron-LM counts
them), the phase schedule and the data budget. The entry point builds it once and passes it
to the trainer, the dry run and the data builders; nothing else re-derives these values.

Under sample-based training (``--train-samples``) the run's length in steps is Megatron-LM's
(the ramp-up steps, then full batches); ``--tst-fraction`` is a share of those steps and
``--tst-iters`` a step count, so the switch always falls on a step boundary.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

from tst.config import Config, step_batch_schedule
from tst.errors import ConfigError
from tst.phases import PhaseSchedule

__all__ = ["Grid", "RunPlan", "check_launchable", "validate"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Grid:
    """The process grid: model-parallel sizes and the data-parallel size they leave."""

    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    vpp: int | None  # virtual pipeline chunks per stage (None: no interleaving)
    # Decoder layers of each model chunk in layer order (chunk c: virtual stage c // pp on
    # pipeline rank c % pp); empty: an even split.
    chunk_layers: tuple[int, ...] = ()
    # The pipeline rank holding the MTP block (--mtp-num-layers): the last unless a
    # --pipeline-model-parallel-layout puts its m's earlier; None without MTP.
    mtp_stage: int | None = None

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)

    def stage_of_layer(self, layer: int, num_layers: int) -> int:
        """Pipeline stage holding decoder layer ``layer`` (VPP chunks round-robin)."""
        chunks = self.pp * (self.vpp or 1)
        counts = self.chunk_layers or (num_layers // chunks,) * chunks
        end = 0
        for chunk, count in enumerate(counts):
            end += count
            if layer < end:
                return chunk % self.pp
        raise ValueError(f"layer {layer} is past the last pipeline stage's layers")


@dataclass(frozen=True)
class RunPlan:
    grid: Grid
    micro_batch_size: int
    global_batch_size: int  # the full batch (after any ramp-up)
    rampup: tuple[int, int, int] | None  # start, increment, samples
    # --step-batch-size-schedule: (threshold in samples, global batch), rising from 0.
    step_schedule: tuple[tuple[int, int], ...] | None
    train_iters: int
    padded_vocab_size: int
    schedule: PhaseSchedule
    # The LR scheduler's lengths, in samples (Megatron-LM's unit).
    lr_warmup_steps: int
    lr_decay_steps: int
    wsd_decay_steps: int | None
    wd_incr_steps: int
    evaluate: bool
    # An evaluation's batch (--eval-global-batch-size / --eval-micro-batch-size; by default
    # a training step's full batch and micro-batch).
    eval_micro_batch_size: int
    eval_batch_size: int

    @property
    def dp(self) -> int:
        return self.grid.dp

    @property
    def vpp(self) -> int | None:
        return self.grid.vpp

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step at the full batch size."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def eval_microbatches(self) -> int:
        """Micro-batches per evaluation batch."""
        return self.eval_batch_size // (self.eval_micro_batch_size * self.dp)

    @property
    def trained_batch_size(self) -> int:
        """Samples a full step trains: the global batch, or with --decrease-batch-size-if-needed
        the largest multiple of micro-batch x DP below it (Megatron-LM's running batch)."""
        return self.num_microbatches * self.micro_batch_size * self.dp

    def _batch_after(self, consumed: int) -> int:
        """The global batch of a step after ``consumed`` samples (ramp-up or schedule)."""
        if self.step_schedule is not None:
            return _scheduled_batch(self.step_schedule, consumed)
        return _rampup_batch(self.rampup, self.global_batch_size, consumed)

    def batch_size_at(self, iteration: int) -> int:
        """Samples trained by 0-based step ``iteration`` (ramp-up or --step-batch-size-schedule
        by samples consumed)."""
        if self.rampup is None and self.step_schedule is None:
            return self.trained_batch_size
        return self._batch_after(self.samples_before(iteration))

    def microbatches_at(self, iteration: int) -> int:
        return self.batch_size_at(iteration) // (self.micro_batch_size * self.dp)

    def samples_before(self, iteration: int, nominal: bool = False) -> int:
        """Samples the first ``iteration`` steps read (``nominal``: at the given global batch,
        an upper bound for a run whose batch was decreased, at whatever DP it ran)."""
        if self.rampup is None and self.step_schedule is None:
            return iteration * (self.global_batch_size if nominal else self.trained_batch_size)
        if self.step_schedule is not None:
            return _scheduled_samples(self.step_schedule, iteration)
        ramp = self._rampup_consumed
        if iteration < len(ramp):
            return ramp[iteration]
        return ramp[-1] + (iteration - len(ramp) + 1) * self.global_batch_size

    @functools.cached_property
    def _rampup_consumed(self) -> list[int]:
        """--rampup-batch-size: the samples read before each step, from step 0 to the first
        full-batch step (stepped through once, by Megatron-LM's rule; full batches after)."""
        consumed = [0]
        while (batch := self._batch_after(consumed[-1])) != self.global_batch_size:
            consumed.append(consumed[-1] + batch)
        return consumed

    def samples_between(self, start: int, end: int, nominal: bool = False) -> int:
        return self.samples_before(end, nominal) - self.samples_before(start, nominal)


def _rampup_batch(rampup: tuple[int, int, int], full: int, consumed: int) -> int:
    """Megatron-LM's ramp-up rule: START + INCREMENT x floor(consumed / samples per step-up),
    the full batch once SAMPLES have been read."""
    start, increment, samples = rampup
    increments = (full - start) // increment
    if consumed > samples or increments == 0:
        return full
    per_increment = samples / increments
    return min(full, start + int(consumed / per_increment) * increment)


def _scheduled_batch(schedule: tuple[tuple[int, int], ...], consumed: int) -> int:
    """--step-batch-size-schedule's batch after ``consumed`` samples: the last entry whose
    threshold has been reached (Megatron-LM 0.19's rule)."""
    return [batch for threshold, batch in schedule if consumed >= threshold][-1]


def _scheduled_samples(schedule: tuple[tuple[int, int], ...], iteration: int) -> int:
    """Samples the first ``iteration`` steps read under --step-batch-size-schedule, entry by
    entry (each batch runs until the next threshold is reached; an entry whose threshold a
    step already passed runs no step): a few operations per entry, not per step."""
    consumed = steps = 0
    for k, (_, batch) in enumerate(schedule):
        if k + 1 < len(schedule):
            n = max(0, -(-(schedule[k + 1][0] - consumed) // batch))
            if steps + n < iteration:
                consumed, steps = consumed + n * batch, steps + n
                continue
        return consumed + (iteration - steps) * batch
    return consumed


def _train_iters(cfg: Config, gbs: int, rampup, step_schedule=None) -> int:
    """Steps of the run; under --train-samples Megatron-LM's count (ramp-up steps first;
    with --step-batch-size-schedule, steps until the samples are read, the last one whole)."""
    t = cfg.training
    if not t.sample_based:
        return t.train_iters
    if step_schedule is not None:
        iterations = consumed = 0
        while consumed < t.train_samples:
            if consumed >= step_schedule[-1][0]:  # the last batch from here
                return iterations + -(-(t.train_samples - consumed) // gbs)
            consumed += _scheduled_batch(step_schedule, consumed)
            iterations += 1
        return iterations
    if rampup is None:
        return t.train_samples // gbs
    iterations = consumed = 0
    while consumed <= rampup[2] and consumed <= t.train_samples:
        consumed += _rampup_batch(rampup, gbs, consumed)
        iterations += 1
    return iterations + (t.train_samples - consumed) // gbs


def _check_upcycling(cfg: Config, etp: int) -> None:
    """--moe-use-upcycling: megatron-core's upcycling rules, one line each."""
    m, run = cfg.model, cfg.run
    from tst.config_moe import moe_layers, parse_layer_freq

    pattern = moe_layers(parse_layer_freq(cfg.moe.moe_layer_freq, m.num_layers), m.num_layers)
    g = m.moe_upcycling_granularity
    for ok, why in (
        (run.load, "reads the dense checkpoint from --load: give it"),
        (run.save, "saves the upcycled model to --save at once: give it (Megatron-LM's rule)"),
        (not run.finetune and not run.pretrained_checkpoint,
         "loads the dense weights itself: drop --finetune / --pretrained-checkpoint"),
        (all(pattern), "makes every MLP an MoE layer: drop --moe-layer-freq (megatron-core's "
         "upcycling converts every layer's MLP)"),
        (etp == cfg.parallel.tensor_model_parallel_size,
         "copies each dense MLP shard into the experts: run it at --expert-tensor-parallel-size "
         "equal to TP (the checkpoint it saves resumes at any expert layout)"),
        (m.num_experts % g == 0,
         f"--num-experts {m.num_experts} must be a multiple of --moe-upcycling-granularity {g}"),
        (not m.moe_latent_size and not m.moe_shared_expert_intermediate_size,
         "copies the dense MLP into routed experts only: drop --moe-latent-size / "
         "--moe-shared-expert-intermediate-size (megatron-core would leave them random)"),
    ):  # fmt: skip
        _require(ok, f"--moe-use-upcycling {why}")


def _warn_decreased_batch(cfg: Config, gbs: int, unit: int, dp: int) -> None:
    """--decrease-batch-size-if-needed with a batch it changes: Megatron-LM's message, and
    what its rule does to the schedules (they count the samples trained)."""
    t = cfg.training
    trained = gbs // unit * unit
    share = f"{trained / gbs:.1%}"
    length = (f"--train-samples {t.train_samples} gives {t.train_samples // gbs} steps of "
              f"{gbs}, so the run trains {share} of those samples, and the LR schedule "
              "follows them" if t.sample_based else
              "the LR schedule counts the samples trained while its iteration-based lengths "
              f"(--train-iters, --lr-decay-iters, --lr-warmup-iters, ...) are multiplied by "
              f"{gbs}: by --train-iters it has run {share} of them (give the lengths in samples "
              "to place them exactly)")  # fmt: skip
    warnings.warn(
        f"--decrease-batch-size-if-needed: decreasing the global batch from {gbs} to {trained} "
        f"to keep it divisible by --micro-batch-size {t.micro_batch_size} x data-parallel size "
        f"{dp}; {gbs - trained} samples a step are skipped (Megatron-LM's rule: {length})",
        stacklevel=3,
    )


def _check_cp_comm_type(cfg: Config) -> None:
    """--cp-comm-type (one type, or one per layer) and --hierarchical-context-parallel-sizes:
    Megatron-LM's rules."""
    p, layers = cfg.parallel, cfg.model.num_layers
    types, sizes = p.cp_comm_type, p.hierarchical_context_parallel_sizes
    _require(len(types) in (1, layers), f"--cp-comm-type takes one type for every layer or "
             f"one per layer ({layers}), got {len(types)}")  # fmt: skip
    if sizes is not None:
        _require(len(sizes) >= 2 and all(n >= 1 for n in sizes),
                 "--hierarchical-context-parallel-sizes takes the levels' sizes (two or more "
                 f"integers >= 1), got {' '.join(map(str, sizes))}")  # fmt: skip
        _require(math.prod(sizes) == p.context_parallel_size,
                 f"--hierarchical-context-parallel-sizes {' '.join(map(str, sizes))} multiply "
                 f"to {math.prod(sizes)}, not --context-parallel-size {p.context_parallel_size}")  # fmt: skip
    _require("a2a+p2p" not in types or sizes is not None, "--cp-comm-type a2a+p2p runs a2a "
             "and p2p at two levels of the context-parallel group: give their sizes with "
             "--hierarchical-context-parallel-sizes (Megatron-LM's rule)")  # fmt: skip


def check_grid(cfg: Config, world_size: int) -> Grid:
    """megatron-core's layout rules, checked before anything is built, with the fix."""
    m, p = cfg.model, cfg.parallel
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    ep = p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    _check_cp_comm_type(cfg)
    _require(
        world_size % (tp * pp * cp) == 0,
        f"world size {world_size} is not divisible by TP x PP x CP = {tp * pp * cp} "
        f"(TP {tp}, PP {pp}, CP {cp}): change the parallel sizes or the number of processes",
    )
    # megatron-core builds the expert grid for a dense model too.
    _require(
        world_size % (etp * ep * pp) == 0,
        f"world size {world_size} is not divisible by ETP x EP x PP = {etp * ep * pp} "
        f"(expert-TP {etp}, EP {ep}, PP {pp}; megatron-core's expert grid): change "
        "--expert-model-parallel-size / --expert-tensor-parallel-size or the world size",
    )
    if m.num_experts is not None:
        from tst.config_moe import parse_layer_freq

        parse_layer_freq(cfg.moe.moe_layer_freq, m.num_layers)  # a bad one fails here, by name
        _require(
            m.num_experts % ep == 0,
            f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size {ep}",
        )
        _require(
            not m.add_bias_linear or etp == 1,
            f"MoE experts with linear biases (Megatron-LM's default) need expert-TP 1, got "
            f"{etp} (megatron-core has no expert biases under expert-TP): pass "
            "--expert-tensor-parallel-size 1 or --disable-bias-linear",
        )
    else:
        _require(ep == 1, "--expert-model-parallel-size > 1 needs --num-experts")
    _require(
        m.num_attention_heads % tp == 0,
        f"--num-attention-heads {m.num_attention_heads} is not divisible by "
        f"--tensor-model-parallel-size {tp}",
    )
    _require(
        m.query_groups % tp == 0,
        f"--num-query-groups {m.query_groups} is not divisible by TP={tp}",
    )
    if cfg.mla.multi_latent_attention:
        cfg.mla.check_model(m)
        # The local spec's down projections are column-parallel: their outputs split over TP.
        for flag, size in (("--q-lora-rank", cfg.mla.q_lora_rank),
                           ("--kv-lora-rank + --qk-pos-emb-head-dim",
                            cfg.mla.kv_lora_rank + cfg.mla.qk_pos_emb_head_dim)):  # fmt: skip
            _require(
                size is None or size % tp == 0,
                f"{flag} = {size} is not divisible by --tensor-model-parallel-size {tp} (MLA's "
                "down projections are split over TP)",
            )
    chunk_layers, vpp = pipeline_chunks(cfg)
    if m.num_experts is not None:
        _check_expert_comm_overlap(cfg, ep, pp, vpp)
    mtp_stage = mtp_pipeline_rank(cfg, pp)
    _require(
        mtp_stage != 0 or pp == 1,
        f"--pipeline-model-parallel-layout {p.pipeline_model_parallel_layout} puts the "
        "multi-token-prediction layers (m) on the first pipeline rank, beside the embedding: "
        "the MTP block embeds with a copy of it, which megatron-core keeps equal to the "
        "embedding only across ranks; put the m on a later rank",
    )
    if cp > 1:
        _require(
            m.seq_length % (2 * cp) == 0,
            f"--seq-length {m.seq_length} must be a multiple of 2 x CP = {2 * cp} "
            "(load-balanced context-parallel chunks)",
        )
    grid = Grid(world=world_size, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp,
                chunk_layers=chunk_layers, mtp_stage=mtp_stage)  # fmt: skip
    _check_communication(cfg, grid, m.num_experts is not None)
    return grid


def _check_communication(cfg: Config, grid: Grid, moe: bool) -> None:
    """megatron-core's and Megatron-LM's rules for the rank order (--use-tp-pp-dp-mapping),
    the pipeline's p2p (--no-overlap-p2p-communication, --overlap-p2p-communication-warmup-
    flush) and --num-distributed-optimizer-instances (their assertions inside
    initialize_model_parallel, the config and DDP), one line each."""
    p = cfg.parallel
    if p.use_tp_pp_dp_mapping:  # megatron-core builds the expert grid for a dense model too
        _require(
            grid.pp == 1 or grid.expert_dp == grid.dp,
            f"--use-tp-pp-dp-mapping with PP {grid.pp} needs the same data-parallel size for "
            f"the attention ({grid.dp}) and the experts ({grid.expert_dp}) (megatron-core "
            "numbers expert ranks in the default order): drop the flag or make "
            "ETP x EP = TP x CP",
        )
    if grid.vpp and not p.overlap_p2p_comm:
        _require(grid.pp > 2, "--no-overlap-p2p-communication with an interleaved schedule "
                 f"needs PP > 2 (got {grid.pp}): batched, two stages would send and receive "
                 "twice between the same two ranks in one batch (Megatron-LM refuses it too); "
                 "drop the flag")  # fmt: skip
    _require(not p.overlap_param_gather_with_optimizer_step or grid.vpp,
             "--overlap-param-gather-with-optimizer-step needs an interleaved pipeline "
             "(--num-layers-per-virtual-pipeline-stage; Megatron-LM's rule): the first model "
             "chunk's all-gather overlaps the step of the others")  # fmt: skip
    _require(not p.overlap_p2p_comm_warmup_flush or (grid.vpp and p.overlap_p2p_comm),
             "--overlap-p2p-communication-warmup-flush overlaps an interleaved schedule's "
             "warm-up and flush sends: it needs virtual pipeline stages "
             "(--num-layers-per-virtual-pipeline-stage) and overlapped p2p (not "
             "--no-overlap-p2p-communication)")  # fmt: skip
    n = p.num_distributed_optimizer_instances
    if n == 1:
        return
    flag = f"--num-distributed-optimizer-instances {n}"
    _require(
        grid.dp * grid.cp % n == 0,
        f"{flag}: the data-parallel size x CP ({grid.dp} x {grid.cp}) is not divisible by it "
        "(each copy of the optimizer state is sharded over DP x CP / N ranks)",
    )
    if moe:
        _require(
            grid.expert_dp % n == 0,
            f"{flag}: the experts' data-parallel size {grid.expert_dp} is not divisible by it",
        )
    _require(
        not p.ddp_reduce_scatter_with_fp32_accumulation,
        f"{flag} with --ddp-reduce-scatter-with-fp32-accumulation: megatron-core supports "
        "one or the other; drop one",
    )
    _require(
        p.use_distributed_optimizer,
        f"{flag} needs --use-distributed-optimizer (copies of a sharded optimizer state; "
        "megatron-core refuses it without)",
    )


def _check_expert_comm_overlap(cfg: Config, ep: int, pp: int, vpp: int | None) -> None:
    """megatron-core's rules for --overlap-moe-expert-parallel-comm (its combined 1F1B
    schedule), one line each instead of its assertions inside the model build."""
    if not cfg.moe.overlap_moe_expert_parallel_comm:
        return
    flag = "--overlap-moe-expert-parallel-comm"
    t, r, mtp = cfg.training, cfg.parallel, cfg.mtp.mtp_num_layers
    for ok, why in (
        (ep > 1, "needs --expert-model-parallel-size > 1 (it overlaps the expert all-to-all)"),
        (cfg.model.moe_token_dispatcher_type in ("alltoall", "flex"),
         "needs --moe-token-dispatcher-type alltoall (or flex)"),
        (t.bf16 or t.fp16, "runs in bf16 or fp16 only (megatron-core): add --bf16"),
        (r.recompute_granularity != "full" and r.recompute_method is None
         and r.recompute_num_layers is None,
         "excludes full recomputation (--recompute-granularity full, --recompute-method, "
         "--recompute-num-layers); selective recomputation is fine"),
        (not cfg.moe.moe_shared_expert_overlap, "excludes --moe-shared-expert-overlap"),
        (mtp in (None, 1), "takes at most --mtp-num-layers 1"),
        (mtp != 1 or pp > 1, "with --mtp-num-layers 1 needs --pipeline-model-parallel-size > 1"),
        (pp == 1 or vpp is not None,
         "with --pipeline-model-parallel-size > 1 needs virtual pipeline stages "
         "(--num-virtual-stages-per-pipeline-rank, or a --pipeline-model-parallel-layout with "
         "several stages per rank)"),
    ):  # fmt: skip
        _require(ok, f"{flag} {why}")


def pipeline_chunks(cfg: Config) -> tuple[tuple[int, ...], int | None]:
    """Decoder layers of each model chunk (in layer order) and the virtual stages per rank,
    by megatron-core's rules, each checked here with a one-line error naming the flag.

    Layers go to stages evenly (``--num-layers`` / PP, then / VPP chunks), or with
    ``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers`` the
    first / last stage take as many and the middle stages split the rest evenly (each rank's
    share then split in ``--num-virtual-stages-per-pipeline-rank`` chunks), or
    ``--pipeline-model-parallel-layout`` lists each of the PP x VPP stages' layers. With
    ``--account-for-embedding-in-pipeline-split`` / ``--account-for-loss-in-pipeline-split``
    the embedding / loss counts as one more layer of the even split, and the first / last
    chunk builds one decoder layer fewer.
    """
    m, p = cfg.model, cfg.parallel
    pp, per_vp = p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
    stages_per_rank = p.num_virtual_stages_per_pipeline_rank
    first, last = p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers
    layout = p.pipeline_model_parallel_layout
    uneven = [flag for flag, value in (("--decoder-first-pipeline-num-layers", first),
              ("--decoder-last-pipeline-num-layers", last)) if value is not None]  # fmt: skip
    virtual = [flag for flag, value in (("--num-layers-per-virtual-pipeline-stage", per_vp),
               ("--num-virtual-stages-per-pipeline-rank", stages_per_rank))
               if value is not None]  # fmt: skip
    counted = [
        flag
        for flag, on in (
            (
                "--account-for-embedding-in-pipeline-split",
                p.account_for_embedding_in_pipeline_split,
            ),
            ("--account-for-loss-in-pipeline-split", p.account_for_loss_in_pipeline_split),
        )
        if on
    ]
    _require(len(virtual) < 2, f"give {' or '.join(virtual)}, not both")
    for flag, value in zip(virtual, [v for v in (per_vp, stages_per_rank) if v is not None],
                           strict=True):  # fmt: skip
        _require(value >= 1, f"{flag} must be >= 1, got {value}")
        _require(pp > 1, "virtual pipeline stages need --pipeline-model-parallel-size > 1")
    if layout is not None:
        _require(
            not uneven and not virtual and not counted,
            "--pipeline-model-parallel-layout sets every stage's layers: drop "
            + ", ".join(uneven + virtual + counted),
        )
        return _layout_chunks(layout, pp, m.num_layers, cfg.mtp.mtp_num_layers)
    if uneven:
        _require(pp > 1, f"{uneven[0]} needs --pipeline-model-parallel-size > 1")
        _require(
            not counted,
            f"{counted[0] if counted else ''} with {uneven[0]} is refused (as in megatron-core): "
            "give the first / last stage's layers with one or the other",
        )
        _require(
            per_vp is None,
            f"{uneven[0]} with --num-layers-per-virtual-pipeline-stage is refused (as in "
            "Megatron-LM): give --num-virtual-stages-per-pipeline-rank",
        )
        for flag, value in zip(uneven, [v for v in (first, last) if v is not None], strict=True):
            _require(value >= 1, f"{flag} must be >= 1, got {value}")
        rest = m.num_layers - (first or 0) - (last or 0)
        middle = pp - len(uneven)
        _require(
            rest >= 0 and bool(rest) == bool(middle) and (not middle or rest % middle == 0),
            f"--num-layers {m.num_layers} minus {' and '.join(uneven)} leaves {rest} layers "
            f"for {middle} middle stage(s): they must split evenly, at least one each",
        )
        counts = [rest // middle if middle else 0] * pp
        counts[0] = first if first is not None else counts[0]
        counts[-1] = last if last is not None else counts[-1]
        vpp = stages_per_rank if stages_per_rank and stages_per_rank > 1 else None
        if vpp:
            _require(
                all(count % vpp == 0 for count in counts),
                f"the stages' layers {counts} must each be divisible by "
                f"--num-virtual-stages-per-pipeline-rank {vpp}",
            )
        # Chunk (virtual stage v, rank r) holds a 1/vpp share of rank r's layers, in layer order.
        chunks = tuple(counts[r] // (vpp or 1) for _ in range(vpp or 1) for r in range(pp))
        return chunks, vpp
    # The even split, the embedding / loss counted as layers where asked (megatron-core's
    # get_num_layers_to_build): (layers + counted) / (PP x VPP) a chunk, the first / last
    # chunk one decoder layer fewer.
    slots = m.num_layers + len(counted)
    total = f"--num-layers {m.num_layers}" + (
        f" + {len(counted)} ({' and '.join(counted)}) = {slots}" if counted else ""
    )
    _require(
        slots % pp == 0,
        f"{total} is not divisible by "
        f"--pipeline-model-parallel-size {pp} (or give --decoder-first/last-pipeline-num-layers "
        "or --pipeline-model-parallel-layout)",
    )
    vpp = None
    per_stage = slots // pp
    if per_vp is not None:
        _require(
            per_stage % per_vp == 0,
            f"{total} / PP = {per_stage} is not divisible by "
            f"--num-layers-per-virtual-pipeline-stage {per_vp}",
        )
        vpp = per_stage // per_vp
    if stages_per_rank is not None:
        _require(
            per_stage % stages_per_rank == 0,
            f"{total} / PP = {per_stage} is not divisible by "
            f"--num-virtual-stages-per-pipeline-rank {stages_per_rank}",
        )
        vpp = stages_per_rank
    vpp = vpp if vpp and vpp > 1 else None
    chunks = pp * (vpp or 1)
    counts = [slots // chunks] * chunks
    if p.account_for_embedding_in_pipeline_split:
        counts[0] -= 1  # the first chunk holds the embedding
    if p.account_for_loss_in_pipeline_split:
        counts[-1] -= 1  # the last chunk holds the loss
    return tuple(counts), vpp


def mtp_pipeline_rank(cfg: Config, pp: int) -> int | None:
    """The pipeline rank that holds the MTP block: the last one, or where a
    --pipeline-model-parallel-layout puts its m's (stage ``i`` of the string is on rank
    ``i % pp``; megatron-core keeps them together, in a rank's last virtual stage). None
    without --mtp-num-layers."""
    if not cfg.mtp.mtp_num_layers:
        return None
    layout = cfg.parallel.pipeline_model_parallel_layout
    if layout is None:
        return pp - 1
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    stages = PipelineParallelLayerLayout.parse_str_to_list(layout)
    return next(i % pp for i, stage in enumerate(stages) if any(k.name == "mtp" for k in stage))


def embedding_stages(cfg: Config, grid: Grid) -> tuple[int, ...] | None:
    """The pipeline ranks whose copies of the word embeddings start equal and sum their
    gradients (megatron-core's embedding group), where they are not its default first and
    last: with the MTP block on a rank before the last (a layout's standalone m), the first
    rank, the MTP block's rank (it embeds with its own copy) and, with tied weights, the last
    (its output layer's copy), as later Megatron-LM's ``get_embedding_ranks``. Megatron-LM
    0.16.1 keeps the default there, which leaves the MTP copy out and, untied, sums the last
    rank's output layer into the embedding. None: the default."""
    if grid.mtp_stage in (None, grid.pp - 1):
        return None
    tied = not cfg.model.untie_embeddings_and_output_weights
    return tuple(sorted({0, grid.mtp_stage} | ({grid.pp - 1} if tied else set())))


def _layout_chunks(
    text: str, pp: int, num_layers: int, mtp_layers: int | None
) -> tuple[tuple[int, ...], int | None]:
    """``--pipeline-model-parallel-layout``: decoder layers per stage and the VPP size, parsed
    by megatron-core's own parser and checked by its rules, each failure one line."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    flag = f"--pipeline-model-parallel-layout {text}"
    try:
        stages = PipelineParallelLayerLayout.parse_str_to_list(text)
    except AssertionError as error:
        raise ConfigError(f"{flag}: {error} (stages split by |, (...)*N repeats)") from None
    _require(
        len(stages) % pp == 0,
        f"{flag}: {len(stages)} stages is not a multiple of --pipeline-model-parallel-size {pp}",
    )
    vpp = len(stages) // pp
    _require(vpp == 1 or pp > 1, f"{flag}: several stages per rank need PP > 1")
    # Stage i is virtual stage i // pp of pipeline rank i % pp: the string is in layer order.
    names = [[kind.name for kind in stage] for stage in stages]
    flat = [kind for stage in names for kind in stage]
    counts = {kind: flat.count(kind) for kind in ("embedding", "loss", "decoder", "mtp")}
    _require(
        counts["embedding"] == 1 and flat[0] == "embedding",
        f"{flag}: the embedding E must come once, first",
    )
    _require(counts["loss"] == 1 and flat[-1] == "loss", f"{flag}: the loss L must come once, last")
    _require(
        counts["decoder"] == num_layers,
        f"{flag} places {counts['decoder']} layers (t) but --num-layers is {num_layers}",
    )
    _require(
        counts["mtp"] == (mtp_layers or 0),
        f"{flag} places {counts['mtp']} multi-token-prediction layers (m) but "
        f"--mtp-num-layers is {mtp_layers or 0}: drop the m's or set --mtp-num-layers",
    )
    try:  # megatron-core's remaining rules (where MTP layers may go)
        PipelineParallelLayerLayout(stages, pp).validate_layer_layout(num_layers, mtp_layers)
    except (AssertionError, NotImplementedError) as error:
        raise ConfigError(f"{flag}: {error}") from None
    return tuple(stage.count("decoder") for stage in names), (vpp if vpp > 1 else None)


def _adjust_like_megatron(cfg: Config, tp: int) -> None:
    """Where Megatron-LM warns and adjusts a flag, do the same (in place, before freezing)."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    if p.sequence_parallel and tp == 1:
        warnings.warn("Disabling sequence parallelism because tensor model parallelism is "
                      "disabled (as Megatron-LM does)", stacklevel=3)  # fmt: skip
        p.sequence_parallel = False
    if not m.num_experts and p.expert_tensor_parallel_size not in (None, tp):
        # Megatron-LM takes it on a dense model: megatron-core builds its expert groups all
        # the same (they bound the world size and the rank order, nothing else).
        warnings.warn(
            f"--expert-tensor-parallel-size {p.expert_tensor_parallel_size} without "
            "--num-experts only shapes megatron-core's expert process groups (no layer uses "
            "them), as in Megatron-LM",
            stacklevel=3,
        )
    if m.position_embedding_type != "rope":
        m.apply_rope_fusion = False
    if not m.add_bias_linear:
        m.bias_gelu_fusion = False
    if t.bf16:  # Megatron-LM's rule, --main-grads-dtype included
        _require(not (p.accumulate_allreduce_grads_in_fp32 and t.main_grads_dtype != "fp32"),
                 "--main-grads-dtype can only be fp32 when --accumulate-allreduce-grads-in-fp32 "
                 "is set (Megatron-LM's rule): drop one")  # fmt: skip
        if p.grad_reduce_in_bf16:
            p.accumulate_allreduce_grads_in_fp32 = False
        elif t.main_grads_dtype == "fp32":
            p.accumulate_allreduce_grads_in_fp32 = True
    r = cfg.rerun
    if r.engine_on and t.fp16 and t.loss_scale is None and r.check_for_nan_in_loss_and_grad:
        warnings.warn("Setting --no-check-for-nan-in-loss-and-grad since dynamic loss scaling "
                      "is being used (as Megatron-LM does: an overflow is the loss scaler's "
                      "signal)", stacklevel=3)  # fmt: skip
        r.check_for_nan_in_loss_and_grad = False
    if cfg.run.use_persistent_ckpt_worker and not cfg.run.async_save:
        warnings.warn("--use-persistent-ckpt-worker has no effect without --async-save",
                      stacklevel=3)  # fmt: skip
    toggles = [flag for flag, changed in (
        ("--no-tp-comm-bulk-wgrad", not p.tp_comm_bulk_wgrad),
        ("--no-tp-comm-bulk-dgrad", not p.tp_comm_bulk_dgrad),
        ("--no-tp-comm-overlap-ag", not p.tp_comm_overlap_ag),
        ("--no-tp-comm-overlap-rs", not p.tp_comm_overlap_rs),
        ("--tp-comm-overlap-rs-dgrad", p.tp_comm_overlap_rs_dgrad),
        ("--no-tp-comm-split-ag", not p.tp_comm_split_ag),
        ("--no-tp-comm-split-rs", not p.tp_comm_split_rs)) if changed]  # fmt: skip
    if toggles and not p.tp_comm_overlap:
        warnings.warn(f"{', '.join(toggles)}: no effect without --tp-comm-overlap (as in "
                      "Megatron-LM)", stacklevel=3)  # fmt: skip
    if t.no_weight_decay_cond_type == "apply_wd_to_qk_layernorm":
        warnings.warn("--no-weight-decay-cond-type is deprecated (as in Megatron-LM): use "
                      "--apply-wd-to-qk-layernorm", stacklevel=3)  # fmt: skip
        t.apply_wd_to_qk_layernorm = True
        t.no_weight_decay_cond_type = None
    run = cfg.run
    if run.distrib_optim_fully_reshardable_mem_efficient and not (
        run.dist_ckpt_optim_fully_reshardable and p.use_distributed_optimizer
    ):
        warnings.warn("--distrib-optim-fully-reshardable-mem-efficient has no effect without "
                      "--dist-ckpt-optim-fully-reshardable and --use-distributed-optimizer",
                      stacklevel=3)  # fmt: skip
    if run.dist_ckpt_optim_fully_reshardable and not p.use_distributed_optimizer:
        warnings.warn("--dist-ckpt-optim-fully-reshardable has no effect without "
                      "--use-distributed-optimizer (the plain optimizer's state reshards "
                      "anywhere already)", stacklevel=3)  # fmt: skip
    if not t.fp8_wgrad and not t.fp8_format:
        warnings.warn("--no-fp8-wgrad has no effect without --fp8-format (as in Megatron-LM)",
                      stacklevel=3)  # fmt: skip
    if m.num_query_groups != 1 and not m.group_query_attention:
        warnings.warn(f"--num-query-groups {m.num_query_groups} has no effect without "
                      "--group-query-attention (as in Megatron-LM): the model has one key/value "
                      "head per attention head", stacklevel=3)  # fmt: skip


def check_launchable(cfg: Config) -> None:
    """What a dry run can lay out but a launch cannot run yet, refused before any process
    group starts (one line: the flag, why, what to do)."""
    p = cfg.parallel
    not_yet = [
        ("--mtp-num-layers with --pipeline-model-parallel-size > 1 and learned absolute "
         "positions", bool(cfg.mtp.mtp_num_layers) and p.pipeline_model_parallel_size > 1
         and cfg.model.position_embedding_type == "learned_absolute",
         "the MTP block embeds on the last stage, whose copy of the position embeddings is "
         "not kept in step with the first stage's; use --position-embedding-type rope"),
    ]  # fmt: skip
    for flag, asked, why in not_yet:
        _require(not asked, f"{flag} is not supported yet: {why}; drop it (--dry-run lays "
                            "such a run out, a launch cannot run it)")  # fmt: skip
    from tst.nccl_options import check_nccl_options

    check_nccl_options(p)
    import torch

    # Features of CUDA devices (and their libraries), refused on a machine without a GPU.
    needs_gpu = [
        ("--record-memory-history", cfg.log.record_memory_history, "records CUDA's caching "
         "allocator", " (on CPU the memory report, --log-memory-interval, prints resident "
         "memory)"),
        ("--defer-embedding-wgrad-compute", p.defer_embedding_wgrad_compute, "needs the fused "
         "weight-gradient kernel (CUDA, Transformer Engine and APEX's "
         "fused_weight_gradient_mlp_cuda)", ""),
        ("--log-energy", cfg.log.log_energy, "reads each GPU's energy counter (NVML)", ""),
        ("--use-nccl-ub", p.use_nccl_ub, "registers the DDP buffers with NCCL (CUDA; "
         "megatron-core builds its NCCL allocator at start)", ""),
        ("--ckpt-fully-parallel-load-exchange-algo gather_rounds",
         cfg.run.ckpt_fully_parallel_load_exchange_algo == "gather_rounds"
         and cfg.run.ckpt_fully_parallel_load, "all-gathers tensors of different sizes in one "
         "call, which NCCL does and gloo (CPU) refuses", " (broadcast or gather_object load "
         "the same state)"),
    ]  # fmt: skip
    for flag, asked, what, hint in needs_gpu:
        _require(not asked or torch.cuda.is_available(),
                 f"{flag} {what}, and this machine has no GPU: drop it{hint}")  # fmt: skip
    if p.use_nccl_ub:
        alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        _require("expandable_segments:True" not in alloc.split(","), "--use-nccl-ub allocates "
                 "from a torch.cuda.MemPool, which PYTORCH_CUDA_ALLOC_CONF="
                 "expandable_segments:True does not support: unset it (megatron-core's rule)")  # fmt: skip
    elif p.disable_symmetric_registration:
        warnings.warn("--disable-symmetric-registration changes how --use-nccl-ub registers the "
                      "buffers; without --use-nccl-ub it changes nothing", stacklevel=2)  # fmt: skip
    if p.pipeline_model_parallel_comm_backend == "ucc":
        _require(torch.distributed.is_ucc_available(), "--pipeline-model-parallel-comm-backend "
                 "ucc: this PyTorch was built without UCC "
                 "(torch.distributed.is_ucc_available()): drop it")  # fmt: skip
        _require(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1",
                 "--pipeline-model-parallel-comm-backend ucc overlaps its transfers on their own "
                 "CUDA connections: unset CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron-core's rule)")  # fmt: skip


def _check_deferred_output_wgrad(cfg: Config, pp: int) -> None:
    """--defer-embedding-wgrad-compute: megatron-core's rules, said up front, and MTP."""
    p = cfg.parallel
    _require(pp > 1, "--defer-embedding-wgrad-compute defers the output layer's weight "
             "gradients to the pipeline's flush: it needs --pipeline-model-parallel-size > 1 "
             "(megatron-core's rule)")  # fmt: skip
    _require(cfg.model.gradient_accumulation_fusion, "--defer-embedding-wgrad-compute "
             "accumulates the deferred gradients with the fused weight-gradient kernel: drop "
             "--no-gradient-accumulation-fusion (megatron-core's rule)")  # fmt: skip
    _require(
        p.wgrad_deferral_limit >= 0,
        f"--wgrad-deferral-limit must be >= 0 (0: no limit), got {p.wgrad_deferral_limit}",
    )
    # megatron-core pairs each buffered output-layer input with a buffered output gradient
    # in order; with MTP the output layer runs 1 + D times per micro-batch and the backward
    # meets them in reverse, so the pairs would cross and the gradient be wrong, silently.
    _require(not cfg.mtp.mtp_num_layers, "--defer-embedding-wgrad-compute with "
             "--mtp-num-layers: megatron-core pairs the output layer's buffered inputs and "
             "gradients in order, and the MTP depths' extra calls reverse that order in the "
             "backward (the deferred gradient would be wrong): drop one of the two")  # fmt: skip


def _check_torch_fsdp2(cfg: Config, grid: Grid) -> None:
    """Megatron-LM's rules for --use-torch-fsdp2 (its arguments.py), one line each."""
    p, m, t, run = cfg.parallel, cfg.model, cfg.training, cfg.run
    flag = "--use-torch-fsdp2"
    _require(grid.pp == 1, f"{flag} is not supported with pipeline parallelism (PP "
             f"{grid.pp}; Megatron-LM's rule): drop one")  # fmt: skip
    _require(grid.ep == 1, f"{flag} is not supported with expert parallelism (EP "
             f"{grid.ep}; Megatron-LM's rule): drop one")  # fmt: skip
    _require(not p.use_distributed_optimizer, f"{flag} shards the optimizer state itself: "
             "drop --use-distributed-optimizer (Megatron-LM refuses the two together)")  # fmt: skip
    _require(not m.gradient_accumulation_fusion, f"{flag} keeps no main-gradient buffers "
             "for the fused weight-gradient kernel: add --no-gradient-accumulation-fusion "
             "(Megatron-LM's rule)")  # fmt: skip
    _require(m.untie_embeddings_and_output_weights, f"{flag} shards the input embedding "
             "and the output layer apart, so they cannot share a weight: add "
             "--untie-embeddings-and-output-weights (Megatron-LM's rule)")  # fmt: skip
    _require(not t.fp16, f"{flag} with --fp16 is not supported (Megatron-LM's rule): use "
             "--bf16")  # fmt: skip
    _require(run.ckpt_format == "torch_dist", f"{flag} saves torch_dist checkpoints "
             f"(sharded tensors); --ckpt-format {run.ckpt_format} is not supported with it")  # fmt: skip
    _require(not t.check_weight_hash_across_dp_replicas_interval, f"{flag} keeps 1/DP of "
             "each weight on each data-parallel rank: there are no replicas to compare; drop "
             "--check-weight-hash-across-dp-replicas-interval")  # fmt: skip
    if p.overlap_grad_reduce:  # Megatron-LM builds FSDP2 without the DDP options too
        warnings.warn(f"--overlap-grad-reduce with {flag}: FSDP2 overlaps its own "
                      "reduce-scatters with the backward; the flag (megatron-core DDP's) "
                      "changes nothing", stacklevel=3)  # fmt: skip
    _require(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1", f"{flag} overlaps its "
             "collectives on their own CUDA connections: unset CUDA_DEVICE_MAX_CONNECTIONS=1 "
             "(Megatron-LM's rule)")  # fmt: skip


def _check_optimizer_offload(cfg: Config) -> None:
    """--use-precision-aware-optimizer and --optimizer-cpu-offload: megatron-core's and
    Megatron-LM's rules, one line each; the offload's options without it warned."""
    p, t = cfg.parallel, cfg.training
    if t.use_precision_aware_optimizer:  # megatron-core's OptimizerConfig asserts these
        _require(t.optimizer == "adam", "--use-precision-aware-optimizer is for Adam only "
                 "(megatron-core's rule): drop it or use --optimizer adam")  # fmt: skip
        _require(p.use_distributed_optimizer, "--use-precision-aware-optimizer works inside "
                 "the distributed optimizer (megatron-core's rule): add "
                 "--use-distributed-optimizer")  # fmt: skip
    given = [flag for flag, on in (
        ("--optimizer-offload-fraction", t.optimizer_offload_fraction != 1.0),
        ("--use-torch-optimizer-for-cpu-offload", t.use_torch_optimizer_for_cpu_offload),
        ("--overlap-cpu-optimizer-d2h-h2d", t.overlap_cpu_optimizer_d2h_h2d),
        ("--no-pin-cpu-grads", not t.pin_cpu_grads),
        ("--no-pin-cpu-params", not t.pin_cpu_params)) if on]  # fmt: skip
    if not t.optimizer_cpu_offload:
        if given:
            warnings.warn(f"{', '.join(given)}: no effect without --optimizer-cpu-offload",
                          stacklevel=3)  # fmt: skip
        return
    flag = "--optimizer-cpu-offload"
    _require(t.use_precision_aware_optimizer, f"{flag} needs --use-precision-aware-optimizer: "
             "megatron-core's hybrid optimizer reuses that flag's code path (Megatron-LM's "
             "rule): add it")  # fmt: skip
    _require(0.0 <= t.optimizer_offload_fraction <= 1.0, "--optimizer-offload-fraction "
             f"{t.optimizer_offload_fraction} must be between 0 and 1 (the share of the "
             "parameters whose optimizer step runs on the CPU)")  # fmt: skip
    _require(not t.fp8_param_gather or t.fp8_recipe == "delayed", f"{flag} with "
             "--fp8-param-gather needs --fp8-recipe delayed (Megatron-LM's rule)")  # fmt: skip
    if t.use_torch_optimizer_for_cpu_offload:
        warnings.warn("--use-torch-optimizer-for-cpu-offload changes nothing in megatron-core "
                      "0.16.1 (its Adam branch sets the GPU part's optimizer after reading "
                      "it): the CPU part is torch's AdamW and the GPU part the fused Adam "
                      "where TE or Apex is installed, torch's AdamW elsewhere", stacklevel=3)  # fmt: skip
    kept = [f"--{name.replace('_', '-')} {value}" for name, value in (
        ("main_params_dtype", t.main_params_dtype), ("exp_avg_dtype", t.exp_avg_dtype),
        ("exp_avg_sq_dtype", t.exp_avg_sq_dtype)) if value != "fp32"]  # fmt: skip
    if kept:
        warnings.warn(f"{', '.join(kept)}: with {flag} megatron-core 0.16.1's hybrid "
                      "optimizer keeps its state in fp32 (these dtypes reach Transformer "
                      "Engine's FusedAdam only without the offload); ignored", stacklevel=3)  # fmt: skip


def _check_qk_clip(cfg: Config) -> None:
    """--qk-clip with what megatron-core's clip cannot follow, one line each."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    if not m.qk_clip:
        return
    _require(not m.attention_output_gate, "--qk-clip with --attention-output-gate: "
             "megatron-core's clip reads the QKV weight as query, key and value rows per "
             "group, without the gate's rows: drop one")  # fmt: skip
    _require(not t.use_precision_aware_optimizer, "--qk-clip with "
             "--use-precision-aware-optimizer: the main weights live inside that optimizer, "
             "where megatron-core's clip cannot reach them: drop one")  # fmt: skip
    _require(not p.overlap_param_gather, "--qk-clip with --overlap-param-gather: the clip "
             "scales the weights after the step, and the overlapped gather would then write "
             "the unclipped ones over them during the next forward: drop "
             "--overlap-param-gather")  # fmt: skip
    _require(not p.use_torch_fsdp2, "--qk-clip with --use-torch-fsdp2: the clip needs each "
             "layer's whole QKV weight per tensor-parallel rank: drop one")  # fmt: skip
    if not cfg.mla.multi_latent_attention and (m.qk_layernorm or m.qk_l2_norm):
        warnings.warn("--qk-clip with --qk-layernorm / --qk-l2-norm: the norms after the QKV "
                      "projection undo the clip's scaling of its query and key rows, so it "
                      "cannot lower the logits (MLA's norms come before its up-projections, "
                      "which the clip scales)", stacklevel=3)  # fmt: skip


def check_document_mask_attention(cfg: Config, te: bool, cp: int = 1) -> None:
    """--reset-attention-mask with Transformer Engine's flash attention, or its context-
    parallel attention, neither of which takes an arbitrary mask: here where
    --transformer-impl names TE, again (tst.megatron_config) once --transformer-impl auto
    has resolved to it."""
    if not (te and cfg.data.reset_attention_mask):
        return
    _require(cfg.model.attention_backend != "flash",
             "--reset-attention-mask with --attention-backend flash under Transformer Engine: "
             "TE's flash attention takes no arbitrary mask; use --attention-backend auto (TE "
             "picks a backend that does) or unfused")  # fmt: skip
    _require(cp == 1, f"--reset-attention-mask with context parallelism (CP {cp}) under "
             "Transformer Engine: its CP attention takes no arbitrary mask; drop one, or use "
             "the local spec (--transformer-impl local), whose does")  # fmt: skip


def _check_document_mask(cfg: Config, grid: Grid) -> None:
    """--reset-attention-mask / --reset-position-ids with what cannot follow them, one line
    each (Megatron-LM would run these and attend across documents silently)."""
    m, d = cfg.model, cfg.data
    if d.reset_position_ids and m.position_embedding_type != "learned_absolute":
        warnings.warn(f"--reset-position-ids with --position-embedding-type "
                      f"{m.position_embedding_type}: the position ids reach learned absolute "
                      "position embeddings only (megatron-core's rotary embeddings follow the "
                      "place in the row, as in Megatron-LM), so it changes nothing; "
                      "--reset-attention-mask keeps documents apart", stacklevel=3)  # fmt: skip
    if not d.reset_attention_mask:
        return
    _require("--no-create-attention-mask-in-dataloader" not in dict(cfg.accepted_flags),
             "--reset-attention-mask with --no-create-attention-mask-in-dataloader: "
             "Megatron-LM then builds no mask and attends across documents; drop one (the "
             "document mask is built per micro-batch here)")  # fmt: skip
    _require(m.window_size is None, "--reset-attention-mask with --window-size: "
             "megatron-core's sliding-window attention replaces the mask it is given with "
             "its own window; drop one")  # fmt: skip
    check_document_mask_attention(cfg, m.transformer_impl == "transformer_engine", grid.cp)


def _check_group_limited_routing(experts: int, topk: int, groups: int, group_topk: int) -> None:
    """megatron-core's group-limited routing (``group_limited_topk``): the experts split into
    ``groups`` equal groups, each scored by the sum of its top ``topk // group_topk`` experts;
    a token's top ``topk`` come from its best ``group_topk`` groups. Settings it would fail
    on deep in the first forward, or route silently wrong with, are refused here."""
    flags = (f"--num-experts {experts}, --moe-router-topk {topk}, --moe-router-num-groups "
             f"{groups}, --moe-router-group-topk {group_topk}")  # fmt: skip
    _require(experts % groups == 0, f"{flags}: the experts must split into equal groups "
             "(megatron-core's rule): make --num-experts a multiple of --moe-router-num-groups")  # fmt: skip
    per_group = experts // groups
    _require(1 <= group_topk <= groups, f"{flags}: --moe-router-group-topk must be between 1 "
             "and --moe-router-num-groups (megatron-core's rule)")  # fmt: skip
    _require(group_topk <= topk, f"{flags}: each group is scored by its top --moe-router-topk "
             "/ --moe-router-group-topk experts, none here: give --moe-router-group-topk <= "
             "--moe-router-topk")  # fmt: skip
    _require(topk // group_topk <= per_group, f"{flags}: each group is scored by its top "
             f"{topk // group_topk} experts but holds {per_group}: use fewer, larger groups or "
             "a larger --moe-router-group-topk")  # fmt: skip
    _require(topk <= group_topk * per_group, f"{flags}: a token picks {topk} experts from "
             f"its {group_topk} groups of {per_group}: raise --moe-router-group-topk or lower "
             "--moe-router-topk")  # fmt: skip


def validate(cfg: Config, world_size: int, vocab_size: int) -> RunPlan:
    """Checks across concerns, once per run; returns the run's :class:`RunPlan`."""
    m, p, t, tst = cfg.model, cfg.parallel, cfg.training, cfg.tst
    _adjust_like_megatron(cfg, p.tensor_model_parallel_size)
    grid = check_grid(cfg, world_size)
    tp, dp = grid.tp, grid.dp
    if t.deterministic_mode:  # Megatron-LM's rules
        _require(not m.cross_entropy_loss_fusion,
                 "--deterministic-mode with --cross-entropy-loss-fusion: the fused cross-entropy "
                 "is not deterministic (Megatron-LM's rule): drop one")  # fmt: skip
    if t.first_last_layers_bf16:  # megatron-core's bound, named by the flags
        per_stage = m.num_layers // grid.pp
        for flag, n in (("--num-layers-at-start-in-bf16", t.num_layers_at_start_in_bf16),
                        ("--num-layers-at-end-in-bf16", t.num_layers_at_end_in_bf16)):  # fmt: skip
            _require(0 <= n <= per_stage, f"{flag} {n} must be between 0 and the layers per "
                     f"pipeline stage ({m.num_layers} / PP {grid.pp} = {per_stage})")  # fmt: skip
    if cfg.fim.fim_data:  # Megatron-LM's rules
        _require(not cfg.data.mock_data, "--fim-data rearranges text: --mock-data has none "
                 "(Megatron-LM refuses the two together); give --data-path")  # fmt: skip
        _require(not cfg.data.legacy_tokenizer, "--fim-data with --legacy-tokenizer: "
                 "Megatron-LM runs FIM with its default tokenizer system only; drop "
                 "--legacy-tokenizer")  # fmt: skip
    _require(
        not m.fp32_residual_connection or t.bf16 or t.fp16,
        "--fp32-residual-connection keeps the residual stream in fp32 under --bf16 / --fp16; "
        "this run is fp32 throughout: drop it (Megatron-LM refuses it too)",
    )
    _require(
        not m.attention_output_gate or not cfg.mla.multi_latent_attention,
        "--attention-output-gate is not supported with --multi-latent-attention (megatron-core)",
    )
    _require(
        not m.qk_l2_norm or not cfg.mla.multi_latent_attention,
        "--qk-l2-norm is not supported with --multi-latent-attention (megatron-core)",
    )
    _require(
        not m.num_experts or m.moe_router_topk != 1 or cfg.moe.moe_router_pre_softmax
        or cfg.moe.moe_router_score_function != "softmax"
        or m.moe_router_load_balancing_type == "sinkhorn",
        "--moe-router-topk 1 needs --moe-router-pre-softmax (a softmax over one selected "
        "score has zero gradient; megatron-core's rule)",
    )  # fmt: skip
    _require(
        not cfg.moe.moe_apply_probs_on_input or m.moe_router_topk == 1,
        "--moe-apply-probs-on-input needs --moe-router-topk 1 (megatron-core's rule)",
    )
    learned = m.position_embedding_type == "learned_absolute"
    if learned and "--enable-gpt-oss" in dict(cfg.accepted_flags):
        # Megatron-LM's pretraining does the same, silently; its ModelOpt configurations for
        # GPT-OSS pass no --position-embedding-type and rely on ModelOpt's builder (YaRN).
        warnings.warn("--enable-gpt-oss is read by Megatron-LM's ModelOpt model builder only "
                      "(GPT-OSS's YaRN positions): this run builds learned absolute positions "
                      "(--position-embedding-type's default), as Megatron-LM's pretraining does; "
                      "pass --position-embedding-type rope for rotary ones, as its GPT-OSS "
                      "example does", stacklevel=3)  # fmt: skip
    if m.num_experts and cfg.moe.moe_router_num_groups:
        _check_group_limited_routing(m.num_experts, m.moe_router_topk,
                                     cfg.moe.moe_router_num_groups, cfg.moe.moe_router_group_topk)  # fmt: skip
    _check_optimizer_offload(cfg)
    _check_qk_clip(cfg)
    _check_document_mask(cfg, grid)
    _require(
        "--load-main-params-from-ckpt" not in dict(cfg.accepted_flags) or cfg.run.no_load_optim,
        "--load-main-params-from-ckpt must be used with --no-load-optim (Megatron-LM's rule: "
        "with the optimizer state loaded, the main weights come from it)",
    )
    if p.use_torch_fsdp2:
        _check_torch_fsdp2(cfg, grid)
    elif not p.torch_fsdp2_reshard_after_forward:
        warnings.warn("--torch-fsdp2-no-reshard-after-forward applies to --use-torch-fsdp2, "
                      "which is not given: it changes nothing", stacklevel=2)  # fmt: skip
    if p.defer_embedding_wgrad_compute:
        _check_deferred_output_wgrad(cfg, grid.pp)
    elif p.wgrad_deferral_limit:
        warnings.warn("--wgrad-deferral-limit bounds --defer-embedding-wgrad-compute, which "
                      "is not given: it changes nothing", stacklevel=2)  # fmt: skip
    if cfg.moe.use_fused_weighted_squared_relu:
        if not (m.num_experts and m.squared_relu):
            warnings.warn("--use-fused-weighted-squared-relu fuses the MoE experts' squared ReLU: "
                          "this model has " + ("no --squared-relu" if m.num_experts else
                          "no experts") + ", so it changes nothing", stacklevel=2)  # fmt: skip
        # megatron-core's grouped-GEMM experts assert at the first step that the fused
        # activation gets no bias; the sequential experts never take that path.
        _require(
            not (m.num_experts and m.squared_relu and m.moe_grouped_gemm and m.add_bias_linear),
            "--use-fused-weighted-squared-relu: the fused activation of the grouped-GEMM experts "
            "takes no bias, and linear biases are on by default (Megatron-LM's): add "
            "--disable-bias-linear",
        )
    if t.test_mode:  # megatron-core's one real-time test reads the q / k norms' biases
        _require(not m.qk_layernorm or m.normalization == "LayerNorm",
                 "--test-mode compares the q / k LayerNorm weights and biases across ranks: "
                 f"with --normalization {m.normalization} (no biases) megatron-core's check "
                 "fails; use LayerNorm or drop --test-mode")  # fmt: skip
        if not m.qk_layernorm or cfg.mla.multi_latent_attention:
            warnings.warn("--test-mode checks --qk-layernorm's q / k norms in standard attention "
                          "(megatron-core's only real-time test): this model has none to check",
                          stacklevel=2)  # fmt: skip
    if m.moe_use_upcycling:
        _check_upcycling(cfg, grid.etp)
    _require(
        not (m.num_experts and m.moe_shared_expert_intermediate_size and m.add_bias_linear),
        "--moe-shared-expert-intermediate-size: megatron-core's shared experts take no biases, "
        "and linear biases are on by default (Megatron-LM's): add --disable-bias-linear",
    )
    _require(
        not (m.moe_latent_size and cfg.moe.moe_shared_expert_overlap),
        "--moe-shared-expert-overlap is not supported with --moe-latent-size (megatron-core's "
        "rule): drop one",
    )
    _require(
        not cfg.moe.moe_shared_expert_gate or bool(m.moe_shared_expert_intermediate_size),
        "--moe-shared-expert-gate gates the shared expert: give "
        "--moe-shared-expert-intermediate-size",
    )
    _require(
        not cfg.run.distrib_optim_fully_reshardable_mem_efficient or p.enable_gloo_process_groups,
        "--distrib-optim-fully-reshardable-mem-efficient gathers the optimizer state over "
        "megatron-core's gloo groups: drop --disable-gloo-process-groups (or that flag)",
    )
    _require(
        not p.tp_comm_overlap or p.sequence_parallel,
        "--tp-comm-overlap needs --sequence-parallel (Megatron-LM's rule; with TP 1 sequence "
        "parallelism is off)",
    )
    if p.sequence_parallel:
        _require(
            m.seq_length % tp == 0, "--seq-length must be divisible by TP with --sequence-parallel"
        )
    if p.distribute_saved_activations:  # Megatron-LM's and megatron-core's rules
        _require(tp > 1, "--distribute-saved-activations splits the saved activations over "
                 "tensor-parallel ranks: it needs --tensor-model-parallel-size > 1")  # fmt: skip
        _require(not p.sequence_parallel, "--distribute-saved-activations with "
                 "--sequence-parallel: the activations are split over TP already; drop one")  # fmt: skip
    _require(
        m.resolved_ffn_hidden_size >= 1,
        f"--hidden-size {m.hidden_size} gives no SwiGLU MLP width by Megatron-LM's rule "
        "(int(8/3 x hidden / 64) x 64 = 0): give --ffn-hidden-size",
    )
    gbs = t.global_batch_size or t.micro_batch_size * dp
    rampup = tuple(t.rampup_batch_size) if t.rampup_batch_size else None
    _require(not (rampup and cfg.run.phase_transition_iterations),
             "--phase-transition-iterations needs the same global batch in every data phase: "
             "it does not support --rampup-batch-size (Megatron-LM's rule)")  # fmt: skip
    unit = t.micro_batch_size * dp
    step_schedule = None
    if t.step_batch_size_schedule is not None:
        step_schedule = step_batch_schedule(t.step_batch_size_schedule, m.seq_length)
        gbs = step_schedule[-1][1]
        _require(not cfg.run.phase_transition_iterations,
                 "--phase-transition-iterations needs the same global batch in every data "
                 "phase: it does not support --step-batch-size-schedule")  # fmt: skip
        for threshold, batch in step_schedule:
            _require(batch % unit == 0, f"--step-batch-size-schedule: the batch {batch} (from "
                     f"{threshold} samples) is not divisible by --micro-batch-size "
                     f"{t.micro_batch_size} x data-parallel size {dp}")  # fmt: skip
    if t.decrease_batch_size_if_needed and rampup is None:
        _require(gbs >= unit, f"--global-batch-size {gbs} is less than one micro-batch on each "
                 f"data-parallel rank (--micro-batch-size {t.micro_batch_size} x data-parallel "
                 f"size {dp} = {unit}), even with --decrease-batch-size-if-needed")  # fmt: skip
        if gbs % unit:
            _warn_decreased_batch(cfg, gbs, unit, dp)
    else:
        _require(
            gbs % unit == 0,
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}"
            + ("" if rampup else " (--decrease-batch-size-if-needed trains the largest multiple "
               "of it below, Megatron-LM's option)"),
        )  # fmt: skip
    if rampup is not None:
        start, increment, _ = rampup
        _require(start <= gbs and (gbs - start) % increment == 0,
                 f"--rampup-batch-size: the global batch {gbs} minus START {start} must be a "
                 f"multiple of INCREMENT {increment}")  # fmt: skip
        _require(start % (t.micro_batch_size * dp) == 0 and increment % (t.micro_batch_size * dp) == 0,
                 "--rampup-batch-size: START and INCREMENT must be multiples of micro-batch x "
                 f"data-parallel size = {t.micro_batch_size * dp}")  # fmt: skip
    num_micro = gbs // (t.micro_batch_size * dp)
    evaluate = cfg.log.eval_iters > 0 or cfg.log.full_validation
    eval_mbs, eval_gbs = _eval_batch(cfg, dp, gbs, unit, evaluate)
    # Every count of micro-batches a schedule runs: a training step's (at each ramp-up batch)
    # and an evaluation's.
    counts = sorted({num_micro} | ({
        size // (t.micro_batch_size * dp) for size in range(rampup[0], gbs, rampup[1])
    } if rampup else set()) | ({eval_gbs // (eval_mbs * dp)} if evaluate else set())
      | {batch // unit for _, batch in step_schedule or ()})  # fmt: skip
    group = p.microbatch_group_size_per_virtual_pipeline_stage
    if group is not None:
        _require(group >= 1, "--microbatch-group-size-per-virtual-pipeline-stage must be >= 1")
        if not grid.vpp:
            warnings.warn("--microbatch-group-size-per-virtual-pipeline-stage orders the "
                          "interleaved schedule only: without virtual pipeline stages it has no "
                          "effect", stacklevel=2)  # fmt: skip
        else:  # megatron-core's rules, checked at its first step otherwise
            for m_count in counts:
                _require(grid.pp <= group <= m_count, "--microbatch-group-size-per-virtual-"
                         f"pipeline-stage {group} must be between PP={grid.pp} and the "
                         f"micro-batches per step ({m_count})")  # fmt: skip
                _require(m_count % group == 0 or m_count % group >= grid.pp,
                         f"--microbatch-group-size-per-virtual-pipeline-stage {group} leaves a "
                         f"last group of {m_count % group} of the {m_count} micro-batches per "
                         f"step, fewer than PP={grid.pp} (a pipeline bubble megatron-core "
                         "refuses): use a divisor of it")  # fmt: skip
    if grid.vpp and group is None:  # the default group (PP): megatron-core's rules above
        _require(
            num_micro % grid.pp == 0 and (rampup is None or all(
                r // (t.micro_batch_size * dp) % grid.pp == 0 for r in rampup[:2]))
            and all(batch // unit % grid.pp == 0 for _, batch in step_schedule or ()),
            "interleaved pipelining needs the number of "
            f"micro-batches ({num_micro}) to be a multiple of PP={grid.pp} (or "
            "--microbatch-group-size-per-virtual-pipeline-stage dividing it)",
        )  # fmt: skip
        eval_micro = eval_gbs // (eval_mbs * dp)
        _require(not evaluate or eval_micro % grid.pp == 0,
                 "interleaved pipelining needs the micro-batches of an evaluation batch "
                 f"({eval_micro}: --eval-global-batch-size {eval_gbs} / (--eval-micro-batch-"
                 f"size {eval_mbs} x data-parallel size {dp})) to be a multiple of "
                 f"PP={grid.pp}")  # fmt: skip
    train_iters = _train_iters(cfg, gbs, rampup, step_schedule)
    _require(train_iters >= 1, f"--train-samples {t.train_samples} is less than one step")
    if tst.tst_iters is not None:
        _require(tst.tst_iters <= train_iters, "--tst-iters must be <= --train-iters")
    for flag, on in (
        ("--tst-reinit-input-embedding-at-switch", tst.tst_reinit_input_embedding_at_switch),
        ("--tst-reinit-output-layer-at-switch", tst.tst_reinit_output_layer_at_switch),
    ):
        # Tied, the two are one tensor: one side alone cannot be re-initialised.
        _require(not on or m.untie_embeddings_and_output_weights,
                 f"{flag} needs --untie-embeddings-and-output-weights (tied, the input "
                 "embedding and the output layer are one tensor; "
                 "--tst-reinit-embeddings-at-switch re-initialises it)")  # fmt: skip
    _require(vocab_size >= 1, "vocabulary size must be >= 1")
    divisible_by = cfg.data.make_vocab_size_divisible_by
    _require(divisible_by >= 1, f"--make-vocab-size-divisible-by must be >= 1, got {divisible_by}")
    padded = cfg.data.padded_vocab_size
    if padded is None and not cfg.data.pad_vocab_size:
        padded = vocab_size  # --no-pad-vocab-size: the tokenizer's size as it is
        _require(padded % tp == 0, f"--no-pad-vocab-size: the tokenizer's {vocab_size} ids "
                 f"do not divide by TP={tp} (each tensor-parallel rank holds an equal "
                 f"vocabulary shard): give --padded-vocab-size {-(-padded // tp) * tp}, or "
                 "drop the flag to pad by --make-vocab-size-divisible-by x TP")  # fmt: skip
    elif padded is None:
        multiple = divisible_by * tp  # Megatron-LM's rule
        padded = -(-vocab_size // multiple) * multiple
    else:  # taken as given, as Megatron-LM does; megatron-core shards it evenly over TP
        _require(padded >= vocab_size, f"--padded-vocab-size {padded} is smaller than the "
                 f"tokenizer's vocabulary ({vocab_size} ids): its last ids would have no "
                 f"embedding row; give at least {vocab_size}, or drop the flag to pad "
                 "by --make-vocab-size-divisible-by")  # fmt: skip
        _require(padded % tp == 0, f"--padded-vocab-size {padded} does not divide by "
                 f"TP={tp} (each tensor-parallel rank holds an equal vocabulary shard): give "
                 f"{-(-padded // tp) * tp}, or drop the flag to pad by "
                 "--make-vocab-size-divisible-by x TP")  # fmt: skip
    if t.fp8_format is not None:
        _require(
            m.transformer_impl != "local",
            "FP8 needs Transformer Engine: drop --fp8-format or use "
            "--transformer-impl transformer_engine",
        )
    schedule = PhaseSchedule.from_config(cfg, train_iters)
    # The LR scheduler counts samples, as Megatron-LM's does.
    if t.sample_based:
        decay = t.lr_decay_samples or t.train_samples
        warmup = t.lr_warmup_samples
        wsd = t.lr_wsd_decay_samples
        wd_incr = t.train_samples
    else:
        decay = (t.lr_decay_iters or train_iters) * gbs
        warmup = t.lr_warmup_iters * gbs
        wsd = t.lr_wsd_decay_iters * gbs if t.lr_wsd_decay_iters else None
        wd_incr = train_iters * gbs
    if t.lr_warmup_fraction is not None:
        warmup = int(t.lr_warmup_fraction * decay)
    if t.lr_decay_style == "WSD" and wsd is None:
        wsd = max(1, train_iters // 10) * gbs  # default: the last 10% of the run
    _require(
        evaluate or not cfg.run.skip_train,
        "--skip-train only evaluates: give --eval-iters > 0 (batches per evaluation) or "
        "--full-validation",
    )
    return RunPlan(
        grid=grid,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=gbs,
        rampup=rampup,
        step_schedule=step_schedule,
        train_iters=train_iters,
        padded_vocab_size=padded,
        schedule=schedule,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        wsd_decay_steps=wsd,
        wd_incr_steps=wd_incr,
        evaluate=evaluate,
        eval_micro_batch_size=eval_mbs,
        eval_batch_size=eval_gbs,
    )


def _eval_batch(cfg: Config, dp: int, gbs: int, unit: int, evaluate: bool) -> tuple[int, int]:
    """(micro-batch, global batch) of an evaluation: --eval-micro-batch-size and
    --eval-global-batch-size (Megatron-LM 0.19's), by default the training's micro-batch and
    the batch a full training step trains."""
    log = cfg.log
    eval_mbs = log.eval_micro_batch_size or cfg.training.micro_batch_size
    eval_gbs = log.eval_global_batch_size or (gbs - gbs % unit)
    _require(not evaluate or eval_gbs % (eval_mbs * dp) == 0,
             f"--eval-global-batch-size {eval_gbs} is not divisible by --eval-micro-batch-size "
             f"{eval_mbs} x data-parallel size {dp} (Megatron-LM's rule)")  # fmt: skip
    return eval_mbs, eval_gbs
