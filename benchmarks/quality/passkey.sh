#!/usr/bin/env bash
# passkey.sh: does a model trained from scratch on passkey samples of <= 2K tokens find the key at 2K-128K?
# Three arms with the same data, steps and schedule: linear memory, delta memory, and memory off (gate closed
# and frozen: local attention only). Recipe infinitrain/recipes/tiny-passkey.yaml (segment 128, gate_split 3,
# memory_tau 4), tokenizer: the passkey text's words plus one token a digit. Curriculum: stage 1 on samples of
# 64-256 tokens (2 segments), where the copy circuit forms, in one cosine cycle per number in STEPS1 (each cycle
# starts from the last one's weights at the full learning rate); then stage 2 on samples of 1K-2K (16 segments)
# whose keys are drawn like the eval's (MAXKEY2) and whose needle starts in the question's segment in LOCAL of them.
# MEMBERS > 1 trains stage 2 that many times from the stage-1 model with other records and order, then keeps the
# member that finds the most keys in 2K validation prompts (COMBINE=best) or averages their weights (COMBINE=average);
# neither beat the single stage 2 at 32K (results/passkey-soup/), so MEMBERS is 1.
# After training, each memory arm's memory temperature factor (eval --memory-tau-scale) is chosen from TAU_SCALES on
# validation prompts with other keys (eval passkey --seed 1 at CAL_LENGTHS) and the evals use it.
# In MEMORY of the samples the needle ends a segment before the question, so only the memory can carry the key;
# in DISTRACT of the filler sentences another number replaces the colour, so the memory must store which number
# followed "pass key", not just the digits it saw. Stage-1 keys have up to DIGITS digits (more copy targets per
# sample); the eval uses the paper's 1..50000. The arms run one after another, each with the 2 cores (~17-20 min).
#   bash benchmarks/quality/passkey.sh                         # all three arms, ~70 min with the evals
#   ARMS=delta STEPS1=300 STEPS2=100 SAMPLES=4 bash benchmarks/quality/passkey.sh   # a quick look
# Writes benchmarks/quality/results/passkey/<arm>/{passkey.json,passkey.png,train.json} (and <arm>-no-memory/ for
# the memory arms; OUT/ARM/calibration/ the validation runs) and prints the tables.
set -euo pipefail
PARALLEL="${PARALLEL:-1}"           # arms trained side by side, THREADS threads each
THREADS="${THREADS:-$((2 / PARALLEL > 0 ? 2 / PARALLEL : 1))}"
source "$(dirname "$0")/env.sh"
RECIPE="$ROOT/infinitrain/recipes/tiny-passkey.yaml"
WORK="${WORK:-/tmp/infinitrain-quality/passkey}"
OUT="${OUT:-$HERE/results/passkey}"
ARMS="${ARMS:-linear delta off}"
STEPS1="${STEPS1:-2200 1300}"       # stage 1: cosine cycles of SHORT_BATCH samples of SHORT tokens a step
STEPS2="${STEPS2:-500}"             # stage 2: 8 samples of 1K-2K tokens per step
LOSS="${LOSS:-after}"               # after: loss from the end of the key's first occurrence on; answer: answer only
DIGITS="${DIGITS:-20}"              # stage 1 keys have 1..DIGITS digits (many copy targets: the copy circuit forms)
DIGITS2="${DIGITS2:-$DIGITS}"       # stage 2 keys have 1..DIGITS2 digits (the eval's: 1..50000)
LR="${LR:-3e-3}"
VOCAB="${VOCAB:-400}"               # tokenizer vocabulary (the recipe's model.vocab_size must match)
SHORT="${SHORT:-64 256}"            # stage 1 sample lengths (min max) ...
SHORT_SEGS="${SHORT_SEGS:-2}"       # ... in samples of SHORT_SEGS segments of 128 tokens ...
SHORT_BATCH="${SHORT_BATCH:-16}"    # ... SHORT_BATCH samples a step
MEMORY="${MEMORY:-0.5}"             # fraction of training samples whose needle ends a segment before the question
DISTRACT="${DISTRACT:-0.5}"         # probability a sky/sun filler sentence carries another number (passkey_train.py)
LOCAL="${LOCAL:-0.25}"              # fraction of stage-2 samples whose needle starts in the question's segment
MAXKEY2="${MAXKEY2:-50000}"         # > 0: stage-2 keys uniform in 1..MAXKEY2 (the eval's), not 1..DIGITS2 digits:
                                    # a uniform digit count teaches where a key ends (README, passkey)
