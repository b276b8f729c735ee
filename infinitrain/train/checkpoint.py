"""Atomic training checkpoints: committed directories with a sha256 manifest; never DeepSpeed's ``latest``.

Layout of ``run_dir/checkpoints/step-00001000/``::

    ds/                      DeepSpeed's own files (zero_pp_rank_*_model_states.pt, *_optim_states.pt)
    trainer_state.json       TrainState (step, tokens, data sampler state, skip counters), world size (rank 0)
    rng_rank00000.pt ...     each rank's RNG state (python, numpy, torch, this rank's CUDA device)
    done.rank00000 ...       each rank's "my files are written" marker
    manifest.json            {"version", "step", "world_size", "files": {relpath: {"bytes", "sha256"}}}

A file belongs to the rank its name carries (``rank00003``, ``zero_pp_rank_3_``), every other file to rank 0.
Commit protocol: everything is written under ``step-N.tmp/``; each rank writes its files
and done marker, then hashes and fsyncs its own files (in parallel over ranks, and over files within a rank);
the digests are gathered with a collective; every disk's leader writes the same ``manifest.json`` (tmp + fsync
+ replace) and renames the directory to ``step-N`` (rank 0 last: its rename is the commit), fsyncing the parent.

Disks (``Disks``, probed once per run): ranks that see each other's files share a disk. On a shared filesystem
that is one disk and rank 0 leads it. On node-local disks each node holds its ranks' files and a copy of the
manifest; the ranks must land on the same nodes when the run resumes (their files are there), and only ZeRO
stage 3 works (below it every rank loads rank 0's model file): other stages are refused at start.

A ``.tmp`` directory is never loaded (the next start removes it). A corrupt ``step-N`` (bad hash, missing file,
garbage or missing manifest) is an error naming the file, unless ``--allow-fallback`` lets the resume take the
previous one. Files are unpickled weights-only (``weights_only_loads``): a checkpoint cannot run code. The
layout's names, the manifest reader, ``verify`` and the ZeRO gather are ``infinitrain.infer.loading``'s.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import secrets
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from infinitrain import faults
from infinitrain.atomic import fsync_dir, hash_files, write_atomic
from infinitrain.errors import CheckpointError, ConfigError
from infinitrain.infer.loading import (MANIFEST, STEP_DIR, TAG, committed, owner, read_manifest, step_dir_name, verify,
                                       weights_only_loads)

def rng_state() -> dict[str, Any]:
    """This process's RNG: python, numpy, torch, and the CUDA generator of this process's device only (a resume
    may see fewer GPUs than the save did: ``CUDA_VISIBLE_DEVICES`` names one GPU per rank)."""
    st = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), *st[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and device < len(state["cuda"]):  # older checkpoints: every visible GPU's state
        torch.cuda.set_rng_state(state["cuda"][device], device)


# --- which ranks share a disk ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disks:
    """The checkpoint directory's disks: groups of ranks that see each other's files (one group on a shared
    filesystem); each group's leader (its lowest rank) makes, renames and prunes directories there."""

    groups: tuple[tuple[int, ...], ...]
    rank: int

    @property
    def leader(self) -> bool:
        return any(g[0] == self.rank for g in self.groups)

    @property
    def shared(self) -> bool:
        return len(self.groups) == 1

    def describe(self) -> str:
        return "; ".join(f"ranks {_ranges(g)}" for g in self.groups)


def _ranges(ranks: tuple[int, ...]) -> str:
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + (None,)):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def probe_disks(root: Path, zero_stage: int) -> Disks:
    """Collective: every rank writes a file in a fresh directory under ``root`` and looks for every other
    rank's; ranks that see each other share a disk. Refused in one line: an inconsistent view, or node-local
    disks below ZeRO stage 3."""
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [secrets.token_hex(8)]
    dist.broadcast_object_list(token, src=0)
    probe = root / f".disks-{token[0]}"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / f"rank{rank:05d}").write_text(token[0])
    dist.barrier()
    seen = tuple(q for q in range(world) if (probe / f"rank{q:05d}").is_file())
    views: list[tuple[int, ...]] = [()] * world
    dist.all_gather_object(views, seen)
    dist.barrier()
    shutil.rmtree(probe, ignore_errors=True)
    groups = tuple(sorted(set(views)))
    if any(r not in views[r] or any(views[q] != views[r] for q in views[r]) for r in range(world)):
        raise ConfigError(f"{root}: ranks see each other's files inconsistently ({views}); put the run directory "
                          "on one shared filesystem or on each node's own disk")
    disks = Disks(groups, rank)
    if not disks.shared and zero_stage != 3:
        raise ConfigError(f"{root} is not shared between ranks ({disks.describe()} each see only their own "
                          f"files): node-local checkpoint directories need run.zero_stage=3 (at stage {zero_stage} "
                          "every rank loads rank 0's model file); use a shared filesystem or stage 3")
    return disks


