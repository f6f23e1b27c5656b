"""Fixes for megatron-core 0.16.1 defects that are not about the device (applied on every
machine, once, when a run lays out its process groups).

``RowParallelLinear`` sends its output through ``reduce_from_tensor_model_parallel_region``,
a custom autograd Function that returns its input unchanged when the group has one rank.
autograd then treats the output as a view made inside a custom Function, and any in-place
change to it is refused. ``SequentialMLP`` experts with linear biases (``--num-experts``
with Megatron-LM's default biases, expert-parallel and expert-tensor-parallel sizes 1) add
the probability-weighted bias to that output in place (``megatron/core/transformer/mlp.py``),
so such a run died at its first step; with sequence parallelism and expert-TP 1 the
reduce-scatter does the same. With one rank both are the identity in both directions, so the
fix skips the Function there; with more ranks nothing changes.

``mark_expert_parameters``: megatron-core marks a routed expert's parameters as expert
parameters (``allreduce = False``: gradients reduced over the expert-data-parallel group,
their own optimizer, norms over the expert groups) only when expert parallelism is > 1.
With expert-TP apart from TP and EP 1 (e.g. TP 2, ``--expert-tensor-parallel-size 1``) the
TP ranks hold whole replicas of each expert but see different tokens (sequence parallelism),
and their gradients were never summed: the replicas drifted apart, silently. Megatron-LM
fixed the predicate upstream (``is_expert and (EP > 1 or ETP != TP)``, NVIDIA/Megatron-LM
PR 5916, after 0.16.1); the same rule is applied here to the built model. Two more
expert-parameter defects go with it: a routed expert's row-parallel bias carries the
``sequence_parallel`` mark, so ``finalize_model_grads`` summed its gradient over the *dense*
TP group (on top of the expert-data-parallel reduction: twice the gradient for replicas,
other experts' gradients mixed in under EP), and the expert optimizer's duplicate filter used
the dense TP rank (``tp_group``), so a TP rank > 0 left its expert biases out of the gradient
norm (upstream PR 6165). ``fix_expert_optimizer`` points that filter at the expert-TP group.

``mark_attention_sinks``: the learnable softmax offset of ``--softmax-type learnable`` (one
logit per attention head, GPT-OSS's attention sinks) is split over tensor parallelism by
head, as its checkpoint entry says, but megatron-core's local attention leaves it unmarked.
An unmarked parameter counts as a TP duplicate: only TP rank 0's offsets entered the gradient
norm (clipping saw half of them at TP 2), and layout-independent initialisation drew the
same values for every rank's heads. The parameter is marked tensor-parallel along its one
dimension, as megatron-core marks a column-parallel bias.

``--moe-input-jitter-eps``: megatron-core's router multiplies its input by uniform noise in
evaluation as well as in training, so every validation loss was a random draw; the noise is
a training-time regulariser (Switch Transformer), and here it applies in training only.

Router losses under per-token loss normalisation (the trainer always normalises by the
global batch's loss tokens, ``calculate_per_token_loss``): megatron-core scales each rank's
part of the balancing loss (and the z-loss) by the rank's *local* token count so that
``finalize_model_grads``' division by all tokens leaves a per-micro-batch mean. Under
sequence or context parallelism a rank holds 1 / (TP x CP) of the micro-batch's tokens, so
the router-loss gradient shrank by TP x CP (measured: TP 2 + SP with
``--moe-aux-loss-coeff 2e-2`` trained bit-for-bit like TP 1 with 1e-2), and the sequence-level
loss was scaled by the sequence length instead of the micro-batch's token count (1 / MBS too
weak). Upstream fixed both after 0.16.1 (NVIDIA/Megatron-LM PRs 5047 and 5798); here the
count is the micro-batch's whole token count, so the coefficients mean the same at every
layout and micro-batch size.

``--decoupled-lr``: megatron-core 0.16.1 gives the embedding and output weights a
parameter group of their own (its ``max_lr`` / ``min_lr`` overridden), whose identifying
fields (``wd_mult``, ``lr_mult``, ``is_expert_parallel``, ``is_decoupled_lr``) equal the
default group's; on resume both optimizers match the saved groups to the run's by those
fields, and the two collapsed into one: a resume died with the plain optimizer ("a parameter
group that doesn't match the size of optimizer's group"), and with the distributed one every
parameter silently resumed at the decoupled learning rate (measured: the resumed run's second
step left the unbroken run's by 0.012 nats). Upstream matches by the overridden fields too,
after 0.16.1; here ``default_config`` (megatron-core's own mark, False exactly for a group
whose LR schedule is overridden) joins the matched fields.

``--use-torch-fsdp2`` checkpoints: megatron-core finds the checkpoint entry of each
parameter the optimizer holds by object identity, the model's entry holding the parameter's
local shard (``DTensor._local_tensor``) and the optimizer's side ``DTensor.to_local()``, which
in torch 2.13 returns a new alias of the shard at every call: no parameter was found, and
every save of an FSDP2 run failed ("Param id 0 does not match any model sharded param").
There the shard itself is taken, the same tensor the model's entry holds.

``--use-torch-fsdp2`` with SwiGLU: the fused gate / up weight of a TP rank is stored in
checkpoints as two halves (``apply_swiglu_sharded_factory`` splits the rank's tensor in two
and places the gate half among the gate rows of all TP ranks, the up half among the up rows).
Under FSDP2 a rank holds 1/DP of the TP rank's rows, all gate or all up (DP even), and the
factory split *that* in two: checkpoints were laid out wrongly, self-consistent only at the
same DP size (measured: a DDP run resumed from an FSDP2 checkpoint at the same layout started
0.0009 nats off the unbroken run; at another DP size the weights would load scrambled). Here
such a shard is one entry at its true place among the gate or up rows.

``--defer-embedding-wgrad-compute``: every megatron-core ``ColumnParallelLinear`` reads the
flag from the shared config and appends its input to an ``embedding_activation_buffer``,
which only the output layer is given; the Transformer Engine spec replaces every other
column-parallel linear with TE's, but the local spec builds them from megatron-core's, so a
local-spec run died at its first forward (``None.append``). ``defer_output_wgrad_only`` gives
those other layers a config copy with the flag off: only the output layer defers, as in the
TE spec.

``drop_unused_mtp_output_weight``: with tied embeddings and pipeline parallelism, the last
stage holds the MTP block and, for it, a copy of the input embedding, which also serves as
its output layer (megatron-core's ``shared_embedding_or_output_weight``); yet the output
layer allocates a weight of its own there (its skip condition reads the first stage only),
never used in a forward pass, so never given a gradient, and the checkpoint code asserts it
is absent ("output layer will not have any weight"): every save of such a run failed. The
unused weight is removed from the built model: the vocabulary-sized parameter's memory back,
and its checkpoints save and resume.

``--optimizer-cpu-offload`` without Transformer Engine: Megatron-LM asks for
``--use-precision-aware-optimizer`` with it, and megatron-core's ``OptimizerConfig`` then
compares Transformer Engine's version with 2.1 (to turn off TE FusedAdam's ``store_param_
remainders``) whether or not TE is installed: with it absent the comparison raised
``TypeError`` (None >= Version), so the hybrid optimizer, which is torch's AdamW and needs no
TE, could not even be configured. Without TE the answer is "not 2.1 or later".

fp32 parameters with ``--use-precision-aware-optimizer`` (so with ``--optimizer-cpu-offload``):
the distributed optimizer hands the inner optimizer its fp32 parameters' shards as they are,
views of parameters that require gradients, hence not leaves, and torch's optimizers refuse
those ("can't optimize a non-leaf Tensor"); every fp32 run with the precision-aware optimizer
died building it (bf16 and fp16 shards were detached already). The fp32 shards are detached
the same way: the same storage (the optimizer's in-place step still writes the weights), the
same tensor-parallel attributes.

``--optimizer-cpu-offload`` with fp32 parameters, three defects of megatron-core's
``HybridDeviceOptimizer``: (1) the parameters left on the GPU (``--optimizer-offload-fraction``
below 1) are stepped by the GPU optimizer, which reads ``decoupled_grad`` when it is
Transformer Engine's or Apex's fused Adam; without them it is torch's AdamW, which reads
``.grad``: an fp32 parameter there never had one, so it never moved (silently: measured, the
losses left the plain optimizer's at the third step). Its gradient is handed to ``.grad``
too when the GPU optimizer is torch's. (2) a load re-syncs each fp32 main-weight copy from the
state through a map of the copies made for non-fp32 parameters only, which it indexes with
every parameter: ``KeyError`` for any fp32 one, so no fp32 run could resume. Parameters
without such a copy are skipped (their offloaded copy is remade from the loaded weights).
(3) when the weights change outside the optimizer (``--finetune`` / ``--no-load-optim``
loads, the switch's re-initialisations, MoE upcycling), megatron-core refreshes the fp32
copies of non-fp32 parameters only: an offloaded fp32 parameter's host copy kept the old
weights, and the next step wrote them back over the loaded ones. Those copies are refreshed
too.
"""

