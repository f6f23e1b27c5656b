"""A tiny megatron-core GPT run through megatron-core's pipeline schedule, for parallel tests.

Used inside spawned ranks: builds the model for the current layout with layout-independent
weights, runs one forward/backward over a few micro-batches of TST batches, and reports the
loss sums and the squared gradient norm so that layouts can be compared with each other.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tst.data.batch import chunk_length, make_tst_batch
from tst.losses import vocab_parallel_multi_hot_cross_entropy

VOCAB, SEQ, MBS, MICRO = 128, 8, 2, 4


def gpt_from_flags(layout, flags: list[str], vocab: int, on_gpu: bool = False):
    """The model pretrain_tst.py would build from ``flags`` (parse_args -> run plan ->
    TransformerConfig -> build_gpt) in a one-rank world, its weights drawn from seed 0;
    ``on_gpu``: the shape a CUDA run gets (``--attention-backend auto``'s attention)."""
    from tst.config import parse_args
    from tst.megatron_config import transformer_config
    from tst.model import ModelShape, build_gpt
    from tst.plan import validate

    cfg = parse_args(flags)
    plan = validate(cfg, 1, vocab)
    config = transformer_config(cfg, plan, layout)
    torch.manual_seed(0)
    shape = ModelShape.from_config(cfg.model, plan.padded_vocab_size, False, on_gpu=on_gpu)
    return build_gpt(config, shape)


def one_rank_layout(device: str = "cpu"):
    """A world-of-one :class:`tst.platform.Layout` on ``device`` (``"cuda"`` lets tests reach
    the GPU branches of the config builders without a GPU; no process group is made)."""
    from tst.platform import Layout

    return Layout(rank=0, world_size=1, local_rank=0, device=torch.device(device),
                  backend="gloo", tp=1, pp=1, vpp=None, dp=1, ep=1, tp_rank=0, pp_rank=0,
                  dp_rank=0, ep_rank=0, cpu_patched=False)  # fmt: skip


def tiny_config(tp=1, pp=1, vpp=None, sp=False, **overrides):
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=4,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=torch.float32,
        calculate_per_token_loss=True,
        init_method_std=0.02,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # The local spec's attention, as the trainer configures it on CPU: megatron-core
        # records the backend in NVTE_* variables and refuses another one later in the same
        # process (the test worlds run trainer and helper models alike).
        attention_backend=AttnBackend.local,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_chunks(config, layout, seed, untie=True, sdpa=False):
    from tst.init import initialize_layout_independent
    from tst.model import ModelShape, build_model_chunks

    shape = ModelShape(
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",  # the config above is RoPE / RMSNorm, stated here too
        normalization="RMSNorm",
        untie_embeddings_and_output_weights=untie,
        sdpa_attention=sdpa,
    )
    chunks = build_model_chunks(config, shape, layout.vpp, layout.device)
    initialize_layout_independent(chunks, config, seed, layout)
    return chunks


def _forward_step(bag_size, tp_group, data_iterator, model):
    chunk = next(data_iterator)
    batch = make_tst_batch(chunk, bag_size)
    positions = torch.arange(SEQ).expand(chunk.shape[0], -1)
    logits = model(batch.input_ids, positions, attention_mask=None)

    def loss_func(output):
        loss = vocab_parallel_multi_hot_cross_entropy(output, batch.targets, tp_group=tp_group)
        total = (loss * batch.loss_mask).sum()
        count = batch.loss_mask.sum()
        return total, count.int(), {"lm": torch.stack([total.detach(), count])}

    return logits, loss_func


def run_one_step(tp, pp, vpp, seed, bag_size, sdpa=False):
    """Forward/backward of MICRO micro-batches; returns (loss sums per micro-batch, |grad|^2).
    ``sdpa``: the local spec's fused core attention (tst.attention.SDPAttention)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tst.model import apply_phase
    from tst.phases import next_token_phase
    from tst.platform import initialize

    layout = initialize(tp=tp, pp=pp, vpp=vpp, seed=seed)
    config = tiny_config(tp, pp, vpp)
    chunks = build_chunks(config, layout, seed, sdpa=sdpa)
    # Bag inputs; the loss is applied to the logits in loss_func below.
    apply_phase(chunks, dataclasses.replace(next_token_phase(), input_bag=bag_size))
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (MICRO, MBS, chunk_length(SEQ, bag_size)), generator=gen)
    iterators = [iter(data) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, bag_size, layout.tp_group),
        data_iterator=iterators if layout.vpp else iterators[0],
        model=chunks if layout.vpp else chunks[0],
        num_microbatches=MICRO,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    sums = [entry["lm"].tolist() for entry in losses] if layout.is_last_stage else []
    norm_sq = torch.zeros(())
    for chunk in chunks:
        for param in chunk.parameters():
            if param.grad is not None and (
                getattr(param, "tensor_model_parallel", False) or layout.tp_rank == 0
            ):
                norm_sq += param.grad.double().pow(2).sum().float()
    dist.all_reduce(norm_sq)
    return sums, norm_sq.item() / layout.dp
