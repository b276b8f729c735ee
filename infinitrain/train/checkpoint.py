"""Atomic training checkpoints: committed directories with a sha256 manifest; never DeepSpeed's ``latest``.

Layout of ``run_dir/checkpoints/step-00001000/``::

    ds/                      DeepSpeed's own files (zero_pp_rank_*_model_states.pt, *_optim_states.pt)
    trainer_state.json       TrainState (step, tokens, data sampler state, skip counters), world size
    rng_rank00000.pt ...     each rank's RNG state (python, numpy, torch, cuda)
    done.rank00000 ...       each rank's "my files are written" marker
    manifest.json            {"version", "step", "world_size", "files": {relpath: {"bytes", "sha256"}}}

Commit protocol (RELIABILITY.md §6.2): everything is written under ``step-N.tmp/``; every rank writes its
done marker; barrier; rank 0 hashes and fsyncs every file, writes ``manifest.json`` (tmp + fsync + replace),
renames the directory to ``step-N`` and fsyncs the parent. A directory without a manifest, or with a
``.tmp`` suffix, is never loaded. A corrupt committed checkpoint is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from infinitrain.errors import CheckpointError
from infinitrain.train import faults

MANIFEST = "manifest.json"
TAG = "ds"  # DeepSpeed's tag directory inside a checkpoint
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), *st[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write and commit ``root/step-N`` (collective: every rank calls it). Returns the committed path."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    faults.kill_at("before_shards", step)
    engine.save_checkpoint(str(tmp), tag=TAG, client_state={}, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        _write_atomic(tmp / "trainer_state.json", json.dumps({**trainer_state, "world_size": world}, indent=1))
    faults.kill_at("after_shards", step)
    (tmp / f"done.rank{rank:05d}").write_text("done\n")
    dist.barrier()
    if rank == 0:
        missing = [r for r in range(world) if not (tmp / f"done.rank{r:05d}").is_file()]
        if missing:
            raise CheckpointError(f"{tmp}: ranks {missing} did not finish writing; checkpoint not committed")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"version": 1, "step": step, "world_size": world,
                    "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
                              for p in files}}
        for d in {p.parent for p in files} | {tmp}:
            _fsync_dir(d)
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        faults.kill_at("before_commit", step)
        if final.exists():  # a run resumed from an older checkpoint reaches this step again
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        faults.kill_at("after_commit", step)
        prune(root, keep_last)
    dist.barrier()
    return final


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first (named step-N with a manifest)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def clean_partial(root: Path) -> list[Path]:
    """Remove ``*.tmp`` directories left by a save that was killed (rank 0, at start)."""
    gone = [p for p in root.glob("step-*.tmp") if p.is_dir()] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in committed(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {ckpt} is not a committed checkpoint")
    try:
        m = json.loads(path.read_text())
        m["files"], m["world_size"], m["step"]  # noqa: B018 (shape check)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err.__class__.__name__}: {err})") from None
    return m


def verify(ckpt: Path, manifest: dict[str, Any]) -> None:
    """Every rank checks its share of the files against the manifest; any failure is raised on every rank,
    naming the file and the expected and actual hash."""
    rank, world = dist.get_rank(), dist.get_world_size()
    error = None
    for i, (rel, meta) in enumerate(sorted(manifest["files"].items())):
        if i % world != rank:
            continue
        path = ckpt / rel
        if not path.is_file():
            error = f"{path}: missing (listed in {ckpt / MANIFEST})"
            break
        digest = _sha256(path)
        if digest != meta["sha256"] or path.stat().st_size != meta["bytes"]:
            error = f"{path}: corrupt (sha256 expected {meta['sha256']}, got {digest})"
            break
    errors: list[str | None] = [None] * world
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def load(engine, ckpt: Path) -> dict[str, Any]:
    """Verify and load a committed checkpoint into the engine; restores this rank's RNG. Returns the
    trainer state saved with it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = read_manifest(ckpt)
    if manifest["world_size"] != world:
        raise CheckpointError(f"{ckpt}: saved by {manifest['world_size']} ranks, this run has {world}; "
                              "convert it with python -m deepspeed.checkpoint.ds_to_universal first")
    verify(ckpt, manifest)
    path, _ = engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"{ckpt / TAG}: DeepSpeed could not load this checkpoint")
    set_rng_state(torch.load(ckpt / f"rng_rank{rank:05d}.pt", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """``auto``: the newest committed checkpoint of the run, or None; ``none``: None; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = committed(run_dir / "checkpoints")
        return found[-1] if found else None
    p = Path(resume)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    read_manifest(p)
    return p
