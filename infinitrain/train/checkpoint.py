"""Atomic training checkpoints: committed directories with a sha256 manifest; never DeepSpeed's ``latest``.

Layout of ``run_dir/checkpoints/step-00001000/``::

    ds/                      DeepSpeed's own files (zero_pp_rank_*_model_states.pt, *_optim_states.pt)
    trainer_state.json       TrainState (step, tokens, data sampler state, skip counters), world size
    rng_rank00000.pt ...     each rank's RNG state (python, numpy, torch, cuda)
    done.rank00000 ...       each rank's "my files are written" marker
    manifest.json            {"version", "step", "world_size", "files": {relpath: {"bytes", "sha256"}}}

Commit protocol (RELIABILITY.md §6.2): everything is written under ``step-N.tmp/``; every rank writes its
done marker; barrier; rank 0 hashes and fsyncs every file, writes ``manifest.json`` (tmp + fsync + replace),
renames the directory to ``step-N`` and fsyncs the parent. A ``.tmp`` directory is never loaded (the next
start removes it). A corrupt ``step-N`` (bad hash, missing file, garbage or missing manifest) is an error
naming the file, unless ``--allow-fallback`` lets the resume take the previous one. Files are unpickled
weights-only (``export.weights_only_loads``): a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import resource
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from infinitrain import faults
from infinitrain.errors import CheckpointError

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
    """Write and commit ``root/step-N`` (collective: every rank calls it). Returns the committed path.
    A write that fails on any rank (disk full, EFBIG under ``ulimit -f``) removes the partial directory and
    raises CheckpointError on every rank; the previous checkpoint is untouched."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    faults.point("before_shards", step)
    error = None
    try:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state={}, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            _write_atomic(tmp / "trainer_state.json", json.dumps({**trainer_state, "world_size": world}, indent=1))
        faults.point("after_shards", step)
        (tmp / f"done.rank{rank:05d}").write_text("done\n")
    except (OSError, RuntimeError) as err:  # torch.save's zip writer turns a failed write into a RuntimeError
        error = _write_error(err, tmp)
    _raise_if_any(error, tmp)
    if rank == 0:
        try:
            _commit(tmp, final, step, world)
        except CheckpointError as err:  # raised on every rank below, not here: the others wait in a collective
            error = str(err)
        except OSError as err:
            error = _write_error(err, tmp)
    _raise_if_any(error, tmp)
    if rank == 0:
        faults.point("after_commit", step)
        prune(root, keep_last)
    dist.barrier()
    return final


def _write_error(err: Exception, tmp: Path) -> str:
    """One line: the file being written, the cause, and the free space and file-size limit that explain most
    failed saves. When the error does not name the file (torch.save's zip writer), it is the ``.pt`` file in
    ``tmp`` that is not a complete zip archive (every finished torch.save is one), else the newest file: two
    files written within one mtime tick tie, so the newest alone named the wrong one now and then."""
    name = getattr(err, "filename", None)
    if name is None:
        files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
        partial = [p for p in files if p.suffix == ".pt" and not zipfile.is_zipfile(p)]
        name = max(partial or files, key=lambda p: p.stat().st_mtime_ns) if files else tmp
    cause = getattr(err, "strerror", None) or str(err).strip().splitlines()[0][:200]
    free = shutil.disk_usage(tmp.parent).free / 2**20
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit_text = "" if limit == resource.RLIM_INFINITY else f", file-size limit (ulimit -f) {limit / 2**20:.1f} MB"
    return f"{name}: write failed ({cause}; {free:.0f} MB free{limit_text})"


def _raise_if_any(error: str | None, tmp: Path) -> None:
    """Collective: if any rank failed to write, drop the partial directory and raise on every rank."""
    first = agree(error)
    if first:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{first}; checkpoint {tmp.name} not committed, the previous one is intact")


