#!/usr/bin/env bash
# the passkey.sh calibration (TAU_SCALES="1 1.5 2", CAL_LENGTHS=8k,32k, CAL_SAMPLES=30, --seed 1) on the best-of run's
# three stage-2 members (/tmp/pk-best), then the eval's prompts at the chosen factor
set -euo pipefail
INF=/work/main/.venv/bin/infinitrain
cd /tmp/pk-best
for m in 1 2 3; do
  for f in 1 1.5 2; do
    $INF eval passkey runs/delta-2.$m --tokenizer tokenizer.json --lengths 8k,32k --seed 1 --samples 30 --batch-size 10 \
      --threads ${T:-1} --memory-tau-scale $f --out /tmp/pk-cal/member$m/tau-$f --no-progress > /dev/null 2>&1
  done
  chosen=$(python3 - /tmp/pk-cal/member$m <<'PY'
import json, sys
d = sys.argv[1]
found = {f: sum(c["correct"] for c in json.load(open(f"{d}/tau-{f}/passkey.json"))["cells"]) for f in ["1", "1.5", "2"]}
ch = max(found, key=lambda f: (found[f], -["1", "1.5", "2"].index(f)))
json.dump({"found": found, "of": 300, "chosen": float(ch), "seed": 1}, open(f"{d}/summary.json", "w"))
print(ch)
PY
)
  echo "member $m: $(cat /tmp/pk-cal/member$m/summary.json)"
  $INF eval passkey runs/delta-2.$m --tokenizer tokenizer.json --lengths 2k,8k,32k,128k --samples 10 --batch-size 10 \
    --threads ${T:-1} --memory-tau-scale $chosen --out /tmp/pk-cal/member$m/test --no-progress 2>/dev/null | head -7
done
