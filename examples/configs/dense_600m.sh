# shellcheck shell=bash
# 600M dense. TST: bag size 6, superposition fraction 0.3, LR 1e-3 (AdamW 0.9/0.95, WSD:
# 2000 warm-up steps, linear decay over the last 10%).
#
# Shape: SmolLM2-360M's (HuggingFaceTB/SmolLM2-360M: 32 layers, hidden 960, 15 heads in 5
# key/value groups, SwiGLU 2560, RMSNorm, RoPE) with untied input and output embeddings.
# With the Qwen3 tokenizer (151,669 entries)
#   DRY_RUN=1 CONFIG=examples/configs/dense_600m.sh bash examples/train_single_node.sh
# prints: total 605.9M parameters (word embedding 145.6M, output layer 145.6M).
# Batch: 1024 x 2048 = 2.1M positions per step.
# Layout: TP=1 PP=1, all data parallel: one 8-GPU node runs 32 micro-batches of 4 per step
# (about 24 GiB per GPU by the dry run's estimate); more nodes only add DP.
#
# Sourced by examples/train_single_node.sh and examples/train_slurm.sbatch (CONFIG=...);
# every ${NAME:-default} below can be overridden from the environment.

TRAIN_ITERS=${TRAIN_ITERS:-50000}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
TP=${TP:-1}
PP=${PP:-1}

MODEL_ARGS=(
  --num-layers 32 --hidden-size 960 --ffn-hidden-size 2560
  --num-attention-heads 15 --group-query-attention --num-query-groups 5
  --seq-length 2048 --max-position-embeddings 2048
  --position-embedding-type rope --rotary-base 10000
  --normalization RMSNorm --swiglu --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --untie-embeddings-and-output-weights
)
TST_ARGS=(--tst-bag-size 6 --tst-fraction 0.3)
# shellcheck source=examples/configs/common/paper_recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/common/paper_recipe.sh"  # AdamW, WSD, clipping
TRAIN_ARGS=(
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size 1024 --train-iters "$TRAIN_ITERS"
  --lr 1e-3 "${PAPER_RECIPE_ARGS[@]}"
)
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
