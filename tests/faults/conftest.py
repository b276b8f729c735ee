"""Failure-injection suite (issue 8): the uninterrupted reference runs every faulted run must
reproduce bit for bit. Helpers live in tests/trainkit.py (shared with tests/test_train.py).

Issue 8 item -> file: 1, 2, 6 test_faults_kills (and the 2-rank mid-save kill in test_faults_ranks); 3, 5
test_faults_checkpoints; 4, 7, 8, 9 test_faults_ranks; 10, 11 test_faults_hostile; 12 test_faults_exit_codes.
Faults are injected with INFINITRAIN_FAULT and observed with INFINITRAIN_TRACE (infinitrain/faults.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: trainkit

import trainkit  # noqa: E402
from trainkit import rows, trace, train  # noqa: E402


def traced_train(run_dir: Path, trace_dir: Path, overrides: list[str]) -> None:
    """An in-process run with INFINITRAIN_TRACE on (restored afterwards)."""
    old = os.environ.get("INFINITRAIN_TRACE")
    os.environ["INFINITRAIN_TRACE"] = str(trace_dir)
    try:
        train(run_dir, overrides, resume="none")
    finally:
        if old is None:
            os.environ.pop("INFINITRAIN_TRACE")
        else:
            os.environ["INFINITRAIN_TRACE"] = old


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[dict[int, dict], dict[int, list[int]]]:
    """The uninterrupted one-rank 6-step run: (metrics rows per step, sample ids per step)."""
    d = tmp_path_factory.mktemp("reference")
    traced_train(d / "run", d / "trace", [])
    return rows(d / "run"), {r["step"]: r["ids"] for r in trace(d / "trace")}


@pytest.fixture(scope="session", autouse=True)
def zygote(tmp_path_factory):
    """Single-rank CLI runs fork from one pre-imported process (INFINITRAIN_TEST_ZYGOTE=0: plain subprocesses)."""
    if os.environ.get("INFINITRAIN_TEST_ZYGOTE") == "0":
        yield None
        return
    z = trainkit.Zygote(tmp_path_factory.mktemp("zygote"))
    trainkit.ZYGOTE.append(z)
    yield z
    trainkit.ZYGOTE.clear()
    z.close()
