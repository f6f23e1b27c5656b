#!/usr/bin/env bash
# TST pretraining on several nodes without a scheduler: run this script on every node, with
# the same settings and that node's NODE_RANK. torchrun starts one process per GPU; the nodes
# meet at a c10d rendezvous whose store node 0 serves at MASTER_ADDR:MASTER_PORT.
#
#   # node 0 (reachable at 10.0.0.1), then the same on node 1 with NODE_RANK=1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 CONFIG=examples/configs/dense_600m.sh \
#   DATA_PATH=/data/dclm_text_document TOKENIZER_MODEL=/data/qwen3/tokenizer.json \
#   SAVE_DIR=/shared/ckpt/tst-600m bash examples/train_multi_node.sh
#
#   MAX_RESTARTS=3 ...       a failed worker anywhere makes every node restart its workers
#                            (up to 3 times); each start resumes from the newest checkpoint
#   PYTHON=/envs/tst/bin/python ...   the interpreter of torchrun and of every worker
#   ... train_multi_node.sh --eval-interval 500    extra flags go to pretrain_tst.py (last wins)
#   DRY_RUN=1 NNODES=2 ...   check the config for NNODES x GPUS_PER_NODE GPUs (no GPU, no data)
#
# SAVE_DIR must be one shared folder for all nodes; running the same commands again resumes
# from its newest checkpoint. Ranks are given out by the rendezvous (node 0's processes are
# not necessarily ranks 0..7): NODE_RANK only picks the node that serves the store.
# The configs (examples/configs/*.sh) are bash files that set MODEL_ARGS, TST_ARGS,
# TRAIN_ARGS and PARALLEL_ARGS; this script adds data, precision, checkpoints and logging.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-examples/configs/dense_600m.sh}
PRECISION=${PRECISION:-bf16}                       # bf16 | fp8 | fp32 (no mixed precision)
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}                          # 0 on the node at MASTER_ADDR
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-tst}                              # the same on every node of one launch
STORE_GRACE_S=${STORE_GRACE_S:-5}                  # node 0: the store outlives its torchrun so long
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA_PATH=${DATA_PATH:-/data/dclm_text_document}   # prefix, or a blend: "0.7 a_text_document 0.3 b_text_document"
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/data/qwen3/tokenizer.json}
SAVE_DIR=${SAVE_DIR:-checkpoints/$(basename "$CONFIG" .sh)-$PRECISION}
MAX_RESTARTS=${MAX_RESTARTS:-0}                    # torchrun restarts of a failed worker group
DRY_RUN=${DRY_RUN:-0}
VOCAB_SIZE=${VOCAB_SIZE:-151669}  # dry run without a tokenizer file: the Qwen3 tokenizer's size
PYTHON=${PYTHON:-python}

# shellcheck source=examples/configs/dense_600m.sh
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
  exec "$PYTHON" pretrain_tst.py "${ARGS[@]}" \
    --dry-run --dry-run-world-size $((NNODES * GPUS_PER_NODE))
fi

LAUNCHER=(
  "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-conf is_host=false
  --rdzv-id "$RUN_ID" --max-restarts "$MAX_RESTARTS"
)
# Each start of the workers gets a fresh process-group store from its rank 0: torch's store
# shared with torchrun keeps the previous start's keys, and a restarted group can read them.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# One thread per process (torchrun's own default for several processes a node, set here so
# that torchrun prints no banner about it).
if ((GPUS_PER_NODE > 1)); then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
# megatron-core's tensor-parallel communication overlap relies on in-order kernel launches;
# FSDP2 overlaps its gathers on connections of their own (Megatron-LM refuses it with 1).
if [[ " ${ARGS[*]} " != *" --use-torch-fsdp2 "* ]]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi
mkdir -p "$SAVE_DIR"

if [[ "$NODE_RANK" == 0 ]]; then
  # Node 0 serves the rendezvous store from a process of its own (no torchrun serves it:
  # is_host=false), kept STORE_GRACE_S seconds after this node's torchrun has ended. A
  # torchrun serving it would take it down as it exits, while the other nodes' torchruns may
  # still be leaving their exit barrier (a c10d `recvValueWithTimeout ... Connection was
  # likely closed` traceback at the end of a good run).
  "$PYTHON" -c 'import signal, sys, torch.distributed as dist
store = dist.TCPStore("0.0.0.0", int(sys.argv[1]), is_master=True, wait_for_workers=False)
signal.pause()' "$MASTER_PORT" &
  STORE_PID=$!
  trap 'sleep "$STORE_GRACE_S"; kill "$STORE_PID" 2>/dev/null || true' EXIT
fi
"$PYTHON" -m tst.rerun_record clear "$SAVE_DIR"  # a record after the launch is this one's
STATUS=0
"${LAUNCHER[@]}" pretrain_tst.py "${ARGS[@]}" || STATUS=$?
# torchrun exits 1 whatever its workers' code: the rerun engine's 16 / 17 (--rerun-mode) is
# in the record the trainer leaves in SAVE_DIR; exit with that.
exit "$("$PYTHON" -m tst.rerun_record exit-status "$SAVE_DIR" "$STATUS")"
