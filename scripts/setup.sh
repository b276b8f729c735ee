#!/usr/bin/env bash
# Sets up .venv with the CPU build of torch and infinitrain with its test and plots (matplotlib: heatmaps) extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test,plots]'
echo "infinitrain installed in $(pwd)/.venv"