from __future__ import annotations

import copy
import types

__all__ = [
    "apply",
    "defer_output_wgrad_only",
    "drop_unused_mtp_output_weight",
    "fix_expert_optimizer",
    "mark_attention_sinks",
    "mark_expert_parameters",
]

_APPLIED = "_tst_megatron_fixes_applied"


def apply() -> None:
    """Idempotent: patch the names ``megatron.core.tensor_parallel.layers`` calls."""
    from megatron.core.tensor_parallel import layers, mappings

    if getattr(layers, _APPLIED, False):
        return
    reduce = mappings.reduce_from_tensor_model_parallel_region
    reduce_scatter = mappings.reduce_scatter_to_sequence_parallel_region

    def reduce_from_tensor_model_parallel_region(input_, group=None):
        group = mappings.get_tensor_model_parallel_group_if_none(group)
        if group.size() == 1:  # the identity, forward and backward
            return input_
        return reduce(input_, group)

    def reduce_scatter_to_sequence_parallel_region(input_, group=None, **kwargs):
        group = mappings.get_tensor_model_parallel_group_if_none(group)
        if group.size() == 1 and kwargs.get("input_split_sizes") is None:  # the identity
            return input_
        return reduce_scatter(input_, group, **kwargs)

    layers.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region
    layers.reduce_scatter_to_sequence_parallel_region = reduce_scatter_to_sequence_parallel_region
    _fix_router_loss_scaling()
    _fix_fully_reshardable_adam_step()
    _fix_single_deferred_wgrad()
    _fix_param_group_matching()
    _fix_dtensor_param_identity()
    _fix_fsdp2_swiglu_entries()
    _fix_te_version_check_without_te()
    _fix_precision_aware_fp32_shards()
    _fix_hybrid_optimizer_fp32_params()
    _fix_activation_offload_without_te()
    _fix_qk_clip_under_tensor_parallelism()
    setattr(layers, _APPLIED, True)


