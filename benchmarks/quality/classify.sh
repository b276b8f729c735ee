#!/usr/bin/env bash
# classify.sh: can the compressive memory carry a document's class from its first segment to its last token?
# `infinitrain data topics` puts the deciding keyword in the first words, then neutral King James filler that
# never names a topic; the `tiny-classify` recipe trains the class head at the last token of 4 x 64-token
# documents; `eval classify` on held-out documents with the memory on, then with --no-memory (same model).
#   bash benchmarks/quality/classify.sh                           # ~2-5 min on 2 busy cores
#   SEGMENTS=16 WORDS=900 STEPS=400 bash benchmarks/quality/classify.sh   # long documents: 16 segments of 64
# Writes benchmarks/quality/results/classify[-SEGMENTSseg]/{classify.json,classify-no-memory.json,summary.json}.
set -euo pipefail
source "$(dirname "$0")/env.sh"
SEGMENTS="${SEGMENTS:-4}"           # segments of 64 tokens per document (the read position is in the last one)
WORDS="${WORDS:-200}"               # words per generated document (prepare keeps its first SEGMENTS x 64 tokens)
STEPS="${STEPS:-300}"
COUNT="${COUNT:-1200}"
EXTRA="${EXTRA:-}"                  # more key=value overrides of the tiny-classify recipe
TAG=$([ "$SEGMENTS" = 4 ] && echo classify || echo "classify-${SEGMENTS}seg")
WORK="${WORK:-/tmp/infinitrain-quality/$TAG}"
OUT="${OUT:-$HERE/results/$TAG}"
mkdir -p "$WORK" "$OUT"
cd "$WORK"

"$INF" data topics --out topics.jsonl --count "$COUNT" --words "$WORDS" --evidence-words 12 --filler kjv --seed 0
[ -f tok.json ] || "$INF" tokenizer train topics.jsonl --vocab-size 512 --out tok.json
"$INF" prepare topics.jsonl --format classification --tokenizer tok.json --out data --segment-len 64 \
  --sample-segments "$SEGMENTS" --val-fraction 0.2 --seed 0 --no-progress

rm -rf run                          # a fresh run each time (--resume none refuses an old one)
start=$(date +%s)
# shellcheck disable=SC2086
"$INF" train --recipe tiny-classify --data data --run-dir run --resume none data.segments_per_sample="$SEGMENTS" \
  schedule.steps="$STEPS" log.progress=false $EXTRA
train_s=$(( $(date +%s) - start ))

"$INF" eval classify run --data data --out "$OUT" --threads 1 --no-progress
"$INF" eval classify run --data data --out "$OUT" --threads 1 --no-progress --no-memory
"$PY" - "$OUT" "$train_s" "$STEPS" "$SEGMENTS" <<'EOF'
import json, sys
from pathlib import Path
out, train_s, steps, segments = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
on, off = (json.loads((out / n).read_text()) for n in ("classify.json", "classify-no-memory.json"))
row = {"steps": steps, "segments": segments, "train_seconds": train_s, "documents": on["documents"],
       "read_segment": on["read_segment"], "uniform_chance": on["uniform_chance"],
       "majority_baseline": on["majority_baseline"],
       "memory_on": {"accuracy": on["accuracy"], "macro_f1": on["macro_f1"]},
       "memory_off": {"accuracy": off["accuracy"], "macro_f1": off["macro_f1"]}}
(out / "summary.json").write_text(json.dumps(row, indent=1) + "\n")
print(f"{on['documents']} held-out documents of {segments} segments, read in segment {on['read_segment']['min']}.."
      f"{on['read_segment']['max']}; {steps} steps in {train_s} s")
print(f"{'':12s} {'accuracy':>9s} {'macro-F1':>9s}")
print(f"{'memory on':12s} {on['accuracy']:9.4f} {on['macro_f1']:9.4f}")
print(f"{'memory off':12s} {off['accuracy']:9.4f} {off['macro_f1']:9.4f}")
print(f"{'chance':12s} {on['uniform_chance']:9.4f}   (majority class {on['majority_baseline']:.4f})")
EOF
