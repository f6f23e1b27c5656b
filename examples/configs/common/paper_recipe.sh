# shellcheck shell=bash
# The training recipe every config in examples/configs/ shares, the paper's: AdamW (betas
# 0.9 / 0.95, weight decay 0.1), gradients clipped at 1.0, and a WSD learning-rate schedule
# with 2000 warm-up steps, then the peak --lr, then a linear decay to 0 over the last 10% of
# TRAIN_ITERS. Each config keeps what differs (--lr, the batch) and appends these flags:
#
#   TRAIN_ITERS=${TRAIN_ITERS:-50000}
#   # shellcheck source=examples/configs/common/paper_recipe.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/common/paper_recipe.sh"  # after TRAIN_ITERS
#   TRAIN_ARGS=(... --lr 2e-3 "${PAPER_RECIPE_ARGS[@]}")

PAPER_RECIPE_ARGS=(
  --min-lr 0 --lr-decay-style WSD --lr-wsd-decay-style linear --lr-warmup-iters 2000
  --lr-wsd-decay-iters $((TRAIN_ITERS / 10))
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
)