def _commit(tmp: Path, final: Path, step: int, world: int) -> None:
    """Rank 0: check every rank's done marker, hash and fsync, write the manifest, rename, fsync the parent."""
    missing = [r for r in range(world) if not (tmp / f"done.rank{r:05d}").is_file()]
    if missing:
        raise CheckpointError(f"{tmp}: ranks {missing} wrote no done marker")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"version": 1, "step": step, "world_size": world,
                "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
                          for p in files}}
    for d in {p.parent for p in files} | {tmp}:
        _fsync_dir(d)
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
    faults.point("before_commit", step)
    if final.exists():  # a run resumed from an older checkpoint reaches this step again
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


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
        ok = (isinstance(m, dict) and isinstance(m.get("files"), dict) and isinstance(m.get("world_size"), int)
              and isinstance(m.get("step"), int))
        ok = ok and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                        and not Path(k).is_absolute() and ".." not in Path(k).parts for k, v in m["files"].items())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err.__class__.__name__}: {err})") from None
    if not ok:
        raise CheckpointError(f"{path}: not a checkpoint manifest (expected step, world_size and files: "
                              "{relative path: {bytes, sha256}})")
    return m


def agree(error: str | None) -> str | None:
    """Collective: the first rank's error, on every rank."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


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
            error = f"{path}: missing (sha256 expected {meta['sha256']}, listed in {ckpt / MANIFEST})"
            break
        digest, size = _sha256(path), path.stat().st_size
        if digest != meta["sha256"] or size != meta["bytes"]:
            error = f"{path}: corrupt (sha256 expected {meta['sha256']}, got {digest}; {size} of {meta['bytes']} bytes)"
            break
    first = agree(error)
    if first:
        raise CheckpointError(first)


def check(ckpt: Path) -> dict[str, Any]:
    """Collective: the manifest, the world size and every file's sha256; returns the manifest."""
    world = dist.get_world_size()
    manifest = read_manifest(ckpt)
    if manifest["world_size"] != world:
        raise CheckpointError(f"{ckpt}: saved by {manifest['world_size']} ranks, this run has {world}; resume it "
                              f"with {manifest['world_size']} ranks (changing the world size is not supported)")
    verify(ckpt, manifest)
    return manifest


def choose(run_dir: Path, resume: str, allow_fallback: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, checked (collective), and the errors of newer ones skipped on the way.

    ``none``: nothing. A path: that checkpoint. ``auto``: the newest ``step-N`` of the run (a ``step-N`` without a
    manifest is damaged, not partial: partial saves are ``.tmp``); with ``allow_fallback`` a damaged one is
    skipped for the next older. Never None when a damaged checkpoint exists: no silent start from scratch."""
    if resume == "none":
        return None, []
    if resume == "auto":
        root = run_dir / "checkpoints"
        found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []
        candidates = sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)
        if not candidates:
            return None, []
    else:
        candidates = [Path(resume)]
        if not candidates[0].is_dir():
            raise CheckpointError(f"{candidates[0]}: no such checkpoint directory")
    skipped = []
    for c in candidates:
        try:
            check(c)
            return c, skipped
        except CheckpointError as err:
            if not allow_fallback:
                raise
            skipped.append(str(err))
    raise CheckpointError(f"no valid checkpoint in {run_dir / 'checkpoints'}; newest: {skipped[0]}")


def load(engine, ckpt: Path) -> dict[str, Any]:
    """Load a checkpoint that ``choose`` checked into the engine (weights-only unpickling) and restore this
    rank's RNG. Returns the trainer state saved with it."""
    from infinitrain.export import weights_only_loads

    rank = dist.get_rank()
    try:
        with weights_only_loads():
            path, _ = engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            set_rng_state(torch.load(ckpt / f"rng_rank{rank:05d}.pt"))
    except pickle.UnpicklingError as err:  # a class or callable outside the allow-list: refused, never run
        raise CheckpointError(f"{ckpt}: refused to unpickle a file holding code or an unknown class "
                              f"({str(err).strip().splitlines()[-1][:300]})") from None
    if path is None:
        raise CheckpointError(f"{ckpt / TAG}: DeepSpeed could not load this checkpoint")
    state_file = ckpt / "trainer_state.json"
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_file}: unreadable ({err})") from None
