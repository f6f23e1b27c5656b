#!/usr/bin/env bash
# One-shot GPU study on one H200, from a bare machine, in one command of about 6-7 minutes
# (397 s with BUDGET_S=420 on 2026-12-04; docs/RESULTS.md):
#   1. a corpus from the Python source files of the installed packages (no data is sent),
#      a byte-level BPE tokenizer trained on part of it (tools/train_tokenizer.py) and the
#      .bin/.idx written by tools/preprocess_data.py on every core;
#   2. bench/gpu_check.sh's short figures (a ~370M GPT, both phases, bf16; FP8 where TE is;
#      149 s on 2026-12-04; GPU_CHECK=0 skips it);
#   3. a ~110M-parameter GPT (12 x 768, SwiGLU, 32,000-entry vocabulary, tied, context 2048,
#      bf16, TE where importable, else the local spec with torch's fused attention; 0.59 s a
#      step with megatron-core's unfused one on 2026-12-04): a calibration run that times a step, then a baseline and a
#      TST arm (bag 6, r 0.3) and a multi-stage arm (--tst-schedule 6:0.15,3:0.15,1: bag 6,
#      then bag 3, 30% of the steps in all) at the same number of steps, as many as the time
#      budget allows (each run also has a time-based stop, --exit-duration-in-mins);
#   4. a summary: per arm steps, raw tokens, final held-out next-token loss, tokens/s and MFU
#      per phase (against the H200's dense bf16 peak, 989 TFLOP/s), peak memory.
# Everything it reports lands in OUTPUT_FOLDER: summary.md (the table), summary.json,
# study.log (this script's whole output) and results.tar.gz (every run's metrics JSONL, log
# and peak memory, the gpu_check figures, the tokenizer). Corpus and datasets stay in $WORK.
#
#   bash bench/gpu_study.sh OUTPUT_FOLDER             # on the GPU host
#   DRY_RUN=1 bash bench/gpu_study.sh OUTPUT_FOLDER   # anywhere: the same steps on CPU at tiny
#                                                     # sizes (about a minute), plus --dry-run
#                                                     # checks of the GPU-sized command lines
#
# From the development machine, with the device tool (the machine has no network; megatron-
# core travels as its cp312 wheel, downloaded once here into the git-ignored runs/wheels):
#   pip download megatron-core==0.16.1 --python-version 3.12 --only-binary=:all: --no-deps \
#     -d runs/wheels
#   run(command='bash bench/gpu_study.sh "$OUT"', carry=["runs/wheels"], timeout_s=540)
# BUDGET_S (default 330) is the wall-clock the whole study aims at; the arms get what the
# preparation leaves. A second try on the same (still warm) machine reuses $WORK's corpus,
# tokenizer and datasets.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_FOLDER=${1:?usage: bash bench/gpu_study.sh OUTPUT_FOLDER}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
WHEELS=${WHEELS:-runs/wheels}
# (an if, not `[[ ]] && echo`: a false test would end the script under set -e)
if [[ "$DRY_RUN" == 1 ]]; then WORK=${WORK:-/tmp/tst_gpu_study_dry}; else WORK=${WORK:-/tmp/tst_gpu_study}; fi
PEAK_TFLOPS=${PEAK_TFLOPS:-989}      # H200 dense bf16
BAG_SIZE=${BAG_SIZE:-6}              # the paper's and the ~100M reproduction's
TST_FRACTION=${TST_FRACTION:-0.3}
MULTI_SCHEDULE=${MULTI_SCHEDULE-6:0.15,3:0.15,1}  # the multi-stage arm; empty: no such arm
N_ARMS=$([[ -n "$MULTI_SCHEDULE" ]] && echo 3 || echo 2)
LR=${LR:-1e-3}
N_EVALS=${N_EVALS:-5}                # held-out evaluations per arm (the last at the end)
GPU_CHECK=${GPU_CHECK:-1}            # 0: skip bench/gpu_check.sh (2.5 minutes on the H200)
if [[ "$DRY_RUN" == 1 ]]; then       # CPU, tiny: the whole path in about a minute
  BUDGET_S=${BUDGET_S:-0}
  CORPUS_MB=${CORPUS_MB:-1}; TOKENIZER_MB=${TOKENIZER_MB:-0.3}; VOCAB=${VOCAB:-512}
  MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64)
  MBS=${MBS:-4}; GBS=${GBS:-8}; CALIB_ITERS=${CALIB_ITERS:-4}; LOG_INTERVAL=${LOG_INTERVAL:-1}
  EVAL_ITERS=${EVAL_ITERS:-1}; STEPS=${STEPS:-10}; PRECISION=()
