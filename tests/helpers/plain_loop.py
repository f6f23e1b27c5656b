"""A plain megatron-core GPT training loop: the reference for "bag size 1 is plain training".

Stock ``GPTModel`` built from megatron-core's local layer spec (no bag embedding), labels
passed to the model so megatron-core computes its own vocab-parallel cross-entropy, megatron
DDP and optimizer, ``get_forward_backward_func``. It shares only the run's configuration,
weights and data with the trainer (same flags, layout-independent weights, same sample
stream), so any difference in losses is a difference in the training path itself. Also used
by ``bench/bench_throughput.py`` as the step-time baseline.
"""

from __future__ import annotations

import time
from functools import partial

import torch

import pretrain_tst
from tst.config import parse_args
from tst.plan import validate


def _forward_step(seq_length, device, data_iterator, model):
    chunk = next(data_iterator).to(device)  # [b, L + 1]
    tokens, labels = chunk[:, :-1], chunk[:, 1:]
    positions = torch.arange(seq_length, device=device).expand(tokens.shape[0], -1)
    per_token = model(tokens, positions, attention_mask=None, labels=labels)  # [b, L]

    def loss_func(output):
        total = output.float().sum()
        count = torch.tensor(output.numel(), dtype=torch.int)
        return total, count, {"loss": torch.stack([total.detach(), count.float()])}

    return per_token, loss_func


def plain_training(argv: list[str], steps: int | None = None) -> tuple[list[float], list[float]]:
    """Train ``steps`` plain next-token steps with the run ``argv`` describes (a world of one).

    Returns (loss per step, seconds per step).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tst.data.stream import SampleStream
    from tst.init import initialize_layout_independent
    from tst.megatron_config import transformer_config
    from tst.platform import initialize, shutdown

    cfg = parse_args(argv)
    tokenizer = pretrain_tst.build_tokenizer(cfg)
    vocab = cfg.data.vocab_size or tokenizer.vocab_size
    layout = initialize(seed=cfg.training.seed)
    try:
        plan = validate(cfg, layout.world_size, vocab)
        if layout.world_size != 1:
            raise ValueError("the plain loop runs in a world of one")
        m, t = cfg.model, cfg.training
        config = transformer_config(cfg, plan, layout)
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization=m.normalization),
            vocab_size=plan.padded_vocab_size,
            max_sequence_length=m.max_position_embeddings,
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            position_embedding_type=m.position_embedding_type,
            rotary_base=m.rotary_base,
        ).to(layout.device)
        initialize_layout_independent([model], config, t.seed, layout)
        ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            module=model,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                clip_grad=t.clip_grad,
            ),
            [ddp],
        )  # fmt: skip
        # Megatron-LM's loop always has a scheduler: it also applies the per-group weight-decay
        # multipliers (no decay for norms and biases).
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=t.train_iters,
            lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
            wd_incr_steps=t.train_iters, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False,
        )  # fmt: skip
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        datasets = pretrain_tst.build_datasets(cfg, plan, tokenizer, vocab)
        stream = SampleStream(datasets[0], m.seq_length, cfg.tst.tst_bag_size,
                              t.micro_batch_size, 0, 1)  # fmt: skip
        losses, seconds = [], []
        for _ in range(steps or t.train_iters):
            start = time.perf_counter()
            batches = [stream.next_micro_batch(1) for _ in range(plan.num_microbatches)]
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            out = get_forward_backward_func()(
                forward_step_func=partial(_forward_step, m.seq_length, layout.device),
                data_iterator=iter(batches),
                model=ddp,
                num_microbatches=len(batches),
                seq_length=m.seq_length,
                micro_batch_size=t.micro_batch_size,
                forward_only=False,
            )
            optimizer.step()
            scheduler.step(increment=1)
            total = sum(entry["loss"] for entry in out)
            losses.append((total[0] / total[1]).item())
            seconds.append(time.perf_counter() - start)
        return losses, seconds
    finally:
        shutdown(layout)