def _fix_qk_clip_under_tensor_parallelism() -> None:
    """``SelfAttention._clip_linear_qkv`` (``--qk-clip``) splits the QKV weight into query, key
    and value rows per query group using the *whole* model's projection sizes over this
    rank's groups: under tensor parallelism each group's row count came out TP times too
    large, the weight was read with the wrong width, and the clip failed on a shape mismatch
    (or, where the sizes happened to divide, would scale the wrong rows). The rows are split
    here with this rank's sizes: per group its query heads, then its key head, then its value
    head (megatron-core's QKV layout), the query rows scaled by eta^alpha and the key rows
    by eta^(1-alpha)."""
    from megatron.core.transformer.attention import SelfAttention

    def _clip_linear_qkv(self, weight):
        groups = self.num_query_groups_per_partition
        head = self.hidden_size_per_attention_head
        query_rows = self.num_attention_heads_per_partition // groups * head
        rows = weight.view(groups, query_rows + 2 * head, -1)
        eta, alpha = self.qk_clip_balancing_eta, self.config.qk_clip_alpha
        rows[:, :query_rows].mul_(eta.pow(alpha))
        rows[:, query_rows : query_rows + head].mul_(eta.pow(1 - alpha))
        return weight

    SelfAttention._clip_linear_qkv = _clip_linear_qkv


