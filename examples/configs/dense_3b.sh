# shellcheck shell=bash
# 3B dense. TST: bag size 6, superposition fraction 0.3, LR 2e-4 (AdamW 0.9/0.95, WSD: 2000
# warm-up steps, linear decay over the last 10%).
#
# Shape: SmolLM3-3B's layers (HuggingFaceTB/SmolLM3-3B: hidden 2048, 16 heads in 4
# key/value groups, SwiGLU 11008, RMSNorm, RoPE), 30 of them instead of 36 so that with
# untied embeddings and the Qwen3 tokenizer (151,669 entries) the model is 3B:
#   DRY_RUN=1 CONFIG=examples/configs/dense_3b.sh bash examples/train_single_node.sh
# prints: total 2,965.5M parameters (word embedding 310.9M, output layer 310.9M).
# Batch: 512 x 4096 = 2.1M positions per step.
# Layout per 8-GPU node: TP=2 with sequence parallelism (inside NVLink) x DP=4, Adam sharded
# over DP (--use-distributed-optimizer), micro-batches of 2: about 27 GiB per GPU by the dry
# run's estimate. If activations do not fit, halve MICRO_BATCH_SIZE, then add PP=2
# (15 layers a stage).
#
# Sourced by examples/train_single_node.sh and examples/train_slurm.sbatch (CONFIG=...);
# every ${NAME:-default} below can be overridden from the environment.

TRAIN_ITERS=${TRAIN_ITERS:-36000}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
TP=${TP:-2}
PP=${PP:-1}

MODEL_ARGS=(
  --num-layers 30 --hidden-size 2048 --ffn-hidden-size 11008
  --num-attention-heads 16 --group-query-attention --num-query-groups 4
  --seq-length 4096 --max-position-embeddings 4096
  --position-embedding-type rope --rotary-base 10000
  --normalization RMSNorm --swiglu --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --untie-embeddings-and-output-weights
)
TST_ARGS=(--tst-bag-size 6 --tst-fraction 0.3)
# shellcheck source=examples/configs/common/paper_recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/common/paper_recipe.sh"  # AdamW, WSD, clipping
TRAIN_ARGS=(
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size 512 --train-iters "$TRAIN_ITERS"
  --lr 2e-4 "${PAPER_RECIPE_ARGS[@]}"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --sequence-parallel --use-distributed-optimizer
)
