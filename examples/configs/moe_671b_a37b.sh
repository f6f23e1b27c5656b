# shellcheck shell=bash
# DeepSeek-V3-shaped MoE (671B total / 37B active) with TST: bag size 16, superposition
# fraction 0.25 (the paper's MoE run), LR 2.2e-4 (DeepSeek-V3's peak; AdamW 0.9/0.95, WSD:
# 2000 warm-up steps, linear decay over the last 10%).
#
# Shape: deepseek-ai/DeepSeek-V3 (the MoE model zoo's recipe): 61 layers of hidden 7168, the
# first 3 dense (FFN 18432), then 256 routed experts of FFN 2048 with top-8 routing and one
# shared expert; sigmoid routing scores scaled by 2.5, aux-loss-free balancing (expert bias,
# update rate 1e-3) plus a small sequence-level balancing loss (1e-4), device-limited
# routing (8 groups, top 4); multi-latent attention: 128 heads, query rank 1536, key/value
# rank 512, head dims 128 + 64 (RoPE, YaRN x40) and values 128; RMSNorm (eps 1e-6),
# SwiGLU, untied embeddings. DeepSeek-V3's multi-token prediction depth is left out: it
# runs with PP 1 only so far. With DeepSeek-V3's tokenizer (129,280 entries)
#   DRY_RUN=1 NNODES=128 VOCAB_SIZE=129280 CONFIG=examples/configs/moe_671b_a37b.sh \
#     bash examples/train_slurm.sbatch
# prints: total 671,026.4M parameters, active per token 37,552.3M.
# Batch: 2048 x 4096 = 8.4M positions per step; 50,000 steps read about 2T raw tokens.
# Layout (the recipe's 1024 GPUs; any multiple of 512, the expert grid ETP x EP x PP): TP=2
# with sequence parallelism, PP=8 in DeepSeek-V3's uneven layout (embedding + 1 layer, 30
# stages of 2 layers, the loss alone: 61 layers in 32 virtual stages, 4 per rank), EP=64
# with expert-TP 1, Adam sharded over DP, selective recomputation of MLA's up-projections
# and the MLPs: at most 65 GiB per GPU on 1024 GPUs by the dry run's estimate.
#
# Sourced by examples/train_single_node.sh and examples/train_slurm.sbatch (CONFIG=...);
# every ${NAME:-default} below can be overridden from the environment.

TRAIN_ITERS=${TRAIN_ITERS:-50000}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
TP=${TP:-2}
PP=${PP:-8}
EP=${EP:-64}
PP_LAYOUT=${PP_LAYOUT:-"Et|(tt|)*30L"}

MODEL_ARGS=(
  --num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 128
  --multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128
  --qk-pos-emb-head-dim 64 --v-head-dim 128 --qk-layernorm
  --rotary-scaling-factor 40 --mscale 1.0 --mscale-all-dim 1.0
  --seq-length 4096 --max-position-embeddings 4096
  --position-embedding-type rope --rotary-base 10000
  --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --untie-embeddings-and-output-weights
  --num-experts 256 --moe-layer-freq "([0]*3+[1]*58)" --moe-router-topk 8
  --moe-ffn-hidden-size 2048 --moe-shared-expert-intermediate-size 2048
  --moe-router-score-function sigmoid --moe-router-topk-scaling-factor 2.5
  --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4
  --moe-router-num-groups 8 --moe-router-group-topk 4 --moe-router-dtype fp32
  --moe-token-dispatcher-type alltoall
)
TST_ARGS=(--tst-bag-size 16 --tst-fraction 0.25)
# shellcheck source=examples/configs/common/paper_recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/common/paper_recipe.sh"  # AdamW, WSD, clipping
TRAIN_ARGS=(
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size 2048 --train-iters "$TRAIN_ITERS"
  --lr 2.2e-4 "${PAPER_RECIPE_ARGS[@]}"
  --recompute-granularity selective --recompute-modules mla_up_proj mlp
)
PARALLEL_ARGS=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --pipeline-model-parallel-layout "$PP_LAYOUT"
  --expert-model-parallel-size "$EP" --expert-tensor-parallel-size 1
  --sequence-parallel --use-distributed-optimizer
)
