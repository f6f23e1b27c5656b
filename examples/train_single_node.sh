#!/usr/bin/env bash
# TST pretraining on one node: torchrun, one process per GPU, a paper-scale config.
#
#   CONFIG=examples/configs/dense_270m.sh DATA_PATH=/data/dclm_text_document \
#   TOKENIZER_MODEL=/data/qwen3/tokenizer.json SAVE_DIR=/ckpt/tst-270m \
#     bash examples/train_single_node.sh
#
#   PRECISION=fp8 ...        FP8 (hybrid: E4M3 forward, E5M2 gradients) through Transformer Engine
#   DRY_RUN=1 ...            no GPU, no data: build the model on the meta device, print its
#                            parameter counts, per-GPU memory and phase table, and exit
#   MAX_RESTARTS=3 ...       torchrun restarts the workers after a crash (up to 3 times); each
#                            start resumes from the newest checkpoint in SAVE_DIR
#   PYTHON=/envs/tst/bin/python ...   the interpreter of the dry run, of torchrun
#                            (`$PYTHON -m torch.distributed.run`) and of every worker
#   ... train_single_node.sh --eval-interval 500    extra flags go to pretrain_tst.py (last wins)
#
# Re-running the same command resumes from the newest checkpoint in SAVE_DIR.
# The configs (examples/configs/*.sh) are bash files that set MODEL_ARGS, TST_ARGS,
# TRAIN_ARGS and PARALLEL_ARGS; this script adds data, precision, checkpoints and logging.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-examples/configs/dense_270m.sh}
PRECISION=${PRECISION:-bf16}                       # bf16 | fp8 | fp32 (no mixed precision)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA_PATH=${DATA_PATH:-/data/dclm_text_document}   # prefix, or a blend: "0.7 a_text_document 0.3 b_text_document"
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/data/qwen3/tokenizer.json}
SAVE_DIR=${SAVE_DIR:-checkpoints/$(basename "$CONFIG" .sh)-$PRECISION}
MAX_RESTARTS=${MAX_RESTARTS:-0}                    # torchrun restarts of a failed worker group
DRY_RUN=${DRY_RUN:-0}
VOCAB_SIZE=${VOCAB_SIZE:-151669}  # dry run without a tokenizer file: the Qwen3 tokenizer's size
PYTHON=${PYTHON:-python}

# shellcheck source=examples/configs/dense_270m.sh
source "$CONFIG"  # MODEL_ARGS TST_ARGS TRAIN_ARGS PARALLEL_ARGS

case "$PRECISION" in
  bf16) PRECISION_ARGS=(--bf16) ;;
  fp8) PRECISION_ARGS=(--bf16 --fp8-format hybrid --transformer-impl transformer_engine) ;;
  fp32) PRECISION_ARGS=() ;;
  *) echo "PRECISION must be bf16 or fp8 (or fp32), got '$PRECISION'" >&2; exit 2 ;;
esac
read -r -a DATA_PREFIXES <<<"$DATA_PATH"
DATA_ARGS=(--data-path "${DATA_PREFIXES[@]}" --split 998,2,0 --data-cache-path "$SAVE_DIR/index-cache")
if [[ "$DRY_RUN" == 1 && ! -e "$TOKENIZER_MODEL" ]]; then
  TOKENIZER_ARGS=(--tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
else
  TOKENIZER_ARGS=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
fi
# --load of a folder with no checkpoint yet starts from scratch, so every start of the workers
# (the first, a re-run, a torchrun restart) resumes from the newest one.
CHECKPOINT_ARGS=(--save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 1000)
LOG_ARGS=(
  --log-interval 10 --eval-interval 1000 --eval-iters 20
  --metrics-file "$SAVE_DIR/metrics.jsonl" --tensorboard-dir "$SAVE_DIR/tensorboard"
)
ARGS=(
  "${MODEL_ARGS[@]}" "${TST_ARGS[@]}" "${TRAIN_ARGS[@]}" "${PARALLEL_ARGS[@]}"
  "${PRECISION_ARGS[@]}" "${DATA_ARGS[@]}" "${TOKENIZER_ARGS[@]}" "${CHECKPOINT_ARGS[@]}"
  "${LOG_ARGS[@]}" "$@"
)

if [[ "$DRY_RUN" == 1 ]]; then
  exec "$PYTHON" pretrain_tst.py "${ARGS[@]}" --dry-run --dry-run-world-size "$GPUS_PER_NODE"
fi

# One thread per process (torchrun's own default for several processes a node, set here so
# that torchrun prints no banner about it).
if ((GPUS_PER_NODE > 1)); then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
# megatron-core's tensor-parallel communication overlap relies on in-order kernel launches;
# FSDP2 overlaps its gathers on connections of their own (Megatron-LM refuses it with 1).
if [[ " ${ARGS[*]} " != *" --use-torch-fsdp2 "* ]]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi
mkdir -p "$SAVE_DIR"
LAUNCHER=(
  "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$GPUS_PER_NODE"
  --max-restarts "$MAX_RESTARTS"
)
# Each start of the workers gets a fresh process-group store from its rank 0: torch's store
# shared with torchrun keeps the previous start's keys, and a restarted group can read them.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
"$PYTHON" -m tst.rerun_record clear "$SAVE_DIR"  # a record after the launch is this one's
STATUS=0
"${LAUNCHER[@]}" pretrain_tst.py "${ARGS[@]}" || STATUS=$?
# torchrun exits 1 whatever its workers' code: the rerun engine's 16 / 17 (--rerun-mode) is
# in the record the trainer leaves in SAVE_DIR; exit with that.
exit "$("$PYTHON" -m tst.rerun_record exit-status "$SAVE_DIR" "$STATUS")"
