"""The fault-injection point of the trainer (for the failure tests in tests/faults/): ``INFINITRAIN_FAULT=<kind>:...``
and ``INFINITRAIN_TRACE``. The loop and the checkpoint saves call its hooks at named points; with both variables
unset (every real run) a hook costs a dictionary lookup or two and does nothing.

    nan:<steps>:<rank>          this rank's loss is NaN at those step attempts (1-based, skipped ones
                                included; joined by '+')
    sigterm:<step>:<rank>       this rank sends itself SIGTERM after that step (sigint: SIGINT)
    kill:<site>:<steps>:<rank>  SIGKILL at a named point of those steps: step_start, mid_step (after each
                                backward), after_step (after the optimizer), and the save sites before_shards,
                                after_shards, before_commit, after_commit
    stop:<site>:<steps>:<rank>  SIGSTOP there instead: a hung peer, alive but silent
    chaos:<n>:<rank>            SIGKILL at the n-th point this process reaches, whatever its site (a seeded
                                random n kills "at a random time" reproducibly)

``INFINITRAIN_TRACE=DIR``: every rank appends one JSON line per step attempt to ``DIR/rank<r>.jsonl``
(pid, step, sample ids, skipped, a sha256 of this rank's parameter partition, points reached so far).
Both are read from the environment only (a test sets them around an in-process run).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SITES = ("step_start", "mid_step", "after_step", "before_shards", "after_shards", "before_commit", "after_commit")
_points = 0  # points reached by this process


def _spec(kind: str) -> list[str] | None:
    spec = os.environ.get("INFINITRAIN_FAULT", "")
    return spec.split(":")[1:] if spec.startswith(kind + ":") else None


def matches(kind: str, step: int, site: str | None = None) -> bool:
    parts = _spec(kind)
    if parts is None:
        return False
    if site is not None:
        if parts[0] != site:
            return False
        parts = parts[1:]
    steps, rank = parts
    return str(step) in steps.split("+") and int(rank) == dist.get_rank()


def point(site: str, step: int) -> None:
    """A named point of the loop or of a save: SIGKILL (SIGSTOP) here if ``kill`` or ``chaos`` (``stop``) says so."""
    global _points
    assert site in SITES, site
    _points += 1
    if not os.environ.get("INFINITRAIN_FAULT"):
        return
    chaos = _spec("chaos")
    if matches("kill", step, site) or (chaos and int(chaos[0]) == _points and int(chaos[1]) == dist.get_rank()):
        os.kill(os.getpid(), signal.SIGKILL)
    if matches("stop", step, site):
        os.kill(os.getpid(), signal.SIGSTOP)


def signal_after(step: int) -> None:
    for kind, signum in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        if matches(kind, step):
            os.kill(os.getpid(), signum)


def tracing() -> bool:
    return bool(os.environ.get("INFINITRAIN_TRACE"))


def params_digest(module) -> str:
    """sha256 of this rank's share of the parameters (ZeRO-3: its partitions; otherwise the whole tensors)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = getattr(p, "ds_tensor", p).detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trace(record: dict[str, Any], module=None) -> None:
    """Append one attempt's record to ``$INFINITRAIN_TRACE/rank<r>.jsonl`` (no-op unless tracing)."""
    if not tracing():
        return
    d = Path(os.environ["INFINITRAIN_TRACE"])
    d.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    row = {"pid": os.getpid(), "rank": rank, "time": time.time(), "points": _points, **record}
    if module is not None:
        row["params_sha256"] = params_digest(module)
    with open(d / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