def _fix_activation_offload_without_te() -> None:
    """Fine-grained activation offloading's hooks switch Transformer Engine's own offload
    flag (``cpu_offload.CPUOffloadEnabled``, which TE's layers read) on and off around each
    offloaded module, and raise when TE is absent, though nothing else of TE is used: the
    local spec's layers save their tensors through autograd, which the hooks move. Without
    TE the flag gets a holder of its own."""
    from megatron.core.extensions import transformer_engine as te_extension

    if te_extension.cpu_offload is None:
        te_extension.cpu_offload = types.SimpleNamespace(CPUOffloadEnabled=False)


def _fix_hybrid_optimizer_fp32_params() -> None:
    """The hybrid CPU / GPU optimizer with fp32 parameters: gradients for torch's GPU
    optimizer, a load that does not index fp32 parameters among the fp32 copies, and host
    copies that follow weights changed outside the optimizer."""
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    set_grads = HybridDeviceOptimizer._set_sub_optimizer_grads

    def _set_sub_optimizer_grads(self):
        set_grads(self)
        gpu = self.gpu_optimizer
        if gpu is None or not type(gpu).__module__.startswith("torch.optim"):
            return  # a fused Adam reads decoupled_grad itself
        for group in gpu.param_groups:
            for param in group["params"]:
                grad = getattr(param, "decoupled_grad", None)
                if param not in self.fp32_param_to_orig_param and grad is not None:
                    param.grad = grad if grad.dtype == param.dtype else grad.to(param.dtype)

    def _update_fp32_params_by_new_state(self):
        if not self.param_update_in_fp32:
            return
        for param, state in self.state.items():
            if param in self.param_to_fp32_param:
                self.param_to_fp32_param[param].data.copy_(state["master_param"])

    refresh = HybridDeviceOptimizer.update_fp32_param_by_new_param

    def update_fp32_param_by_new_param(self):
        refresh(self)
        for param, host in self.gpu_params_map_cpu_copy.items():
            if param not in self.param_to_fp32_param:  # an fp32 parameter's own host copy
                host.data.copy_(param)

    HybridDeviceOptimizer.update_fp32_param_by_new_param = update_fp32_param_by_new_param
    HybridDeviceOptimizer._set_sub_optimizer_grads = _set_sub_optimizer_grads
    HybridDeviceOptimizer._update_fp32_params_by_new_state = _update_fp32_params_by_new_state


