#!/usr/bin/env python
"""Token Superposition Training of megatron-core GPT / MoE models.

    python pretrain_tst.py --help
    torchrun --nproc-per-node 8 pretrain_tst.py --tensor-model-parallel-size 2 ...

Wires the pieces together and calls the trainer; all the work lives in ``tst/``.
"""

from __future__ import annotations

import os
import sys
import warnings

from tst.config import Config, parse_args
from tst.data.blends import data_blends
from tst.errors import TSTError, collective_failure, exit_code
from tst.megatron_import import compile_no_fusions, settled_imports
from tst.nccl_options import group_options
from tst.plan import check_launchable, embedding_stages, validate


def build_tokenizer(cfg: Config):
    from tst.data.tokenizers import build_tokenizer as build

    d = cfg.data
    return build(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file, d.vocab_size,
                 d.tiktoken_pattern, d.tiktoken_num_special_tokens, d.tokenizer_special_tokens)  # fmt: skip


def build_datasets(cfg: Config, plan, tokenizer, vocab_size: int, blends=None, fim=None):
    from tst.data.datasets import DataConfig, build_datasets
    from tst.data.stream import big_samples_needed

    blends = blends if blends is not None else data_blends(cfg.data)
    bag = plan.schedule.data_bag_size  # units per big sample: every stage's bag divides it
    # At the given global batch: with --decrease-batch-size-if-needed a resumed run may have
    # trained more per step before (at another DP) than this layout's decreased batch.
    rows = [(plan.samples_between(phase.start, phase.end, nominal=True), phase.units_per_row)
            for phase in plan.schedule.phases]  # fmt: skip
    train = big_samples_needed(rows, bag)
    valid = test = 0
    if plan.evaluate:
        # At the given batch (as the train rows above: nominal), not a decreased one.
        batch = cfg.log.eval_global_batch_size or plan.global_batch_size
        test = big_samples_needed([(cfg.log.eval_iters * batch, 1)], bag)
        valid = None if cfg.log.full_validation else test  # None: the whole split, once
        if cfg.log.full_validation:
            _check_unweighted_validation(blends)
    data = DataConfig(
        data_path=blends.blend or [],
        blend_per_split=blends.per_split,
        split=cfg.data.split,
        seq_length=cfg.model.seq_length,
        bag_size=bag,
        seed=cfg.training.seed,
        mock=cfg.data.mock_data,
        vocab_size=vocab_size,
        eod_id=tokenizer.eod,
        pad_documents_to_bag=cfg.data.pad_documents_to_bag,
        cache_dir=cfg.data.data_cache_path,
        mmap_bin_files=cfg.data.mmap_bin_files,
        mid_level_dataset_surplus=cfg.data.mid_level_dataset_surplus,
        multiple_validation_sets=cfg.log.multiple_validation_sets,
        fast_cache_load=cfg.data.dataloader_fast_cache_load,
        defer_index_mmap=cfg.data.dataloader_defer_npy_index_mmap,
        sequences_per_dataset=blends.sequences_per_dataset,
        fim=fim if fim is not None else _fim_transform(cfg, tokenizer),
    )
    # The test split (--split's third part or --test-data-path) is evaluated once at the end
    # as Megatron-LM does, as long as an evaluation (none without one); one too small for a
    # sample skips that, it does not stop the run.
    return build_datasets(data, (train, valid, test), on_test_too_small=_no_test_split)


def _fim_transform(cfg: Config, tokenizer):
    """--fim-data: the transform every sample read goes through (None without the flag)."""
    if not cfg.fim.fim_data:
        return None
    from tst.data.fim import FIMTransform

    return FIMTransform(cfg.fim, tokenizer, cfg.training.seed, cfg.model.seq_length + 1)


def _check_unweighted_validation(blends) -> None:
    """--full-validation reads each validation dataset whole: megatron-core cannot size a
    weighted blend without a sample count (it asserts), so the weights are refused here."""
    from tst.data.datasets import parse_blend
    from tst.errors import ConfigError

    words, flag = ((blends.per_split[1], "--valid-data-path") if blends.per_split is not None
                   else (blends.blend, "--data-path"))  # fmt: skip
    if words and parse_blend(words, flag)[1] is not None:
        raise ConfigError(
            f"--full-validation reads the validation split whole, but {flag} gives its "
            "datasets weights (a weighted blend needs a sample count): list the validation "
            "prefixes without weights (each is then read whole), or drop --full-validation"
        )


