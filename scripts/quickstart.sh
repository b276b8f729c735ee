#!/usr/bin/env bash
# The main job end to end on data it generates itself: set-up, then the tiny-passkey recipe on this CPU:
# passkey samples -> prepare -> train (a few minutes) -> passkey eval beyond the trained length -> generate.
#   bash scripts/quickstart.sh                  # everything, outputs under runs/quickstart
#   STEPS=600 OUT=/tmp/qs bash scripts/quickstart.sh   # longer training, elsewhere
# benchmarks/quality/passkey.sh is the full experiment (three arms, up to 128K tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
OUT="${OUT:-runs/quickstart}"
STEPS="${STEPS:-300}"            # optimizer steps of 8 samples of 2K tokens
COUNT="${COUNT:-60}"             # passkey samples per (length, depth): 3 x 11 x 60 = 1980
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$OUT"
say() { printf '\n== %s\n' "$*"; }

say "1/6 a tokenizer: the passkey text's words, every digit its own token"
python -c "from infinitrain.data_tools.passkey import build_prompt as b
for k in (12345, 678, 9001): print(b(k, 3, .5))" > seed.txt
infinitrain tokenizer train seed.txt --vocab-size 400 --split-digits --out tokenizer.json

say "2/6 passkey samples of 1K-2K tokens, needle at every depth (the paper's template)"
for L in 1024 1536 2048; do
  infinitrain data passkey --tokenizer tokenizer.json --length "$L" --depths 0,10,20,30,40,50,60,70,80,90,100 \
    --count "$COUNT" --seed "$L" --out "passkey-$L.jsonl"
done

say "3/6 prepare: QA samples (loss on the answer), segments of 128, 16 per sample"
infinitrain prepare passkey-*.jsonl --format qa --question-separator "" --answer-separator "" \
  --tokenizer tokenizer.json --out data --segment-len 128 --sample-segments 16 --val-fraction 0.05 --no-progress

say "4/6 train tiny-passkey for $STEPS steps (ZeRO-3 on the CPU; Ctrl-C saves, re-running resumes)"
infinitrain train --recipe tiny-passkey --data data --run-dir run schedule.steps="$STEPS" \
  schedule.warmup=$((STEPS / 10)) checkpoint.save_every=100 log.progress=true

say "5/6 passkey accuracy at 2K (trained) and 8K (4x longer), memory on and off"
infinitrain eval passkey run --lengths 2k,8k --depths 0,50,100 --samples 4 --out evals/passkey --no-progress
infinitrain eval passkey run --lengths 2k,8k --depths 0,50,100 --samples 4 --out evals/passkey-no-memory \
  --no-memory --no-progress

say "6/6 generate: the model answers a 4K-token passkey prompt"
python - > prompt.txt <<'EOF'
from infinitrain.data_tools.passkey import build_prompt
print(build_prompt(31415, 45, 0.25), end="")
EOF
infinitrain generate run --prompt-file prompt.txt --max-new-tokens 8 --temperature 0 --no-stream

cat <<EOF

Outputs:
  data (shards, tokenizer)      $OUT/data
  run (checkpoints, metrics)    $OUT/run        metrics: $OUT/run/metrics.jsonl
  passkey tables and heatmaps   $OUT/evals/passkey/  $OUT/evals/passkey-no-memory/
Next: infinitrain export $OUT/run --out $OUT/model, then infinitrain generate $OUT/model --prompt "..."
EOF