# --- save ---------------------------------------------------------------------------------------------------


def save(engine, root: Path, step: int, trainer_state: dict[str, Any], keep_last: int, disks: Disks) -> Path:
    """Write and commit ``root/step-N`` (collective: every rank calls it). Returns the committed path.
    A write that fails on any rank (disk full, EFBIG under ``ulimit -f``) removes the partial directory and
    raises CheckpointError on every rank; the previous checkpoint is untouched."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if disks.leader:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    faults.point("before_shards", step)
    error, mine = None, {}
    try:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state={}, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            write_atomic(tmp / "trainer_state.json", json.dumps({**trainer_state, "world_size": world}, indent=1))
        faults.point("after_shards", step)
        (tmp / f"done.rank{rank:05d}").write_text("done\n")
        mine = hash_files(tmp, _own_files(tmp, rank), fsync=True, progress=rank == 0, desc="hashing checkpoint")
    except (OSError, RuntimeError) as err:  # torch.save's zip writer turns a failed write into a RuntimeError
        error = _write_error(err, tmp)
    _raise_if_any(error, tmp, disks)
    manifest = _gather_manifest(mine, step, world, tmp)
    if disks.leader:
        try:
            _write_manifest(tmp, manifest)
        except OSError as err:
            error = _write_error(err, tmp)
    _raise_if_any(error, tmp, disks)
    _commit(tmp, final, step, disks)
    names = [_prune(root, keep_last) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    if disks.leader and rank != 0:
        _keep_only(root, names[0])
    dist.barrier()
    return final


def _own_files(tmp: Path, rank: int) -> list[str]:
    """This rank's files in ``tmp`` (the ones its disk holds: on node-local disks, rank 0's alone are there)."""
    rels = (str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return [r for r in rels if owner(r) == rank and not r.endswith(".tmp")]


def _gather_manifest(mine: dict[str, dict[str, Any]], step: int, world: int, tmp: Path) -> dict[str, Any]:
    """Collective: every rank's digests, merged; a rank without its done marker fails the save everywhere."""
    parts: list[dict[str, Any]] = [{}] * world
    dist.all_gather_object(parts, mine)
    files = {rel: meta for part in parts for rel, meta in part.items()}
    missing = [r for r in range(world) if f"done.rank{r:05d}" not in files]
    if missing:
        _raise_if_any(f"{tmp}: ranks {missing} wrote no done marker", tmp, None)
    return {"version": 1, "step": step, "world_size": world, "files": dict(sorted(files.items()))}


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    dirs = {tmp / Path(rel).parent for rel in manifest["files"] if (tmp / rel).exists()} | {tmp}
    for d in dirs:
        fsync_dir(d)
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))


def _commit(tmp: Path, final: Path, step: int, disks: Disks) -> None:
    """Collective: every other disk's leader renames ``tmp`` to ``final`` first, rank 0 last (the commit point:
    a step-N that rank 0's disk lacks was never committed, and is removed by the next save's pruning)."""
    rank, error = dist.get_rank(), None
    if rank == 0:
        faults.point("before_commit", step)
    if disks.leader and rank != 0:
        error = _rename(tmp, final)
    _raise_if_any(error, tmp, disks)
    if rank == 0:
        error = _rename(tmp, final)
    _raise_if_any(error, tmp, disks)
    if rank == 0:
        faults.point("after_commit", step)


def _rename(tmp: Path, final: Path) -> str | None:
    try:
        if final.exists():  # a run resumed from an older checkpoint reaches this step again
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except OSError as err:
        return _write_error(err, tmp)
    return None


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


