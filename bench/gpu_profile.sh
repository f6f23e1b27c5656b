#!/usr/bin/env bash
# Where the GPU study's step time goes: the ~110M GPT of bench/gpu_study.sh (12 x 768, SwiGLU,
# RMSNorm, RoPE, tied, vocabulary 32,000, context 2,048, bf16, micro-batch 8, global batch 32)
# on mock data: the recovery phase with megatron-core's unfused attention and with the fused
# one (--attention-backend flash, auto's pick on CUDA), the superposition phase with the fused
# one; each run profiled over two steps after its warm-up (pretrain_tst.py --profile), the
# traces summed by kernel and kind and the steady step times compared by
# bench/profile_summary.py. About 2 minutes on an H200 (two runs took 80 s on 2026-12-04);
# nothing to prepare but the megatron-core wheel (see bench/gpu_study.sh's header).
#
#   bash bench/gpu_profile.sh OUTPUT_FOLDER             # on the GPU host
#   DRY_RUN=1 bash bench/gpu_profile.sh OUTPUT_FOLDER   # anywhere: a tiny model on CPU
#
# OUTPUT_FOLDER gets profile.md (the tables, the step times), profile_<run>.json and the logs; the
# traces stay in $WORK (tens of MB).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_FOLDER=${1:?usage: bash bench/gpu_profile.sh OUTPUT_FOLDER}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
WHEELS=${WHEELS:-runs/wheels}
BAG_SIZE=${BAG_SIZE:-6}
if [[ "$DRY_RUN" == 1 ]]; then
  WORK=${WORK:-/tmp/tst_gpu_profile_dry}
  MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64)
  BATCH=(--micro-batch-size 2 --global-batch-size 4); PRECISION=()
else
  WORK=${WORK:-/tmp/tst_gpu_profile}
  MODEL=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 2048)
  BATCH=(--micro-batch-size 8 --global-batch-size 32); PRECISION=(--bf16)
fi
START=${START:-$([[ "$DRY_RUN" == 1 ]] && echo 3 || echo 5)}; END=$(( START + 2 ))  # profiled: [START, END)
mkdir -p "$OUT_FOLDER" "$WORK"
export PYTHONUNBUFFERED=1

source bench/megatron_wheel.sh
ensure_megatron_core || exit 1

ARGS=(
  "${MODEL[@]}" "${BATCH[@]}" "${PRECISION[@]}"
  --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --mock-data --vocab-size 32000
  --lr 1e-3 --lr-warmup-iters 1 --lr-decay-style constant --seed 1 --transformer-impl auto
  --log-interval 1 --eval-interval 1000 --eval-iters 0 --peak-tflops 989
  --profile --profile-step-start "$START" --profile-step-end "$END"
)
echo "# Step profile: ${MODEL[*]}, ${BATCH[*]} ${PRECISION[*]}" > "$OUT_FOLDER/profile.md"
status=0
# name, phase, --attention-backend: the recovery phase with megatron-core's unfused attention
# and with the fused one (torch's scaled_dot_product_attention: auto's pick on CUDA), then
# the superposition phase with the fused one.
RUNS=("recovery_unfused recovery unfused" "recovery recovery flash" "superposition superposition flash")
metrics=()
for run in "${RUNS[@]}"; do
  read -r name phase backend <<<"$run"
  extra=(--train-iters "$END")
  # Superposition for every step (the switch comes after the last one).
  [[ "$phase" == superposition ]] && extra=(--train-iters $(( END + 1 )) --tst-bag-size "$BAG_SIZE" --tst-iters "$END")
  rm -rf "$WORK/$name" "$WORK/$name.jsonl"
  echo "== $name ($phase, --attention-backend $backend)"
  if ! "$PYTHON" pretrain_tst.py "${ARGS[@]}" "${extra[@]}" --attention-backend "$backend" \
      --tensorboard-dir "$WORK/$name" --metrics-file "$WORK/$name.jsonl" \
      > "$OUT_FOLDER/$name.log" 2>&1; then
    tail -n 25 "$OUT_FOLDER/$name.log"; status=1; continue
  fi
  metrics+=("$WORK/$name.jsonl")
  grep -E "^iter" "$OUT_FOLDER/$name.log" | tail -n 3
  trace=$(ls "$WORK/$name"/profile_rank0_steps*.json)
  bag=$([[ "$phase" == superposition ]] && echo "$BAG_SIZE" || echo 1)
  echo >> "$OUT_FOLDER/profile.md"
  "$PYTHON" bench/profile_summary.py "$trace" --steps 2 --json "$OUT_FOLDER/profile_$name.json" \
    --label "$name (bag $bag, --attention-backend $backend)" | tee -a "$OUT_FOLDER/profile.md" \
    || status=1
done
# Steady step times, steps 2 .. START-1 (after the first step, before the profiled ones).
if (( ${#metrics[@]} )); then
  echo >> "$OUT_FOLDER/profile.md"
  "$PYTHON" bench/profile_summary.py --step-times "${metrics[@]}" --window 1 $(( START - 1 )) \
    | tee -a "$OUT_FOLDER/profile.md" || status=1
fi
echo "== done: $OUT_FOLDER/profile.md"
exit "$status"