else
  BUDGET_S=${BUDGET_S:-330}
  CORPUS_MB=${CORPUS_MB:-200}; TOKENIZER_MB=${TOKENIZER_MB:-20}; VOCAB=${VOCAB:-32000}
  MODEL=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 2048)
  MBS=${MBS:-8}; GBS=${GBS:-32}; CALIB_ITERS=${CALIB_ITERS:-30}; LOG_INTERVAL=${LOG_INTERVAL:-5}
  EVAL_ITERS=${EVAL_ITERS:-4}; STEPS=${STEPS:-}; PRECISION=(--bf16)
fi
GPU_MODEL=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 2048)
MODEL_ARGS=(--swiglu --normalization RMSNorm --position-embedding-type rope)
TRAIN_ARGS=(
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --lr "$LR" --min-lr 1e-4
  --lr-decay-style wsd --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --seed 1
  --transformer-impl auto
)
elapsed() { echo "$SECONDS"; }  # seconds since the script started

mkdir -p "$OUT_FOLDER" "$WORK"
OUT_FOLDER=$(cd "$OUT_FOLDER" && pwd)
RESULTS="$OUT_FOLDER/results"
rm -rf "$RESULTS"
mkdir -p "$RESULTS/logs" "$RESULTS/metrics"
exec 3>&1 4>&2 > >(tee "$OUT_FOLDER/study.log") 2>&1
TEE_PID=$!
# On any exit: give the output back to the caller and let tee finish study.log first.
trap 'exec 1>&3 2>&4; wait "$TEE_PID" 2>/dev/null || true' EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true

echo "== gpu_study: output $OUT_FOLDER, work $WORK, budget ${BUDGET_S}s, dry run $DRY_RUN"
source bench/megatron_wheel.sh
ensure_megatron_core || exit 1
if [[ "$DRY_RUN" != 1 ]]; then
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
fi
# A plain pre-norm GPT (no biases, no dropout) whatever the trainer's defaults: these flags
# are given only where this version of pretrain_tst.py has them.
HELP=$("$PYTHON" pretrain_tst.py --help 2>/dev/null || true)
known() { grep -qE -- "(^|[[ ])$1([] ]|$)" <<<"$HELP"; }
if known --disable-bias-linear; then MODEL_ARGS+=(--disable-bias-linear); fi
if known --hidden-dropout; then MODEL_ARGS+=(--hidden-dropout 0 --attention-dropout 0); fi

# ------------------------------------------------------------------ 1. data, made here
if [[ ! -f "$WORK/data.done" ]]; then
  echo "== corpus: Python sources of the installed packages, up to $CORPUS_MB MB [$(elapsed) s]"
  "$PYTHON" - "$WORK" "$CORPUS_MB" "$TOKENIZER_MB" <<'EOF'
import hashlib, json, os, random, sys, sysconfig
work, limit, tok_limit = sys.argv[1], float(sys.argv[2]) * 1e6, float(sys.argv[3]) * 1e6
roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
paths = sorted(os.path.join(d, f) for r in roots for d, _, fs in os.walk(r) for f in fs
               if f.endswith(".py"))
random.Random(0).shuffle(paths)  # documents from every package; the held-out split too
seen, size, docs = set(), 0, 0
with open(f"{work}/corpus.jsonl", "w") as out, open(f"{work}/tok_sample.jsonl", "w") as sample:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha1(text.encode()).digest()
        if not text.strip() or len(text) > 1_000_000 or digest in seen:
            continue  # empty, generated, or a vendored copy of a file already taken
        seen.add(digest)
        line = json.dumps({"text": text}) + "\n"
        out.write(line)
        if size < tok_limit:
            sample.write(line)
        size, docs = size + len(text.encode()), docs + 1
        if size >= limit:
            break