BOUNDARY="${BOUNDARY:-0}"           # fraction of stage-2 samples whose " The pass key is <key>" straddles a segment
                                    # boundary (the eval's depth 25% puts the key's first digit on one: README)
MEMBERS="${MEMBERS:-1}"             # stage 2 trained MEMBERS times from the one stage-1 model (member i: records
                                    # drawn with seed i+1, run.seed/data.seed i-1; member 1 is the single stage 2)
COMBINE="${COMBINE:-best}"          # best: keep the member with the most keys found in 2K validation prompts (other
                                    # keys than the eval's: --seed 1); average: their weights averaged (a soup)
VAL_SAMPLES="${VAL_SAMPLES:-20}"    # validation prompts per depth at 2K (COMBINE=best)
EXTRA="${EXTRA:-}"                  # more key=value overrides for both stages
TAU_SCALES="${TAU_SCALES-1 1.5 2}"  # memory temperature factors tried at inference (eval --memory-tau-scale): the
                                    # eval uses the one that finds the most keys in validation prompts (eval passkey
                                    # --seed 1: other keys) at CAL_LENGTHS, ties to the first; empty or "1": none
CAL_LENGTHS="${CAL_LENGTHS:-8k,32k}"
CAL_SAMPLES="${CAL_SAMPLES:-30}"    # validation prompts per (length, depth)
case "$COMBINE" in best|average) ;; *) echo "COMBINE must be best or average, not $COMBINE" >&2; exit 3 ;; esac
LENGTHS="${LENGTHS:-2k,8k,32k,128k}"
DEPTHS="${DEPTHS:-0,25,50,75,100}"
SAMPLES="${SAMPLES:-10}"
NO_MEMORY_LENGTHS="${NO_MEMORY_LENGTHS-2k,8k,32k}"   # the memory arms again with --no-memory (the same model's
                                                     # local attention alone); empty: skip
mkdir -p "$WORK" "$OUT"
cd "$WORK"

# word-level BPE trained on three passkey prompts, every digit its own token (--split-digits): " key" and " sky"
# are different tokens, so "the token after ' pass key is'" is one step of context, not six bytes. Reused only if
# made with the same settings: a stale tokenizer.json (say a byte-level one of an older run) is rebuilt.
tok_params="word-level bpe, split digits, vocab $VOCAB"
if [ ! -f tokenizer.json ] || [ "$(cat tokenizer.params 2>/dev/null)" != "$tok_params" ]; then
  "$PY" -c "from infinitrain.data_tools.passkey import build_prompt as b
for k in (12345, 678, 9001): print(b(k, 3, .5))" > seed.txt
  "$INF" tokenizer train seed.txt --vocab-size "$VOCAB" --split-digits --out tokenizer.json
  echo "$tok_params" > tokenizer.params
