#!/usr/bin/env bash
# stage 2 only from the delta rerun's stage-1 model, with BOUNDARY of the needles straddling a segment boundary
set -euo pipefail
R=/work/main; PY=$R/.venv/bin/python; INF=$R/.venv/bin/infinitrain
SFX=${SFX:-}; B=${B:-0.25}; STEPS2=${STEPS2:-500}; NAME=${NAME:-b$B$SFX-s$STEPS2-lr${LR:-3e-3}}; export OMP_NUM_THREADS=${T:-1}
if [ ! -f shards-$B$SFX/index.json ]; then
$PY ${PT:-$R/benchmarks/quality/passkey_train.py} --out long-$B$SFX.jsonl --tokenizer tokenizer.json --min-length 1024 --max-length 2048 \
  --count 3000 --seed 2 --max-digits 5 --loss after --memory-fraction 0.5 --distractors 0.5 --local-fraction 0.25 \
  --max-key 50000 --boundary-fraction $B --segment-len 128
$INF prepare long-$B$SFX.jsonl --tokenizer tokenizer.json --out shards-$B$SFX --segment-len 128 --sample-segments 16 \
  --format summarization --separator "" --val-fraction 0.01 --no-progress
cp tokenizer.json shards-$B$SFX/
fi
t0=$(date +%s)
$INF train --recipe $R/infinitrain/recipes/tiny-passkey.yaml --data shards-$B$SFX --run-dir runs/$NAME --resume none \
  --init-from /tmp/infinitrain-quality/passkey-rep/runs/delta-1.2 model.update=delta schedule.steps=$STEPS2 \
  schedule.warmup=10 optim.lr=${LR:-3e-3} > train-$NAME.log 2>&1
echo "stage 2: $(( $(date +%s) - t0 )) s"