print(f"corpus: {docs:,} files, {size / 1e6:,.1f} MB of {len(paths):,} .py files found")
EOF
  echo "== tokenizer: byte-level BPE, $VOCAB entries, on the first $TOKENIZER_MB MB [$(elapsed) s]"
  "$PYTHON" tools/train_tokenizer.py --input "$WORK/tok_sample.jsonl" --model-prefix "$WORK/tok" \
    --library huggingface --vocab-size "$VOCAB"
  echo "== preprocess on $(nproc) workers [$(elapsed) s]"
  "$PYTHON" tools/preprocess_data.py --input "$WORK/corpus.jsonl" --output-prefix "$WORK/code" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/tok/tokenizer.json" \
    --append-eod --workers "$(nproc)" --log-interval 5
  touch "$WORK/data.done"
else
  echo "== reusing the corpus, tokenizer and datasets in $WORK"
fi
cp "$WORK/tok/tokenizer.json" "$RESULTS/tokenizer.json"
DATA_ARGS=(
  --data-path "$WORK/code_text_document" --split 98,2,0 --data-cache-path "$WORK/index-cache"
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/tok/tokenizer.json"
)

# ------------------------------------------------------------------ 2. gpu_check's figures
echo "== bench/gpu_check.sh [$(elapsed) s]"
if [[ "$GPU_CHECK" != 1 ]]; then
  echo "skipped (GPU_CHECK=$GPU_CHECK)" > "$RESULTS/logs/gpu_check.log"
elif [[ "$DRY_RUN" == 1 ]]; then
  DRY_RUN=1 PYTHON="$PYTHON" OUT_DIR="$RESULTS/gpu_check" bash bench/gpu_check.sh \
    > "$RESULTS/logs/gpu_check.log" 2>&1 || echo "gpu_check failed (exit $?)"
else
  ITERS=${GPU_CHECK_ITERS:-20} TST_ITERS=$(( ${GPU_CHECK_ITERS:-20} / 2 )) PYTHON="$PYTHON" \
    OUT_DIR="$RESULTS/gpu_check" bash bench/gpu_check.sh > "$RESULTS/logs/gpu_check.log" 2>&1 \
    || echo "gpu_check failed (exit $?)"
fi
grep -E "^(bf16|fp8|FP8|device)" "$RESULTS/logs/gpu_check.log" || true

