#!/usr/bin/env python
"""Token Superposition Training of megatron-core GPT / MoE models.

    python pretrain_tst.py --help
    torchrun --nproc-per-node 8 pretrain_tst.py --tensor-model-parallel-size 2 ...

Wires the pieces together and calls the trainer; all the work lives in ``tst/``.
"""

from __future__ import annotations

import sys
import warnings

from tst.checkpointing import CheckpointError
from tst.config import Config, parse_args, validate
from tst.errors import NonFiniteLossError


def build_tokenizer(cfg: Config):
    from tst.data.tokenizers import build_tokenizer as build

    d = cfg.data
    return build(d.tokenizer_type, d.tokenizer_model, d.vocab_file, d.merge_file, d.vocab_size)


def build_datasets(cfg: Config, derived: dict, tokenizer, vocab_size: int, schedule):
    from tst.data.datasets import DataConfig, build_datasets
    from tst.data.stream import big_samples_needed

    t, bag = cfg.training, cfg.tst.tst_bag_size
    gbs = derived["global_batch_size"]
    rows = [(phase.steps * gbs, phase.units_per_row) for phase in schedule.phases]
    train = big_samples_needed(rows, bag)
    evals = t.train_iters // cfg.run.eval_interval + 1
    valid = big_samples_needed([(cfg.run.eval_iters * gbs, 1)], bag) * (1 if evals else 0)
    data = DataConfig(
        data_path=cfg.data.data_path,
        split=cfg.data.split,
        seq_length=cfg.model.seq_length,
        bag_size=bag,
        seed=t.seed,
        mock=cfg.data.mock_data,
        vocab_size=vocab_size,
        eod_id=tokenizer.eod,
        pad_documents_to_bag=cfg.data.pad_documents_to_bag,
        cache_dir=cfg.data.data_cache_path,
    )
    return build_datasets(data, (train, valid, 0))


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    cfg = parse_args(argv)
    from tst.dry_run import dry_run
    from tst.phases import PhaseSchedule
    from tst.platform import initialize, shutdown
    from tst.trainer import Trainer

    tokenizer = build_tokenizer(cfg)
    vocab_size = cfg.data.vocab_size or tokenizer.vocab_size
    p = cfg.parallel
    if cfg.run.dry_run:
        return dry_run(cfg, vocab_size)
    layout = initialize(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        vpp=validate(cfg, _world_size(), vocab_size)["vpp"],
        ep=p.expert_model_parallel_size,
        seed=cfg.training.seed,
    )
    try:
        derived = validate(cfg, layout.world_size, vocab_size)
        schedule = PhaseSchedule.from_config(cfg)
        datasets = build_datasets(cfg, derived, tokenizer, vocab_size, schedule)
        trainer = Trainer(cfg, layout, derived, tokenizer, datasets)
        if cfg.run.load:
            trainer.load()
        return trainer.train()
    finally:
        shutdown(layout)


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:  # bad flags or inputs: the message names the cause and the fix
        print(f"pretrain_tst.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLossError, CheckpointError) as error:
        print(f"pretrain_tst.py: error: {error}", file=sys.stderr)
        sys.exit(3)
