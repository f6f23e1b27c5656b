# shellcheck shell=bash
# 10B-total / 1B-active MoE, Qwen3-style. TST: bag size 16, superposition fraction 0.25,
# LR 3e-4 (AdamW 0.9/0.95, WSD: 2000 warm-up steps, linear decay over the last 10%).
#
# Shape: Qwen3-MoE's recipe (Qwen/Qwen3-30B-A3B: 128 routed experts, top-8 routing, expert
# FFN 768, no shared expert, qk-layernorm, head dim 128 with 4 key/value groups, RMSNorm,
# SwiGLU, RoPE base 1e6, untied embeddings) scaled to 32 layers of hidden 1024 (8 heads).
# With the Qwen3 tokenizer (151,669 entries)
#   DRY_RUN=1 CONFIG=examples/configs/moe_10b_a1b.sh bash examples/train_single_node.sh
# prints: total 10,079.2M parameters, active per token 1,019.6M (word embedding 155.3M,
# output layer 155.3M, routed experts 9,663.7M). A load-balancing auxiliary loss (1e-3)
# keeps the experts in use.
# Batch: 2048 x 4096 = 8.4M positions per step. 50,000 steps read about 2T raw tokens (a
# quarter of the steps at 16 tokens a position), the length of the paper's TST run.
# Layout per 8-GPU node: EP=8 (16 experts per GPU; the token all-to-all stays inside
# NVLink), TP=1 PP=1, DP = every GPU, Adam sharded over DP: about 35 GiB per GPU on one node
# by the dry run's estimate, less on more (expert weights' Adam shards over the nodes).
#
# Sourced by examples/train_single_node.sh and examples/train_slurm.sbatch (CONFIG=...);
# every ${NAME:-default} below can be overridden from the environment.

TRAIN_ITERS=${TRAIN_ITERS:-50000}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}

MODEL_ARGS=(
  --num-layers 32 --hidden-size 1024 --num-attention-heads 8 --group-query-attention --num-query-groups 4
  --seq-length 4096 --max-position-embeddings 4096
  --position-embedding-type rope --rotary-base 1000000
  --normalization RMSNorm --swiglu --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --qk-layernorm --untie-embeddings-and-output-weights
  --num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768
  --moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall
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