# ------------------------------------------------------------------ 3. calibration and arms
# train NAME ARGS...: one pretrain_tst.py run; metrics, log, wall seconds and peak memory
# (the CUDA caching allocator's maxima and the host's peak RSS, read at exit) under $RESULTS.
train() {
  local name=$1; shift
  local start; start=$(date +%s.%N)
  local status=0
  "$PYTHON" - "$RESULTS/metrics/$name.memory.json" "$@" \
    --metrics-file "$RESULTS/metrics/$name.jsonl" <<'EOF' > "$RESULTS/logs/$name.log" 2>&1 || status=$?
import atexit, json, resource, runpy, sys
path = sys.argv[1]
sys.argv = ["pretrain_tst.py", *sys.argv[2:]]

def peak_memory():
    out = {"host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    with open(path, "w") as f:
        json.dump(out, f)

atexit.register(peak_memory)
runpy.run_path("pretrain_tst.py", run_name="__main__")
EOF
  "$PYTHON" -c "import time; print(f'{time.time() - $start:.2f}')" > "$RESULTS/metrics/$name.wall"
  if [[ "$status" != 0 ]]; then
    tail -n 25 "$RESULTS/logs/$name.log"
  else
    grep -E "^(iter|  eval|stopping)" "$RESULTS/logs/$name.log" | tail -n 3 || true
  fi
  echo "   $name: exit $status, $(cat "$RESULTS/metrics/$name.wall") s wall"
  return "$status"
}

echo "== calibration: $CALIB_ITERS baseline steps [$(elapsed) s]"
train calibration "${MODEL[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" \
  "${PRECISION[@]}" --train-iters "$CALIB_ITERS" --lr-warmup-iters 1 \
  --log-interval "$LOG_INTERVAL" --eval-interval "$CALIB_ITERS" --eval-iters "$EVAL_ITERS" \
  --peak-tflops "$PEAK_TFLOPS"

# Steps per arm: what each arm's share of the budget left holds at the calibrated step time
# (10% kept for the superposition phase's data and loss), a multiple of N_EVALS * 2.
PLANNED=$("$PYTHON" - "$RESULTS/metrics" "$BUDGET_S" "$(elapsed)" "$N_EVALS" "${STEPS:-0}" \
    "$N_ARMS" <<'EOF'
import json, math, statistics, sys
folder, budget, spent, n_evals, fixed = sys.argv[1], *map(float, sys.argv[2:5]), int(sys.argv[5])
n_arms = int(sys.argv[6])
records = [json.loads(l) for l in open(f"{folder}/calibration.jsonl") if l.strip()]
train = [r for r in records if "tflops_per_device" in r]
evals = [r for r in records if "val_loss" in r]
wall = float(open(f"{folder}/calibration.wall").read())
per_step = statistics.median(
    (r["elapsed_s"] - b["elapsed_s"]) / (r["iteration"] - b["iteration"])
    for b, r in zip(train, train[1:])) if len(train) > 1 else train[-1]["elapsed_s"] / train[-1]["iteration"]
eval_s = evals[-1]["elapsed_s"] - train[-1]["elapsed_s"] if evals else 0.0
overhead = wall - (evals or train)[-1]["elapsed_s"]  # start-up and exit, outside the trainer
arm = (budget - spent - 15) / n_arms  # 15 s for the summary and the archive
unit = 2 * int(n_evals)
if fixed:
    steps = fixed
else:
    steps = int((arm - overhead - n_evals * eval_s) / (1.1 * per_step)) // unit * unit
    steps = max(steps, unit)
# The time-based stop is a safety net, not the plan: 30% over the arm's planned training time.
cap = max(arm - overhead, 60.0) * 1.3 / 60 if budget > 0 else 60.0
print(steps, f"{cap:.2f}", f"step={per_step:.3f}s,eval={eval_s:.1f}s,start-up={overhead:.1f}s,"
      f"arm_budget={arm:.0f}s")
EOF
) || { echo "could not plan the arms from the calibration run" >&2; exit 1; }
read -r STEPS ARM_CAP_MIN PLAN <<<"$PLANNED"
echo "== arms: $STEPS steps each ($PLAN; time-based stop at $ARM_CAP_MIN min) [$(elapsed) s]"
EVAL_INTERVAL=$(( STEPS / N_EVALS ))
# The arms log at a divisor of the evaluation interval, so that windows free of an evaluation
# exist for the throughput figures (every 5 steps against evaluations every 4 left none).
gcd() { local a=$1 b=$2; while (( b )); do local t=$b; b=$(( a % b )); a=$t; done; echo "$a"; }
ARM_LOG_INTERVAL=$(gcd "$LOG_INTERVAL" "$EVAL_INTERVAL")
ARM_ARGS=(
  "${MODEL[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}" "${PRECISION[@]}"
  --train-iters "$STEPS" --lr-warmup-iters $(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))
  --lr-wsd-decay-iters $(( STEPS / 5 > 0 ? STEPS / 5 : 1 ))
  --log-interval "$ARM_LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
  --peak-tflops "$PEAK_TFLOPS" --exit-duration-in-mins "$ARM_CAP_MIN"
)
FAILED=0
echo "== baseline [$(elapsed) s]"
train baseline "${ARM_ARGS[@]}" || FAILED=1
echo "== tst: bag $BAG_SIZE, r $TST_FRACTION [$(elapsed) s]"
train tst "${ARM_ARGS[@]}" --tst-bag-size "$BAG_SIZE" --tst-fraction "$TST_FRACTION" || FAILED=1
if [[ -n "$MULTI_SCHEDULE" ]]; then
  echo "== multistage: --tst-schedule $MULTI_SCHEDULE [$(elapsed) s]"
  train multistage "${ARM_ARGS[@]}" --tst-schedule "$MULTI_SCHEDULE" || FAILED=1
fi