def _raise_if_any(error: str | None, tmp: Path, disks: Disks | None) -> None:
    """Collective: if any rank failed, every disk's leader drops the partial directory and every rank raises."""
    first = agree(error)
    if first:
        if disks is None or disks.leader:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{first}; checkpoint {tmp.name} not committed, the previous one is intact")


def clean_partial(root: Path) -> list[Path]:
    """Remove ``*.tmp`` directories left by a save that was killed (each disk's leader, at start)."""
    gone = [p for p in root.glob("step-*.tmp") if p.is_dir()] if root.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _prune(root: Path, keep_last: int) -> list[str]:
    """Rank 0: drop all but the newest ``keep_last`` committed checkpoints; the names kept."""
    done = committed(root)
    if keep_last > 0:
        for p in done[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        done = done[-keep_last:]
    return [p.name for p in done]


def prune(root: Path, keep_last: int) -> None:
    _prune(root, keep_last)


def _keep_only(root: Path, names: list[str]) -> None:
    """Another disk's leader: its step-N directories are rank 0's committed ones, no more."""
    for p in root.iterdir() if root.is_dir() else ():
        if p.is_dir() and STEP_DIR.match(p.name) and p.name not in names:
            shutil.rmtree(p, ignore_errors=True)


# --- resume -------------------------------------------------------------------------------------------------


def agree(error: str | None) -> str | None:
    """Collective: the first rank's error, on every rank."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def check(ckpt: Path) -> dict[str, Any]:
    """Collective: the manifest (every disk's copy), the world size, and each rank's own files' sha256 (every
    rank hashes its share at once); any failure is raised on every rank. Returns the manifest."""
    rank, world = dist.get_rank(), dist.get_world_size()
    error, manifest = None, None
    try:
        manifest = read_manifest(ckpt)
        if manifest["world_size"] != world:
            raise CheckpointError(f"{ckpt}: saved by {manifest['world_size']} ranks, this run has {world}; resume "
                                  f"it with {manifest['world_size']} ranks (changing the world size is not supported)")
        verify(ckpt, manifest, rank, progress=rank == 0)
    except CheckpointError as err:
        error = str(err)
    first = agree(error)
    if first:
        raise CheckpointError(first)
    return manifest


def _candidates(run_dir: Path, resume: str) -> list[Path]:
    """Rank 0's list, newest first (collective): its disk decides what was committed."""
    found: list[list[str] | str] = [[]]
    if dist.get_rank() == 0:
        if resume == "auto":
            root = run_dir / "checkpoints"
            steps = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []
            found[0] = [str(p) for p in sorted(steps, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)]
        else:
            found[0] = [resume] if Path(resume).is_dir() else f"{resume}: no such checkpoint directory"
    dist.broadcast_object_list(found, src=0)
    if isinstance(found[0], str):
        raise CheckpointError(found[0])
    if resume == "auto":  # the same step directory under this rank's own run dir (its disk)
        return [run_dir / "checkpoints" / Path(p).name for p in found[0]]
    return [Path(p) for p in found[0]]


def choose(run_dir: Path, resume: str, allow_fallback: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, checked (collective), and the errors of newer ones skipped on the way.

    ``none``: nothing. A path: that checkpoint. ``auto``: the newest ``step-N`` of the run (a ``step-N`` without a
    manifest is damaged, not partial: partial saves are ``.tmp``); with ``allow_fallback`` a damaged one is
    skipped for the next older. Never None when a damaged checkpoint exists: no silent start from scratch."""
    if resume == "none":
        return None, []
    candidates = _candidates(run_dir, resume)
    if not candidates:
        return None, []
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
    rank's RNG. Returns the trainer state saved with it (rank 0's file, sent to every rank: on node-local disks
    the others do not have it)."""
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
    state: list[Any] = [None]
    if rank == 0:
        state_file = ckpt / "trainer_state.json"
        try:
            state[0] = json.loads(state_file.read_text())
        except (OSError, ValueError) as err:
            state[0] = f"{state_file}: unreadable ({err})"
    dist.broadcast_object_list(state, src=0)
    if isinstance(state[0], str):
        raise CheckpointError(state[0])
    return state[0]
