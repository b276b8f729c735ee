#!/usr/bin/env bash
# One command on a GPU: parity tests on CUDA (fp32 TF32 off, bf16), a 1b-shaped model trained a few steps through
# the real trainer (tokens/s, MFU, peak memory vs `infinitrain plan`), decode latency at 1K and 64K, generate --seed.
# Under 10 minutes on one 80 GB GPU; prints one short table. Without CUDA: the CPU half, one line, exit 0.
#   scripts/gpu_check.sh [--steps 8] [--micro-batch 2] [--work DIR]      (see infinitrain/check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m infinitrain.check "$@"