if [[ "$DRY_RUN" == 1 ]]; then  # the GPU-sized command lines, checked on the meta device
  echo "== the GPU arms' command lines, --dry-run"
  GPU_DRY=$(mktemp -d)  # both checked in one process (bench/dry_runs.py)
  GPU_ARGS=("${GPU_MODEL[@]}" "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" --bf16 --micro-batch-size 8
            --global-batch-size 32 --vocab-size 32000 --mock-data --train-iters 300)
  printf '%s\0' "== tst: bag $BAG_SIZE, r $TST_FRACTION" 0 --dry-run "${GPU_ARGS[@]}" \
    --tst-bag-size "$BAG_SIZE" --tst-fraction "$TST_FRACTION" > "$GPU_DRY/0"
  if [[ -n "$MULTI_SCHEDULE" ]]; then
    printf '%s\0' "== multistage: --tst-schedule $MULTI_SCHEDULE" 0 --dry-run "${GPU_ARGS[@]}" \
      --tst-schedule "$MULTI_SCHEDULE" > "$GPU_DRY/1"
  fi
  "$PYTHON" bench/dry_runs.py "$GPU_DRY" > "$RESULTS/logs/gpu_dry_run.log" 2>&1 || FAILED=1
  rm -rf "$GPU_DRY"
  # The parameter counts and the phase tables' rows (stage, phase, steps, bags, loss).
  grep -E "^(parameters| *[0-9]+ (superposition|recovery))" "$RESULTS/logs/gpu_dry_run.log" || true
fi

# ------------------------------------------------------------------ 4. summary
echo "== summary [$(elapsed) s]"
"$PYTHON" - "$OUT_FOLDER" "$PEAK_TFLOPS" "$GBS" "${MODEL[*]}" "$BAG_SIZE" "$TST_FRACTION" \
    "$(elapsed)" "$MULTI_SCHEDULE" <<'EOF' || FAILED=1
import json, os, statistics, sys
sys.path.insert(0, "bench")
sys.path.insert(0, "tools")
from reproduce import clean_windows  # each phase's first window and eval windows left out
from run_metrics import RunMetrics, read_metrics

out, peak, gbs, model, bag, fraction, wall, multi = sys.argv[1:9]
peak, gbs = float(peak), int(gbs)
seq = int(model.split("--seq-length ")[1].split()[0])
folder = f"{out}/results/metrics"
arms = {}
for name in ("calibration", "baseline", "tst", "multistage"):
    path = f"{folder}/{name}.jsonl"
    if not os.path.isfile(path):
        continue
    try:
        run = read_metrics(path, name)
    except Exception as error:  # a run that died before its first evaluation
        print(f"{name}: {error}")
        continue
    mem_path = f"{folder}/{name}.memory.json"
    memory = json.load(open(mem_path)) if os.path.isfile(mem_path) else {}
    phases = {}
    for phase in ("superposition", "recovery"):
        windows = [r for _, r in clean_windows(run) if r["phase"] == phase]
        clean = bool(windows)
        if not windows:  # too short for a clean window: every window, marked as such
            windows = [r for r in run.train if r["phase"] == phase]
        if windows:
            med = lambda k: statistics.median(r[k] for r in windows)
            phases[phase] = {"positions_per_s": med("positions_per_s"),
                             "raw_tokens_per_s": med("raw_tokens_per_s"),
                             "tflops": med("tflops_per_device"),
                             "mfu": med("tflops_per_device") / peak, "windows": len(windows),
                             "clean": clean}
    arms[name] = {
        "steps": run.train[-1]["iteration"], "raw_tokens": run.train[-1]["raw_tokens"],
        "positions": run.train[-1]["iteration"] * gbs * seq,
        "final_val_loss": run.evals[-1]["val_loss"], "final_eval_iteration": run.evals[-1]["iteration"],
        "val_loss_curve": [(e["iteration"], e["val_loss"]) for e in run.evals],
        "phases": phases, "peak_memory": memory,
        "wall_s": float(open(f"{folder}/{name}.wall").read()),
    }

def phase_cell(arm, key, fmt):
    return " / ".join(f"{p[:3]} {fmt(arm['phases'][p][key])}{'' if arm['phases'][p]['clean'] else ' (†)'}"
                      for p in ("superposition", "recovery") if p in arm["phases"]) or "n/a"

