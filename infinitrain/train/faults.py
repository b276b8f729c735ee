"""Test-only failure injection (RELIABILITY.md §6): ``INFINITRAIN_FAULT=<kind>:[<site>:]<steps>:<rank>``.

    nan:<steps>:<rank>          this rank's loss is NaN at those step attempts (1-based, skipped ones
                                included; joined by '+')
    sigterm:<step>:<rank>       this rank sends itself SIGTERM after that step
    kill:<site>:<step>:<rank>   SIGKILL at a checkpoint save site: before_shards, after_shards,
                                before_commit, after_commit
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def matches(kind: str, step: int, site: str | None = None) -> bool:
    spec = os.environ.get("INFINITRAIN_FAULT", "")
    if not spec.startswith(kind + ":"):
        return False
    parts = spec.split(":")[1:]
    if site is not None:
        if parts[0] != site:
            return False
        parts = parts[1:]
    steps, rank = parts
    return str(step) in steps.split("+") and int(rank) == dist.get_rank()


def kill_at(site: str, step: int) -> None:
    if matches("kill", step, site):
        os.kill(os.getpid(), signal.SIGKILL)


def sigterm_after(step: int) -> None:
    if matches("sigterm", step):
        os.kill(os.getpid(), signal.SIGTERM)
