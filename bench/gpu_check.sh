#!/usr/bin/env bash
# GPU check on one H200: the trainer in bf16 on a ~370M-parameter GPT (mock data), both TST
# phases, tokens/s and MFU against the H200's dense bf16 peak (989 TFLOP/s); the same with the
# distributed optimizer, with --optimizer-cpu-offload and with --fine-grained-activation-offloading
# (step time, peak memory); then the FP8 path
# (Transformer Engine, hybrid format) where TE is importable, else a line saying why not; then
# context parallelism (CP 2 vs CP 1) where two GPUs are at hand; then a small
# DeepSeek-V3-shaped MoE (MLA, shared expert, expert bias, MTP) that must train.
# Estimated 3-6 minutes on an H200 (imports and weight init included; not yet measured), well
# under 8 with FP8.
#
#   bash bench/gpu_check.sh                # on the GPU host
#   DRY_RUN=1 bash bench/gpu_check.sh      # anywhere, no GPU: the same command lines with --dry-run
#
# The device machine has no internet: megatron-core travels as its cp312 wheel. Once, here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d runs/wheels megatron-core==0.16.1
# then run `bash bench/gpu_check.sh` there with `runs/wheels` carried. torch (CUDA), numpy,
# psutil, sentencepiece and tensorboard are already there; Transformer Engine is not (its
# wheels are far over what can travel), so the FP8 part is skipped there unless it appears.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
WHEELS=${WHEELS:-runs/wheels}
OUT_DIR=${OUT_DIR:-${OUT:-runs/gpu_check}}
ITERS=${ITERS:-40}                  # optimizer steps per run, both phases
TST_ITERS=${TST_ITERS:-20}          # of which superposition
BAG_SIZE=${BAG_SIZE:-6}             # the paper's dense-model bag size
SEQ_LENGTH=${SEQ_LENGTH:-2048}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}   # 64k positions per step
PEAK_TFLOPS=${PEAK_TFLOPS:-989}     # H200 dense bf16 (FP8 dense is 2x; MFU stays on bf16)
LOG_INTERVAL=${LOG_INTERVAL:-5}

MODEL_ARGS=(
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length "$SEQ_LENGTH"
  --swiglu --normalization RMSNorm --position-embedding-type rope
  --untie-embeddings-and-output-weights
)
DATA_ARGS=(--mock-data --vocab-size 32000)
TRAIN_ARGS=(
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --train-iters "$ITERS" --lr 3e-4 --lr-warmup-iters 5 --lr-decay-style constant
  --bf16 --seed 1
)
TST_ARGS=(--tst-bag-size "$BAG_SIZE" --tst-iters "$TST_ITERS")
LOG_ARGS=(
  --log-interval "$LOG_INTERVAL" --eval-interval "$ITERS" --eval-iters 1
  --peak-tflops "$PEAK_TFLOPS" --log-device-memory-used
)

source bench/megatron_wheel.sh
ensure_megatron_core || exit 1

# No biases, no dropout, whatever the trainer's defaults: flags given only where known.
HELP=$("$PYTHON" pretrain_tst.py --help 2>/dev/null || true)
known() { grep -qE -- "(^|[[ ])$1([] ]|$)" <<<"$HELP"; }
if known --disable-bias-linear; then MODEL_ARGS+=(--disable-bias-linear); fi
if known --hidden-dropout; then MODEL_ARGS+=(--hidden-dropout 0 --attention-dropout 0); fi

# A dry run queues its command lines (dry HEADER LINES ARGS...: LINES of the output kept, 0
# all) and checks them at the end in one process (bench/dry_runs.py: one import, not five).
DRY_QUEUE=""
if [[ "$DRY_RUN" == 1 ]]; then
  DRY_QUEUE=$(mktemp -d); trap 'rm -rf "$DRY_QUEUE"' EXIT
fi
dry() {
  printf '%s\0' "$@" > "$DRY_QUEUE/$(printf '%02d' "$(ls "$DRY_QUEUE" | wc -l)")"
}

