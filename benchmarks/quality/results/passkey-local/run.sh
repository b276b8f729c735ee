set -euo pipefail
export OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python; INF=/work/main/.venv/bin/infinitrain; HERE=/work/main/benchmarks/quality
$PY $HERE/passkey_train.py --out long.jsonl --tokenizer tokenizer.json --min-length 1024 --max-length 2048 --count 3000 --seed 2 --max-digits 5 --loss after --memory-fraction 0.5 --distractors 0.5 --local-fraction 0.25 --segment-len 128
$INF prepare long.jsonl --tokenizer tokenizer.json --out shards-long --segment-len 128 --sample-segments 16 --format summarization --separator "" --val-fraction 0.01 --no-progress
cp tokenizer.json shards-long/
rm -rf runs/linear
$INF train --recipe /work/main/infinitrain/recipes/tiny-passkey.yaml --data shards-long --run-dir runs/linear --resume none --init-from ../passkey-d20-5/runs/linear-1.2 model.update=linear schedule.steps=500 schedule.warmup=10 optim.lr=3e-3
$INF eval passkey runs/linear --tokenizer tokenizer.json --lengths 2k,8k,32k --depths 0,25,50,75,100 --samples 10 --batch-size 10 --threads 1 --out out/linear --no-progress