def memory_cell(arm):
    m = arm["peak_memory"]
    if "cuda_max_allocated_gib" in m:
        return f"{m['cuda_max_allocated_gib']:.1f} GiB ({m['cuda_max_reserved_gib']:.1f} reserved)"
    return f"host RSS {m['host_max_rss_gib']:.2f} GiB" if m else "n/a"

rows = ["| arm | steps | raw tokens | final held-out next-token loss | positions/s per phase | raw tokens/s per phase | MFU per phase | peak memory |",
        "|---|---|---|---|---|---|---|---|"]
for name, arm in arms.items():
    rows.append(f"| {name} | {arm['steps']:,} | {arm['raw_tokens']:,} | {arm['final_val_loss']:.4f} "
                f"(at {arm['final_eval_iteration']}) | {phase_cell(arm, 'positions_per_s', lambda v: f'{v:,.0f}')} | "
                f"{phase_cell(arm, 'raw_tokens_per_s', lambda v: f'{v:,.0f}')} | "
                f"{phase_cell(arm, 'mfu', lambda v: f'{100 * v:.1f}%')} | {memory_cell(arm)} |")
notes = []
if "baseline" in arms and "tst" in arms:
    b, t = arms["baseline"], arms["tst"]
    equal = "equal steps" if b["steps"] == t["steps"] else "UNEQUAL steps (a time-based stop fired)"
    notes.append(f"TST bag {bag}, r {fraction}: held-out loss {t['final_val_loss']:.4f} vs baseline "
                 f"{b['final_val_loss']:.4f} ({t['final_val_loss'] - b['final_val_loss']:+.4f}) at {equal}; "
                 f"raw tokens {t['raw_tokens'] / max(b['raw_tokens'], 1):.2f}x the baseline's.")
    if "multistage" in arms:
        m = arms["multistage"]
        notes.append(f"Multi-stage --tst-schedule {multi}: held-out loss {m['final_val_loss']:.4f} "
                     f"({m['final_val_loss'] - b['final_val_loss']:+.4f} vs baseline, "
                     f"{m['final_val_loss'] - t['final_val_loss']:+.4f} vs the TST arm) at "
                     f"{m['steps']:,} steps; raw tokens {m['raw_tokens'] / max(b['raw_tokens'], 1):.2f}x "
                     "the baseline's.")
    notes.append(f"Regime: context {seq}, {b['steps']:,} steps of {gbs} x {seq} = {gbs * seq:,} positions "
                 f"({b['positions'] / 1e6:,.1f}M positions per arm) against the ~100M reproduction's "
                 f"3,000 steps at context 2,048: {b['steps'] / 3000:.1%} of its steps; at this batch its "
                 f"3,000 steps would be {3000 * gbs * seq / 1e6:,.0f}M positions.")
if any(not p["clean"] for arm in arms.values() for p in arm["phases"].values()):
    notes.append("(†) no clean logging window in that phase (each phase's first window and those "
                 "holding an evaluation are left out): the figure includes start-up, compilation "
                 "or evaluation time and is not a steady-state throughput.")
check = f"{out}/results/logs/gpu_check.log"
check_lines = [l.rstrip() for l in open(check) if l.startswith(("bf16", "fp8", "FP8", "device"))] if os.path.isfile(check) else []
text = "\n".join(["# GPU study", "", f"Model: {model} (SwiGLU, RMSNorm, RoPE, tied embeddings); "
                  f"global batch {gbs}; MFU against {peak:.0f} TFLOP/s; study wall {float(wall):.0f} s.",
                  "", *rows, "", *notes, "", "bench/gpu_check.sh:", "", *[f"    {l}" for l in check_lines], ""])
open(f"{out}/summary.md", "w").write(text)
json.dump({"arms": arms, "gpu_check": check_lines, "peak_tflops": peak, "global_batch": gbs,
           "model": model, "notes": notes}, open(f"{out}/summary.json", "w"), indent=2)
print(text)
EOF
tar -czf "$OUT_FOLDER/results.tar.gz" -C "$OUT_FOLDER" results && rm -rf "$RESULTS"
echo "== done in $(elapsed) s: $OUT_FOLDER/{summary.md,summary.json,study.log,results.tar.gz}"
exit "$FAILED"