fi
TOK_SUM=$(sha256sum tokenizer.json | cut -c1-16)
make_stage() {  # make_stage NAME SEGMENTS MIN_LENGTH MAX_LENGTH COUNT SEED DIGITS LOCAL MAXKEY BOUNDARY: records -> shards
  local name=$1 segs=$2 digits=$7 local_fraction=$8 max_key=$9 boundary=${10}
  # reused only if made with the same settings: a WORK dir from a run with other MEMORY/DISTRACT/... is rebuilt
  local params="${*:1:7} loss=$LOSS memory=$MEMORY distract=$DISTRACT tokenizer=$TOK_SUM"
  [ "$local_fraction" = 0 ] || params="$params local=$local_fraction"  # (0 keeps older runs' shards valid)
  [ "$max_key" = 0 ] || params="$params maxkey=$max_key"
  [ "$boundary" = 0 ] || params="$params boundary=$boundary"
  [ -f "shards-$name/index.json" ] && [ "$(cat "shards-$name/params.txt" 2>/dev/null)" = "$params" ] && return 0
  rm -rf "shards-$name"
  "$PY" "$HERE/passkey_train.py" --out "$name.jsonl" --tokenizer tokenizer.json --min-length "$3" --max-length "$4" \
    --count "$5" --seed "$6" --max-digits "$digits" --loss "$LOSS" \
    --memory-fraction "$MEMORY" --distractors "$DISTRACT" --local-fraction "$local_fraction" --max-key "$max_key" \
    --boundary-fraction "$boundary" --segment-len 128
  "$INF" prepare "$name.jsonl" --tokenizer tokenizer.json --out "shards-$name" --segment-len 128 \
    --sample-segments "$segs" --format summarization --separator "" --val-fraction 0.01 --no-progress
  cp tokenizer.json "shards-$name/"
  echo "$params" > "shards-$name/params.txt"
}
make_stage short "$SHORT_SEGS" ${SHORT% *} ${SHORT#* } 40000 1 "$DIGITS" 0 0 0
make_stage long 16 1024 2048 3000 2 "$DIGITS2" "$LOCAL" "$MAXKEY2" "$BOUNDARY"
for i in $(seq 2 "$MEMBERS"); do  # the other stage-2 members' records
  make_stage "long-$i" 16 1024 2048 3000 $((i + 1)) "$DIGITS2" "$LOCAL" "$MAXKEY2" "$BOUNDARY"
done

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
  rm -rf runs/"$arm"-* "runs/$arm"  # fresh runs (train --resume none refuses a run dir with checkpoints)
  local t0 init="" cycle=0 dir; t0=$(date +%s)
  : > "train-$arm.log"
  for steps in $STEPS1; do
    cycle=$((cycle + 1)); dir="runs/$arm-1.$cycle"
    # shellcheck disable=SC2086
    "$INF" train --recipe "$RECIPE" --data shards-short --run-dir "$dir" --resume none $init $ov $EXTRA \
      data.segments_per_sample="$SHORT_SEGS" data.micro_batch_size="$SHORT_BATCH" schedule.steps="$steps" \
      schedule.warmup=30 checkpoint.save_every=500 optim.lr="$LR" >> "train-$arm.log" 2>&1 ||
      { echo "$arm: stage 1 failed: $WORK/train-$arm.log" >&2; return 1; }
    init="--init-from $dir"
  done
  local t1; t1=$(date +%s)
  local i members=() run data seeds
  for i in $(seq 1 "$MEMBERS"); do  # MEMBERS=1: one stage 2 in runs/$arm; else runs/$arm-2.i, combined below
    run="runs/$arm" data=shards-long seeds=""
    [ "$MEMBERS" = 1 ] || run="runs/$arm-2.$i"
    [ "$i" = 1 ] || { data="shards-long-$i"; seeds="run.seed=$((i - 1)) data.seed=$((i - 1))"; }
    # shellcheck disable=SC2086
    "$INF" train --recipe "$RECIPE" --data "$data" --run-dir "$run" --resume none $init \
      $ov $EXTRA schedule.steps="$STEPS2" schedule.warmup=10 optim.lr="$LR" $seeds >> "train-$arm.log" 2>&1 ||
      { echo "$arm: stage 2 failed: $WORK/train-$arm.log" >&2; return 1; }
    members+=("$run")
  done
  local val="[]" chosen=0
  if [ "$MEMBERS" != 1 ] && [ "$COMBINE" = best ]; then  # 2K prompts only: nothing longer than training is used
    mkdir -p "$OUT/$arm/validation"
    for i in $(seq 1 "$MEMBERS"); do
      "$INF" eval passkey "runs/$arm-2.$i" --tokenizer tokenizer.json --lengths 2k --depths "$DEPTHS" --seed 1 \
        --samples "$VAL_SAMPLES" --batch-size 10 --threads "$THREADS" --out "$WORK/val-$arm-$i" --no-progress \
        >> "train-$arm.log" 2>&1 || { echo "$arm: validation failed: $WORK/train-$arm.log" >&2; return 1; }
      cp "$WORK/val-$arm-$i/passkey.json" "$OUT/$arm/validation/member-$i.json"
    done
    read -r chosen val < <("$PY" -c "import json
acc = [json.load(open(f'$WORK/val-$arm-{i}/passkey.json'))['accuracy'] for i in range(1, $MEMBERS + 1)]
print(acc.index(max(acc)) + 1, json.dumps(acc).replace(' ', ''))")  # ties: the first member
    members=("runs/$arm-2.$chosen")
    echo "$arm: stage-2 members' 2K validation accuracy $val: member $chosen kept"
  fi
  [ "$MEMBERS" = 1 ] || "$INF" export "${members[@]}" --out "runs/$arm" --dtype fp32 --tokenizer tokenizer.json \
    >> "train-$arm.log" 2>&1 || { echo "$arm: export of stage 2 failed: $WORK/train-$arm.log" >&2; return 1; }
  local t2; t2=$(date +%s)
  mkdir -p "$OUT/$arm"
  printf '{"arm": "%s", "stage1_steps": [%s], "stage2_steps": %s, "stage1_seconds": %s, "stage2_seconds": %s, "threads": %s, "loss": "%s", "digits": %s, "digits2": %s, "memory": %s, "distract": %s, "local": %s, "maxkey2": %s, "boundary": %s, "members": %s, "combine": "%s", "val_accuracy": %s, "chosen": %s, "lr": "%s", "extra": "%s"}\n' \
    "$arm" "$(echo $STEPS1 | tr ' ' ',')" "$STEPS2" $((t1 - t0)) $((t2 - t1)) "$THREADS" "$LOSS" "$DIGITS" "$DIGITS2" "$MEMORY" \
    "$DISTRACT" "$LOCAL" "$MAXKEY2" "$BOUNDARY" "$MEMBERS" "$COMBINE" "$val" "$chosen" "$LR" "$EXTRA" > "$OUT/$arm/train.json"
  echo "$arm: trained in $((t2 - t0)) s (stage 1 $((t1 - t0)) s, stage 2 $((t2 - t1)) s)"
}
calibrate_arm() {  # calibrate_arm ARM: the memory temperature factor the eval uses -> stdout (validation JSONs in
  local arm=$1      # OUT/ARM/calibration/); the memory-off arm and TAU_SCALES of one factor use 1 (nothing run)
  local scales; scales=$(echo $TAU_SCALES)
  if [ "$arm" = off ] || [ -z "$scales" ] || [ "$scales" = 1 ]; then echo 1; return 0; fi
  mkdir -p "$OUT/$arm/calibration"
  for f in $scales; do
    "$INF" eval passkey "runs/$arm" --tokenizer tokenizer.json --lengths "$CAL_LENGTHS" --depths "$DEPTHS" --seed 1 \
      --samples "$CAL_SAMPLES" --batch-size 10 --threads "$THREADS" --memory-tau-scale "$f" \
      --out "$WORK/cal-$arm-$f" --no-progress >> "train-$arm.log" 2>&1 ||
      { echo "$arm: calibration at tau x$f failed: $WORK/train-$arm.log" >&2; return 1; }
    cp "$WORK/cal-$arm-$f/passkey.json" "$OUT/$arm/calibration/tau-$f.json"
  done
  "$PY" - "$OUT/$arm/calibration" $scales <<'PY'
import json, sys
folder, scales = sys.argv[1], sys.argv[2:]
cells = {f: json.load(open(f"{folder}/tau-{f}.json"))["cells"] for f in scales}
found = {f: sum(c["correct"] for c in cells[f]) for f in scales}
chosen = max(scales, key=lambda f: (found[f], -scales.index(f)))  # the most keys; ties: the first listed
total = sum(c["total"] for c in cells[chosen])
json.dump({"found": found, "of": total, "chosen": float(chosen), "seed": 1}, open(f"{folder}/summary.json", "w"))
print(chosen)
print(f"keys found in validation prompts by tau factor: " + ", ".join(f"x{f} {n}" for f, n in found.items())
      + f" of {total}: x{chosen} chosen", file=sys.stderr)
PY
}
eval_arm() {
  local tau; tau=$(calibrate_arm "$1" 2> >(sed "s/^/$1: /" >&2)) || return 1
  "$INF" eval passkey "runs/$1" --tokenizer tokenizer.json --lengths "$LENGTHS" --depths "$DEPTHS" \
    --samples "$SAMPLES" --batch-size 10 --threads "$THREADS" --memory-tau-scale "$tau" --out "$OUT/$1" --no-progress
  [ "$1" = off ] || [ -z "$NO_MEMORY_LENGTHS" ] ||
    "$INF" eval passkey "runs/$1" --tokenizer tokenizer.json --lengths "$NO_MEMORY_LENGTHS" --depths "$DEPTHS" \
      --samples "$SAMPLES" --batch-size 10 --threads "$THREADS" --memory-tau-scale "$tau" --out "$OUT/$1-no-memory" \
      --no-memory --no-progress
}

running=0
for arm in $ARMS; do
  ( train_arm "$arm" && eval_arm "$arm" ) &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
"$PY" "$HERE/passkey_summary.py" "$OUT" --arms $ARMS