def _fix_precision_aware_fp32_shards() -> None:
    """The distributed optimizer's fp32 shards as leaves under the precision-aware optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

    build = DistributedOptimizer._build_model_and_main_param_groups.__func__

    def _build_model_and_main_param_groups(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges,
                                           config):  # fmt: skip
        groups = build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        if not config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return groups
        model_fp32_groups, shard_fp32_groups = groups[1], groups[3]
        for models, shards, group_range in zip(model_fp32_groups, shard_fp32_groups,
                                               opt_group_ranges, strict=True):  # fmt: skip
            leaves = {}
            for index, (model_param, shard) in enumerate(zip(models, shards, strict=True)):
                leaf = shard.detach()
                copy_tensor_model_parallel_attributes(leaf, model_param)
                if hasattr(shard, "shared"):
                    leaf.shared = shard.shared
                shards[index] = leaves[id(shard)] = leaf
            params = group_range["orig_group"]["params"]
            group_range["orig_group"]["params"] = [leaves.get(id(p), p) for p in params]
        return groups

    DistributedOptimizer._build_model_and_main_param_groups = classmethod(
        _build_model_and_main_param_groups
    )


def _fix_te_version_check_without_te() -> None:
    """``is_te_min_version`` where ``OptimizerConfig`` reads it: False without TE."""
    from megatron.core import utils
    from megatron.core.optimizer import optimizer_config

    def is_te_min_version(version, check_equality=True):
        if utils.get_te_version() is None:
            return False
        return utils.is_te_min_version(version, check_equality)

    optimizer_config.is_te_min_version = is_te_min_version


def _fix_fsdp2_swiglu_entries() -> None:
    """``--use-torch-fsdp2`` with SwiGLU: the fused gate / up weight's checkpoint entry laid
    out for the FSDP2 shard a rank holds (see the module docstring)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer import mlp
    from megatron.core.transformer.moe import experts

    from tst.fsdp import SHARD_MARK

    upstream = mlp.apply_swiglu_sharded_factory

    def apply_swiglu_sharded_factory(
        original_sh_ten, sharded_offsets, singleton_local_shards=False
    ):
        dp, dp_rank = getattr(original_sh_ten.data, SHARD_MARK, (1, 0))
        if dp == 1:  # a TP shard (or no FSDP2 sharding): megatron-core's factory
            return upstream(original_sh_ten, sharded_offsets, singleton_local_shards)
        if singleton_local_shards or dp % 2:
            raise ValueError(f"{original_sh_ten.key}: an FSDP2 shard of a SwiGLU weight at "
                             f"data-parallel size {dp} cannot be checkpointed with "
                             "singleton local shards or an odd data-parallel size")  # fmt: skip
        axis = len(sharded_offsets)  # the rows, after the prepended (expert) axes
        rows = original_sh_ten.local_shape[0]
        fragment = original_sh_ten.global_offset[axis] // rows  # TP rank x DP + DP rank
        tp_rank, tp = fragment // dp, original_sh_ten.axis_fragmentations[axis] // dp
        half = dp // 2  # ranks 0 .. half-1 hold gate rows, the others up rows
        index = (dp_rank // half) * tp * half + tp_rank * half + dp_rank % half
        return ShardedTensor.from_rank_offsets(
            original_sh_ten.key, original_sh_ten.data, *sharded_offsets, (axis, index, tp * dp),
            replica_id=original_sh_ten.replica_id, prepend_axis_num=axis,
        )  # fmt: skip

    mlp.apply_swiglu_sharded_factory = experts.apply_swiglu_sharded_factory = (
        apply_swiglu_sharded_factory
    )


def _fix_dtensor_param_identity() -> None:
    """``--use-torch-fsdp2``: the optimizer's checkpoint entries find their parameters' (see
    the module docstring); the local shard itself, not a new alias of it."""
    from megatron.core.dist_checkpointing import optimizer as dist_optimizer
    from torch.distributed.tensor import DTensor

    def to_local_if_dtensor(tensor):
        return tensor._local_tensor if isinstance(tensor, DTensor) else tensor

    dist_optimizer.to_local_if_dtensor = to_local_if_dtensor


def _fix_param_group_matching() -> None:
    """Resuming an optimizer whose parameter groups differ only in their learning rate
    (``--decoupled-lr``: see the module docstring): ``default_config`` joins the fields both
    optimizers match saved groups by (the tuple is read at each load, in both modules)."""
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as mco

    keys = mco.param_group_identifier_keys
    if "default_config" not in keys:
        keys = (*keys, "default_config")
    mco.param_group_identifier_keys = distrib_optimizer.param_group_identifier_keys = keys


def _fix_single_deferred_wgrad() -> None:
    """The pipeline flush's drain of deferred output-layer weight gradients, for one.

    megatron-core's ``drain_embedding_wgrad_compute`` takes the first buffered input before
    its loop and the last gradient after it, with the loop's index; with one micro-batch
    buffered (a step of one micro-batch, or ``--wgrad-deferral-limit 1``) the loop never
    runs and the index is unset (``UnboundLocalError``, still so upstream). One is computed
    here directly, the same way: the input gathered over TP under sequence parallelism, the
    gradient accumulated into ``main_grad`` by the fused kernel.
    """
    import torch
    from megatron.core import utils
    from megatron.core.pipeline_parallel import schedules

    drain = schedules.drain_embedding_wgrad_compute

    @torch.no_grad()  # gradients by hand; the CPU gather writes through views of its output
    def drain_embedding_wgrad_compute(config, activations, grads, weight, tp_group):
        if len(activations) != 1 or len(grads) != 1:
            return drain(config, activations, grads, weight, tp_group)
        import fused_weight_gradient_mlp_cuda as kernel

        total_input, grad_output = activations.pop(0), grads.pop(0)
        if config.sequence_parallel:
            shape = (total_input.shape[0] * tp_group.size(), *total_input.shape[1:])
            gathered = torch.empty(shape, dtype=total_input.dtype, device=total_input.device)
            utils.dist_all_gather_func(gathered, total_input.contiguous(), group=tp_group)
            total_input = gathered
        grad_output, total_input = utils.prepare_input_tensors_for_wgrad_compute(
            grad_output, total_input
        )
        accumulate = (kernel.wgrad_gemm_accum_fp32 if weight.main_grad.dtype == torch.float32
                      else kernel.wgrad_gemm_accum_fp16)  # fmt: skip
        accumulate(total_input, grad_output, weight.main_grad)

    schedules.drain_embedding_wgrad_compute = drain_embedding_wgrad_compute


def _fix_fully_reshardable_adam_step() -> None:
    """The distributed optimizer's ``fully_reshardable`` load keeps torch Adam's ``step``.

    megatron-core 0.16.1 copies every state tensor a parameter holds from the checkpoint's,
    but the checkpoint holds no per-parameter ``step`` (it is saved with the param groups and
    already set from them by then): with torch's Adam (no Apex or Transformer Engine FusedAdam,
    whose state has no ``step``) every such load died with ``KeyError: 'step'``. The step is
    kept as set; every other tensor is copied as before."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        state = None
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
        step = state.pop("step", None) if state is not None else None
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _fix_router_loss_scaling() -> None:
    """Router losses count a micro-batch's whole tokens under per-token normalisation."""
    from megatron.core.transformer.moe.router import TopKRouter

    attach = TopKRouter.attach_and_log_load_balancing_loss
    apply_z_loss = TopKRouter.apply_z_loss

    def attach_and_log_load_balancing_loss(
        self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
        reduce_group_has_dp=False, valid_token_count=None,
    ):  # fmt: skip
        if self.calculate_per_token_loss:
            # The count of the whole micro-batch: every sequence (the sequence-level loss
            # passes one sequence's length), on every TP x CP rank.
            count = activation.shape[0] if valid_token_count is None else valid_token_count
            if aux_loss_name == "seq_load_balancing_loss" and isinstance(count, int) and count:
                count = activation.shape[0]
            valid_token_count = count * self.tp_cp_group.size()
        return attach(
            self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count,
        )  # fmt: skip

    def apply_z_loss_fixed(self, logits, padding_mask=None):
        config, size = self.config, self.tp_cp_group.size()
        if not (self.calculate_per_token_loss and config.moe_z_loss_coeff and size > 1):
            return apply_z_loss(self, logits, padding_mask=padding_mask)
        # megatron-core divides the coefficient by TP x CP, then scales by the local count:
        # the gradient came out TP x CP too small. The logged value divides it out again.
        coeff = config.moe_z_loss_coeff
        config.moe_z_loss_coeff = coeff * size
        try:
            return apply_z_loss(self, logits, padding_mask=padding_mask)
        finally:
            config.moe_z_loss_coeff = coeff

    TopKRouter.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
    TopKRouter.apply_z_loss = apply_z_loss_fixed

    jitter = TopKRouter.apply_input_jitter

    def apply_input_jitter(self, input):
        # Switch Transformer's multiplicative jitter is a training-time noise; megatron-core
        # 0.16.1 also applied it in evaluation (every validation loss a random draw).
        return jitter(self, input) if self.training else input

    TopKRouter.apply_input_jitter = apply_input_jitter


def mark_expert_parameters(model_chunks, config) -> int:
    """Mark every routed-expert parameter ``allreduce = False``, at every layout.

    Upstream marks them when EP > 1 or ETP != TP. At EP 1 with ETP = TP the expert grid is the
    dense one (expert-data-parallel = data-parallel, expert-TP = TP), so the gradients, the
    optimizer step and the norms come out the same either way; marking them always gives a
    MoE model the same optimizer structure (dense and expert parts, megatron-core's
    ``ChainedOptimizer``) at every layout, so that a checkpoint saved at EP 1 resumes at
    EP 2 or at expert-TP 1 and back (with a single optimizer at EP 1 it could not: the
    optimizer-state keys differ).

    Call on the built model, before it is initialised and wrapped for data parallelism
    (both read the mark). A module is a routed expert's when megatron-core built it with
    ``is_expert``; shared experts are dense. Returns the number of parameters marked.
    """
    marked = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            if not getattr(module, "is_expert", False):
                continue
            for param in module.parameters(recurse=False):
                param.allreduce = False
                # Reduced over the expert-data-parallel group by DDP, never over dense TP.
                param.sequence_parallel = False
                marked += 1
    return marked


def defer_output_wgrad_only(model_chunks) -> int:
    """With ``defer_embedding_wgrad_compute``, turn it off in every ``ColumnParallelLinear``
    but the output layer (the only one with the buffers). Returns the number of layers
    changed."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    changed, plain = 0, {}
    for chunk in model_chunks:
        output = getattr(chunk, "output_layer", None)
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if (not isinstance(module, ColumnParallelLinear) or module is output
                    or not getattr(config, "defer_embedding_wgrad_compute", False)):  # fmt: skip
                continue
            if id(config) not in plain:  # a shallow copy: no second __post_init__
                plain[id(config)] = copy.copy(config)
                plain[id(config)].defer_embedding_wgrad_compute = False
            module.config = plain[id(config)]
            changed += 1
    return changed


def drop_unused_mtp_output_weight(model_chunks) -> int:
    """Remove the output layer's own weight from every chunk that holds the MTP block and
    ties its output layer to a copy of the embedding without being the first stage (the
    copy is what its forward uses). Returns the number of chunks changed."""
    changed = 0
    for chunk in model_chunks:
        output = getattr(chunk, "output_layer", None)
        if (getattr(chunk, "mtp_process", False) and not chunk.pre_process
                and chunk.share_embeddings_and_output_weights
                and getattr(output, "weight", None) is not None):  # fmt: skip
            output.weight = None
            changed += 1
    return changed


def mark_attention_sinks(model_chunks) -> int:
    """Mark every learnable softmax offset (``softmax_offset``, one logit per head of this
    rank) as split over tensor parallelism along dimension 0. Call on the built model, before
    it is initialised and wrapped. Returns the number of parameters marked."""
    marked = 0
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if name.rsplit(".", 1)[-1] != "softmax_offset":
                continue
            if not getattr(param, "tensor_model_parallel", False):
                param.tensor_model_parallel = True
                param.partition_dim = 0
                param.partition_stride = 1
                marked += 1
    return marked


def fix_expert_optimizer(optimizer) -> None:
    """Count expert parameters' TP duplicates by the expert-TP rank in gradient norms."""
    from megatron.core import parallel_state as ps

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = (p for group in inner.param_groups for p in group["params"])
        if any(not getattr(p, "allreduce", True) for p in params):
            inner.tp_group = ps.get_expert_tensor_parallel_group()