def _no_test_split(error: TSTError) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"no test evaluation at the end: {error}", flush=True)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    cfg = parse_args(argv)
    if cfg.training.disable_jit_fuser:
        compile_no_fusions()  # before megatron-core's first import: no fusion is compiled
    with settled_imports():  # torch, megatron-core: the collector paused, then kept off them
        import torch

        from tst import te_userbuffers
        from tst.dry_run import dry_run, dry_run_vocab_size
        from tst.platform import initialize, shutdown
        from tst.trainer import Trainer

    if cfg.run.dry_run:  # reads no data or tokenizer files
        return dry_run(cfg, dry_run_vocab_size(cfg))
    check_launchable(cfg)
    # Reads the data flags' files (a bad one fails here, not after the set-up).
    blends = data_blends(cfg.data)
    from tst.metrics import check_wandb

    check_wandb(cfg.log.wandb_project)  # a missing package, before any process group
    if cfg.run.save:
        from tst.checkpointing import check_writable

        check_writable(cfg.run.save)
    tokenizer = build_tokenizer(cfg)
    vocab_size = cfg.data.vocab_size or tokenizer.vocab_size
    plan = validate(cfg, _world_size(), vocab_size)  # every check, before any process group
    fim = _fim_transform(cfg, tokenizer)  # --fim-data: its sentinels checked before any set-up
    p, grid = cfg.parallel, plan.grid
    layout = initialize(
        tp=grid.tp, pp=grid.pp, vpp=grid.vpp, ep=grid.ep, etp=grid.etp, cp=grid.cp,
        seed=cfg.training.seed, timeout_minutes=p.distributed_timeout_minutes,
        gloo_groups=p.enable_gloo_process_groups,
        order="tp-cp-ep-pp-dp" if p.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp",
        distributed_optimizer_instances=p.num_distributed_optimizer_instances,
        hierarchical_cp_sizes=p.hierarchical_context_parallel_sizes,
        nccl_group_options=group_options(p), embedding_stages=embedding_stages(cfg, grid),
    )  # fmt: skip
    trainer = None
    userbuffers = False
    matmul = torch.backends.cuda.matmul
    reduced_bf16 = matmul.allow_bf16_reduced_precision_reduction
    if cfg.training.disable_bf16_reduced_precision_matmul:
        matmul.allow_bf16_reduced_precision_reduction = False
    deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.training.deterministic_mode:
        torch.use_deterministic_algorithms(True)
    try:
        userbuffers = te_userbuffers.initialize(cfg, grid)  # --tp-comm-overlap, before the model
        datasets = build_datasets(cfg, plan, tokenizer, vocab_size, blends, fim)
        trainer = Trainer(cfg, layout, plan, tokenizer, datasets)
        if cfg.run.load or cfg.run.pretrained_checkpoint:
            trainer.load()
        if cfg.run.ckpt_convert_format:
            return trainer.convert_checkpoint()
        return trainer.train()
    except RuntimeError as error:  # a stalled or dead peer: one line, the cause chained
        after = p.distributed_timeout_seconds_after_init
        failure = collective_failure(
            error, layout.rank, f"--distributed-timeout-minutes {p.distributed_timeout_minutes}"
            + (f" (--distributed-timeout-seconds-after-init {after} after the first step)"
               if after else ""),
        )  # fmt: skip
        if failure is None:
            raise
        raise failure from error
    finally:
        if trainer is not None:
            trainer.train_stream.close()  # the loader's workers end with the run, however
        if userbuffers:
            te_userbuffers.destroy()
        matmul.allow_bf16_reduced_precision_reduction = reduced_bf16  # process-wide: as found
        torch.use_deterministic_algorithms(deterministic)
        shutdown(layout)


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def cli(argv: list[str] | None = None) -> int:
    """``main`` as the command line runs it: its exit status, or, for the project's errors
    (inputs exit 2, failed runs 3) and other ValueErrors (2), their message (it names the cause
    and the fix) on standard error and their code. Anything else is a bug and keeps its
    traceback."""
    try:
        return main(argv)
    except (TSTError, ValueError) as error:
        print(f"pretrain_tst.py: error: {error}", file=sys.stderr)
        return exit_code(error)


if __name__ == "__main__":
    sys.exit(cli())
