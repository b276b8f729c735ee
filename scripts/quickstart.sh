#!/usr/bin/env bash
# The first five minutes: set-up, then train a small Infini-attention model on this CPU and watch its memory work.
# Each document names its topic in its first 64-token segment, then runs on in King James filler that never names
# a topic; the class is read at its last token, three segments later, out of reach of local attention. Held-out
# accuracy with the memory on, then the same model with --no-memory, tells how much the memory carried.
#   bash scripts/quickstart.sh                          # everything, outputs under runs/quickstart
#   OUT=/tmp/qs SKIP_SETUP=1 bash scripts/quickstart.sh  # elsewhere, without re-running scripts/setup.sh
# The longer demo, passkey retrieval at 64x the trained length: bash benchmarks/quality/passkey.sh (docs/passkey.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
OUT="${OUT:-runs/quickstart}"
STEPS="${STEPS:-300}"      # optimizer steps of 16 documents
COUNT="${COUNT:-1200}"     # documents; a fifth held out
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$OUT"
say() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

say "1/6 data: $COUNT documents of 200 words on 4 topics; the topic word comes in the first 12 words"
infinitrain data topics --out topics.jsonl --count "$COUNT" --words 200 --evidence-words 12 --filler kjv --seed 0
head -c 300 topics.jsonl; echo " ..."

say "2/6 a tokenizer of 512 tokens trained on them"
infinitrain tokenizer train topics.jsonl --vocab-size 512 --out tokenizer.json

say "3/6 prepare: the first 4 segments of 64 tokens of each document, 20% held out"
infinitrain prepare topics.jsonl --format classification --tokenizer tokenizer.json --out "$OUT/data" \
  --segment-len 64 --sample-segments 4 --val-fraction 0.2 --seed 0

say "4/6 train the tiny-classify recipe for $STEPS steps (0.13 M parameters, DeepSpeed ZeRO-3 on the CPU)"
rm -rf "$OUT/run"               # a fresh run each time
infinitrain train --recipe tiny-classify --data "$OUT/data" --run-dir "$OUT/run" --resume none \
  schedule.steps="$STEPS"
trained=$(date +%s)

say "5/6 held-out accuracy: the memory on, then the same model with --no-memory"
infinitrain eval classify "$OUT/run" --data "$OUT/data" --out "$OUT/evals"
infinitrain eval classify "$OUT/run" --data "$OUT/data" --out "$OUT/evals" --no-memory
python - "$OUT/evals" <<'EOF'
import json, sys
on, off = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("classify", "classify-no-memory"))
print(f"\n{on['documents']} held-out documents, topic word in segment 0, class read in segment {on['read_segment']['min']}:")
print(f"  memory on   accuracy {on['accuracy']:.3f}")
print(f"  memory off  accuracy {off['accuracy']:.3f}   (the same model; chance {on['uniform_chance']:.2f})")
EOF

say "6/6 the model answers: what is this new note about?"
python - > note.txt <<'EOF'
from infinitrain.data_tools.topics import topic_records
print(topic_records(count=1, words=200, evidence_words=12, seed=2026)[0]["text"], end="")
EOF
printf '%s ...\n(%s words)\n' "$(head -c 160 note.txt)" "$(wc -w < note.txt)"
for flag in "" --no-memory; do   # the answer on stdout, every class's probability on stderr's last line
  answer=$(infinitrain generate "$OUT/run" --prompt-file note.txt $flag 2> answer.log)
  printf 'memory %-4s %-8s (%s)\n' "$([ -z "$flag" ] && echo on: || echo off:)" "$answer" "$(tail -1 answer.log)"
done

end=$(date +%s)
cat <<EOF

Done in $((end - start)) s ($((trained - start)) s to here from the data through training; load: $(cut -d' ' -f1-3 /proc/loadavg)).
  data (shards, tokenizer)           $OUT/data
  run (checkpoint, metrics.jsonl)    $OUT/run
  plots (confusion heatmaps)         $OUT/evals/classify.png  $OUT/evals/classify-no-memory.png
Next: infinitrain export $OUT/run --out $OUT/model
      infinitrain generate $OUT/model --prompt "This note is about jazz. And it came to pass ..."
EOF
