#!/usr/bin/env bash
# passkey.sh: does a model trained from scratch on passkey samples of <= 2K tokens find the key at 2K-128K?
# Three arms with the same data, steps and schedule: linear memory, delta memory, and memory off (gate closed
# and frozen: local attention only). Recipe infinitrain/recipes/tiny-passkey.yaml (byte-level, segment 128).
# Curriculum: stage 1 on samples of <= 512 tokens (4 segments), stage 2 on samples of 1K-2K (16 segments).
#   bash benchmarks/quality/passkey.sh                         # all three arms, 2 at a time
#   ARMS=delta STEPS1=300 STEPS2=100 SAMPLES=4 bash benchmarks/quality/passkey.sh   # a quick look
# Writes benchmarks/quality/results/passkey/<arm>/{passkey.json,passkey.png,train.json} and prints the tables.
set -euo pipefail
source "$(dirname "$0")/env.sh"
RECIPE="$ROOT/infinitrain/recipes/tiny-passkey.yaml"
WORK="${WORK:-/tmp/infinitrain-quality/passkey}"
OUT="${OUT:-$HERE/results/passkey}"
ARMS="${ARMS:-linear delta off}"
PARALLEL="${PARALLEL:-2}"           # arms trained side by side (1 thread each)
STEPS1="${STEPS1:-1200}"            # stage 1: samples <= 512 tokens
STEPS2="${STEPS2:-300}"             # stage 2: samples of 1K-2K tokens
LOSS="${LOSS:-after}"               # after: loss from the end of the key's first occurrence on; answer: answer only
LR="${LR:-3e-3}"
EXTRA="${EXTRA:-}"                  # more key=value overrides for both stages
LENGTHS="${LENGTHS:-2k,8k,32k,128k}"
DEPTHS="${DEPTHS:-0,25,50,75,100}"
SAMPLES="${SAMPLES:-10}"
mkdir -p "$WORK" "$OUT"
cd "$WORK"

# byte-level tokenizer (no merges: 256 bytes + 3 specials), so every digit is its own token
[ -f tokenizer.json ] || { "$PY" -c "from infinitrain.data_tools.passkey import build_prompt as b; print(b(12345, 20, .5))" > seed.txt
                           "$INF" tokenizer train seed.txt --vocab-size 259 --out tokenizer.json; }
depths=$(seq -s, 0 5 100)
make_stage() {  # make_stage NAME SEGMENTS LENGTH...: passkey records -> loss fields -> shards
  local name=$1 segs=$2; shift 2
  [ -f "shards-$name/index.json" ] && return 0
  local files=()
  for L in "$@"; do
    "$INF" data passkey --out "pk-$L.jsonl" --tokenizer tokenizer.json --length "$L" --depths "$depths" \
      --count 200 --seed "$L"
    files+=("pk-$L.jsonl")
  done
  "$PY" "$HERE/passkey_fields.py" "${files[@]}" --out "$name.jsonl" --loss "$LOSS"
  "$INF" prepare "$name.jsonl" --tokenizer tokenizer.json --out "shards-$name" --segment-len 128 \
    --sample-segments "$segs" --format summarization --separator "" --val-fraction 0.02 --no-progress
  cp tokenizer.json "shards-$name/"
}
make_stage short 4 256 384 512
make_stage long 16 1024 1536 2048

arm_overrides() {
  case "$1" in
    linear) echo "model.update=linear" ;;
    delta) echo "model.update=delta" ;;
    off) echo "model.gate_init=-30 optim.gate_lr=0" ;;  # sigmoid(-30) ~ 1e-13: the memory read is off
    *) echo "unknown arm $1 (linear, delta, off)" >&2; exit 3 ;;
  esac
}
train_arm() {
  local arm=$1 ov; ov=$(arm_overrides "$arm")
  local t0; t0=$(date +%s)
  # shellcheck disable=SC2086
  "$INF" train --recipe "$RECIPE" --data shards-short --run-dir "runs/$arm-1" --resume none $ov $EXTRA \
    data.segments_per_sample=4 data.micro_batch_size=16 schedule.steps="$STEPS1" schedule.warmup=30 \
    optim.lr="$LR" > "train-$arm.log" 2>&1
  local t1; t1=$(date +%s)
  # shellcheck disable=SC2086
  "$INF" train --recipe "$RECIPE" --data shards-long --run-dir "runs/$arm" --resume none --init-from "runs/$arm-1" \
    $ov $EXTRA schedule.steps="$STEPS2" schedule.warmup=10 optim.lr="$LR" >> "train-$arm.log" 2>&1
  local t2; t2=$(date +%s)
  mkdir -p "$OUT/$arm"
  printf '{"arm": "%s", "stage1_steps": %s, "stage2_steps": %s, "stage1_seconds": %s, "stage2_seconds": %s, "loss": "%s", "lr": "%s", "extra": "%s"}\n' \
    "$arm" "$STEPS1" "$STEPS2" $((t1 - t0)) $((t2 - t1)) "$LOSS" "$LR" "$EXTRA" > "$OUT/$arm/train.json"
  echo "$arm: trained in $((t2 - t0)) s (stage 1 $((t1 - t0)) s, stage 2 $((t2 - t1)) s)"
}
eval_arm() {
  "$INF" eval passkey "runs/$1" --tokenizer tokenizer.json --lengths "$LENGTHS" --depths "$DEPTHS" \
    --samples "$SAMPLES" --batch-size 10 --threads 1 --out "$OUT/$1" --no-progress
}

running=0
for arm in $ARMS; do
  ( train_arm "$arm" && eval_arm "$arm" ) &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
"$PY" "$HERE/passkey_summary.py" "$OUT" --arms $ARMS
