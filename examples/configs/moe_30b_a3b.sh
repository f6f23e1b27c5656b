# shellcheck shell=bash
# Qwen3-30B-A3B-shaped MoE (30.5B total / 3.3B active) with TST: bag size 16, superposition
# fraction 0.25 (the paper's MoE run), LR 3e-4 (AdamW 0.9/0.95, WSD: 2000 warm-up steps,
# linear decay over the last 10%).
#
# Shape: Qwen/Qwen3-30B-A3B (the MoE model zoo's recipe): 48 layers, hidden 2048, 32 heads of
# 128 with 4 key/value groups, qk-layernorm, 128 routed experts of FFN 768 with top-8 routing
# and an auxiliary balancing loss (1e-3), no shared expert, RMSNorm (eps 1e-6), SwiGLU, RoPE
# base 1e6, untied embeddings. With the Qwen3 tokenizer (151,669 entries, padded to Qwen3's
# 151,936 by the recipe's --make-vocab-size-divisible-by 1187)
#   DRY_RUN=1 NNODES=2 CONFIG=examples/configs/moe_30b_a3b.sh bash examples/train_slurm.sbatch
# prints: total 30,532.1M parameters, active per token 3,353.0M.
# Batch: 2048 x 4096 = 8.4M positions per step (the paper's MoE batch); 50,000 steps read
# about 2T raw tokens (a quarter of the steps at 16 tokens a position).
# Layout: EP=8 (16 experts per GPU, the token all-to-all inside one node's NVLink), TP=1,
# PP=1, DP = every GPU, Adam sharded over DP. Two nodes or more: the expert weights' Adam
# shards over the nodes (about 71 GiB per GPU on 2 nodes by the dry run's estimate, 93 GiB
# on one).
#
# Sourced by examples/train_single_node.sh and examples/train_slurm.sbatch (CONFIG=...);
# every ${NAME:-default} below can be overridden from the environment.

TRAIN_ITERS=${TRAIN_ITERS:-50000}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}

MODEL_ARGS=(
  --num-layers 48 --hidden-size 2048 --num-attention-heads 32 --kv-channels 128
  --group-query-attention --num-query-groups 4 --qk-layernorm
  --seq-length 4096 --max-position-embeddings 4096
  --position-embedding-type rope --rotary-base 1000000
  --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --untie-embeddings-and-output-weights
  --make-vocab-size-divisible-by 1187
  --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768 --ffn-hidden-size 6144
  --moe-aux-loss-coeff 1e-3 --moe-router-dtype fp32 --moe-token-dispatcher-type alltoall
)
TST_ARGS=(--tst-bag-size 16 --tst-fraction 0.25)
# shellcheck source=examples/configs/common/paper_recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/common/paper_recipe.sh"  # AdamW, WSD, clipping
TRAIN_ARGS=(
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size 2048 --train-iters "$TRAIN_ITERS"
  --lr 3e-4 "${PAPER_RECIPE_ARGS[@]}"
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" --use-distributed-optimizer
)