# run NAME EXTRA_ARGS...: one training (or its --dry-run), its records in $OUT_DIR/NAME.jsonl.
run() {
  local name=$1; shift
  local args=("${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "${TST_ARGS[@]}" "$@")
  if [[ "$DRY_RUN" == 1 ]]; then
    dry "== $name (dry run)" 0 --dry-run "${args[@]}" "${LOG_ARGS[@]}"
    return
  fi
  mkdir -p "$OUT_DIR"
  rm -f "$OUT_DIR/$name.jsonl"
  echo "== $name"
  "$PYTHON" pretrain_tst.py "${args[@]}" "${LOG_ARGS[@]}" --metrics-file "$OUT_DIR/$name.jsonl"
  summarize "$name"
}

# summarize NAME: per phase, the median of the logging windows after each phase's first.
summarize() {
  "$PYTHON" - "$OUT_DIR/$1.jsonl" "$1" "$PEAK_TFLOPS" <<'EOF'
import json, statistics, sys
path, name, peak = sys.argv[1], sys.argv[2], float(sys.argv[3])
records = [json.loads(line) for line in open(path) if '"tflops_per_device"' in line]
for phase in ("superposition", "recovery"):
    windows = [r for r in records if r["phase"] == phase][1:]  # the first holds warm-up
    if not windows:
        print(f"{name} {phase}: no timed window (raise ITERS)")
        continue
    pos, raw, tflops = (statistics.median(r[k] for r in windows)
                        for k in ("positions_per_s", "raw_tokens_per_s", "tflops_per_device"))
    print(f"{name} {phase:<13}: {pos:>9,.0f} tokens/s through the model, {raw:>10,.0f} raw "
          f"tokens/s, {tflops:6.1f} TFLOP/s, MFU {100 * tflops / peak:4.1f}% of {peak:.0f} "
          f"TFLOP/s (median of {len(windows)} windows)")
EOF
}

if [[ "$DRY_RUN" != 1 ]]; then
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
fi
run bf16 --transformer-impl auto

# compare BASE OTHER LABEL: OTHER's step time and peak allocated GPU memory against BASE's.
compare() {
  [[ "$DRY_RUN" == 1 ]] && return 0
  "$PYTHON" - "$OUT_DIR/$1.jsonl" "$OUT_DIR/$2.jsonl" "$3" <<'EOF2'
import json, statistics, sys
def read(path):
    rows = [json.loads(l) for l in open(path)]
    timed = [r for r in rows if "positions_per_s" in r][1:]  # the first window holds warm-up
    peak = max((r["mem_max_allocated_gib"] for r in rows if "mem_max_allocated_gib" in r),
               default=float("nan"))
    return statistics.median(r["positions_per_s"] for r in timed), peak
(base, base_mem), (other, other_mem) = read(sys.argv[1]), read(sys.argv[2])
print(f"{sys.argv[3]}: {base / other:.2f}x the step time, peak allocated {other_mem:.1f} GiB "
      f"vs {base_mem:.1f} GiB ({other_mem / base_mem:.2f}x)")
EOF2
}

# --optimizer-cpu-offload against the distributed optimizer it wraps (one GPU, DP 1: the
# whole Adam state offloaded): step time per phase and the peak of allocated GPU memory.
run dist_opt --transformer-impl auto --use-distributed-optimizer --log-memory-to-tensorboard
run offload --transformer-impl auto --use-distributed-optimizer --log-memory-to-tensorboard \
  --use-precision-aware-optimizer --optimizer-cpu-offload
compare dist_opt offload "--optimizer-cpu-offload vs the distributed optimizer"
# Fine-grained activation offloading of the dense modules against the same run without it
# (NVTE_CPU_OFFLOAD_V1=1: Megatron-LM's rule for TE >= 2.10, where TE is at hand).
NVTE_CPU_OFFLOAD_V1=1 run act_offload --transformer-impl auto --use-distributed-optimizer \
  --log-memory-to-tensorboard --fine-grained-activation-offloading \
  --offload-modules attn_norm qkv_linear core_attn attn_proj mlp_norm
compare dist_opt act_offload "--fine-grained-activation-offloading vs none"
# --reset-attention-mask: a document mask per micro-batch through the attention the run
# picks (Transformer Engine's with an arbitrary mask type where TE is importable, else the
# fused local one with a mask) against the same run without it.
run doc_mask --transformer-impl auto --use-distributed-optimizer --log-memory-to-tensorboard \
  --reset-attention-mask
compare dist_opt doc_mask "--reset-attention-mask vs none"

if "$PYTHON" -c "import transformer_engine.pytorch" 2>/dev/null; then
  run fp8 --transformer-impl transformer_engine --fp8-format hybrid
else
  reason=$("$PYTHON" -c "import transformer_engine.pytorch" 2>&1 | tail -n 1 || true)
  echo "FP8: skipped, Transformer Engine is not importable here (${reason:-unknown reason})"
  if [[ "$DRY_RUN" == 1 ]]; then  # still check that the FP8 command line is accepted
    run fp8 --transformer-impl transformer_engine --fp8-format hybrid
  fi
fi

# Context parallelism: CP 2 on two GPUs (Transformer Engine's CP attention where TE imports,
# else the local spec's) against CP 1 at DP 2, the same global batch, both phases: the
# training losses must agree (rel 1e-3 in bf16). One GPU cannot hold two NCCL ranks: else one
# line why.
GPUS=0 TE_OK=0
if [[ "$DRY_RUN" != 1 ]]; then
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  "$PYTHON" -c "import transformer_engine.pytorch" 2>/dev/null && TE_OK=1
fi
CP_ARGS=(--transformer-impl "$([[ "$TE_OK" == 1 ]] && echo transformer_engine || echo local)"
         --micro-batch-size 2 --global-batch-size 8)
if [[ "$DRY_RUN" == 1 ]]; then
  dry "== cp2 (dry run, 2 GPUs)" 0 --dry-run --dry-run-world-size 2 "${MODEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "${TST_ARGS[@]}" "${CP_ARGS[@]}" \
    --context-parallel-size 2 "${LOG_ARGS[@]}"
elif [[ "$GPUS" -ge 2 ]]; then
  for cp in 1 2; do
    # Transformer Engine's CP attention where TE imports, else the local spec's.
    echo "== cp$cp (2 GPUs, TE importable: $TE_OK)"
    rm -f "$OUT_DIR/cp$cp.jsonl"
    "$PYTHON" -m torch.distributed.run --nproc-per-node 2 pretrain_tst.py "${MODEL_ARGS[@]}" \
      "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "${TST_ARGS[@]}" "${CP_ARGS[@]}" \
      --context-parallel-size "$cp" "${LOG_ARGS[@]}" --metrics-file "$OUT_DIR/cp$cp.jsonl"
  done
  "$PYTHON" - "$OUT_DIR/cp1.jsonl" "$OUT_DIR/cp2.jsonl" <<'EOF2'
import json, sys
one, two = ([json.loads(l)["loss"] for l in open(p) if '"loss": ' in l and '"iteration"' in l]
            for p in sys.argv[1:])
worst = max(abs(a - b) / abs(b) for a, b in zip(two, one))
print(f"CP 2 vs CP 1: {len(one)} steps, worst relative loss difference {worst:.2e} "
      f"({'agree' if worst <= 1e-3 and len(one) == len(two) else 'DIFFER'}; bound 1e-3)")
EOF2
else
  echo "CP: skipped, needs 2 GPUs (GPUs: $GPUS)"
fi

# A small DeepSeek-V3-shaped MoE on the GPU: multi-latent attention, a dense first layer,
# 16 experts top-4 + a shared expert, sigmoid routing with the aux-loss-free expert bias,
# MTP depth 1, the routed experts at a latent width (--moe-latent-size: TE's TELinear
# projections, or where TE is absent the trainer's replicated linear on the GPU); both
# phases, bf16, the TE spec where TE is importable (else the local one).
# It must train: finite losses falling from the start, the MTP loss logged in both phases.
MOE_ARGS=(
  --num-layers 4 --hidden-size 512 --num-attention-heads 8 --seq-length 1024
  --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0 --untie-embeddings-and-output-weights
  --multi-latent-attention --q-lora-rank 256 --kv-lora-rank 128 --qk-head-dim 64
  --qk-pos-emb-head-dim 32 --v-head-dim 64
  --num-experts 16 --moe-router-topk 4 --moe-ffn-hidden-size 512 --ffn-hidden-size 1536
  --moe-layer-freq "([0]*1+[1]*3)" --moe-shared-expert-intermediate-size 512
  --moe-router-score-function sigmoid --moe-router-enable-expert-bias
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4
  --moe-token-dispatcher-type alltoall --mtp-num-layers 1 --moe-latent-size 256
  --mock-data --vocab-size 32000 --micro-batch-size 4 --global-batch-size 16
  --train-iters 30 --lr 1e-3 --lr-warmup-iters 3 --bf16 --seed 1
  --tst-bag-size 4 --tst-iters 10 --log-interval 5 --eval-iters 0 --transformer-impl auto
)
if [[ "$DRY_RUN" == 1 ]]; then
  dry "== moe_mla_mtp (dry run)" 3 --dry-run "${MOE_ARGS[@]}" --record-memory-history \
    --memory-snapshot-path "$OUT_DIR/moe_memory.pickle"
else
  echo "== moe_mla_mtp"
  rm -f "$OUT_DIR/moe_mla_mtp.jsonl"
  rm -f "$OUT_DIR/moe_memory.pickle"
  "$PYTHON" pretrain_tst.py "${MOE_ARGS[@]}" --metrics-file "$OUT_DIR/moe_mla_mtp.jsonl" \
    --record-memory-history --memory-snapshot-path "$OUT_DIR/moe_memory.pickle"
  "$PYTHON" - "$OUT_DIR/moe_mla_mtp.jsonl" "$OUT_DIR/moe_memory.pickle" <<'EOF2'
import json, math, pickle, sys
snapshot = pickle.load(open(sys.argv[2], "rb"))
events = sum(len(t) for t in snapshot.get("device_traces", []))
print(f"--record-memory-history: {len(snapshot.get('segments', []))} allocator segments, "
      f"{events} allocation events in {sys.argv[2]} ({'recorded' if events else 'EMPTY'})")
records = [json.loads(l) for l in open(sys.argv[1]) if '"loss": ' in l and '"iteration"' in l]
loss = [r["loss"] for r in records]
phases = {r["phase"] for r in records if any(k.startswith("mtp") for k in r)}
ok = len(loss) == 6 and all(map(math.isfinite, loss)) and loss[-1] < loss[0]
print(f"MoE + MLA + MTP: {len(loss)} logging windows of 5 steps, loss {loss[0]:.3f} -> {loss[-1]:.3f}, MTP loss "
      f"logged in {sorted(phases)} ({'trains' if ok else 'FAILED'})")
EOF2
fi

# Operations flags on the GPU, on a short dense run of their own: --log-energy (NVML's energy
# counter, each rank's GPU by its UUID) must log plausible watts, and NCCL communicator
# settings (--nccl-communicator-config-path, --high-priority-stream-groups) must be taken by
# megatron-core's NCCL groups.
if [[ "$DRY_RUN" == 1 ]]; then  # a dry run writes nothing under OUT_DIR
  NCCL_YAML=$(mktemp --suffix .yaml); trap 'rm -rf "$DRY_QUEUE" "$NCCL_YAML"' EXIT
else
  mkdir -p "$OUT_DIR"; NCCL_YAML="$OUT_DIR/nccl.yaml"
fi
printf 'dp: {max_ctas: 16, min_ctas: 1}\ntp: {cga_cluster_size: 2}\n' > "$NCCL_YAML"
OPS_ARGS=(
  --num-layers 2 --hidden-size 256 --num-attention-heads 4 --seq-length 512
  --mock-data --vocab-size 32000 --micro-batch-size 4 --global-batch-size 8
  --train-iters 12 --lr 1e-3 --bf16 --tst-bag-size 4 --tst-iters 4 --log-interval 4
  --eval-iters 0 --log-energy --nccl-communicator-config-path "$NCCL_YAML"
  --high-priority-stream-groups dp_cp ep_dp
)
if [[ "$DRY_RUN" == 1 ]]; then
  dry "== ops (dry run)" 2 --dry-run "${OPS_ARGS[@]}"
  "$PYTHON" bench/dry_runs.py "$DRY_QUEUE"   # every queued command line, in order
else
  echo "== ops"
  rm -f "$OUT_DIR/ops.jsonl"
  "$PYTHON" pretrain_tst.py "${OPS_ARGS[@]}" --metrics-file "$OUT_DIR/ops.jsonl"
  "$PYTHON" - "$OUT_DIR/ops.jsonl" <<'EOF2'
import json, sys
records = [json.loads(l) for l in open(sys.argv[1]) if '"power_w_per_device"' in l]
watts = [round(r["power_w_per_device"], 1) for r in records]
ok = len(watts) == 3 and all(10 <= w <= 2000 for w in watts)
print(f"--log-energy (NVML): {records[-1]['energy_j_per_iter_per_device'] if records else None} "
      f"J/iter/GPU, power per window {watts} W ({'plausible' if ok else 'IMPLAUSIBLE or missing'}); "
      "NCCL communicator settings taken (the run started)")
EOF2
fi
