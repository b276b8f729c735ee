"""Durable files: atomic writes (temp file, fsync, rename), directory fsyncs and sha256 of files, in one place.

Checkpoints, exports, prepared shards and tokenizers are all written this way, so a reader never sees a
partial file and a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HASH_CHUNK = 4 << 20  # bytes read at a time when hashing
HASH_THREADS = 8  # files hashed at once (hashlib releases the GIL on large reads)
PROGRESS_BYTES = 1 << 28  # a bar for hashing only above this much (256 MiB)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync and rename, so readers never see a
    partial file. ``durable=False`` skips the fsync: for scratch files whose content is checked when read back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def commit_file(f, tmp: Path, final: Path) -> None:
    """Make an open file written at ``tmp`` durable and atomically visible as ``final``: flush, fsync, close,
    rename. For writers that stream and hash as they go (prepare's documents file, shards); ``write_atomic`` is
    the one-call form for bytes in hand."""
    with f:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file directly in ``root``, then ``root`` itself."""
    for p in sorted(root.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def sha256_file(path: Path, *, fsync: bool = False, advance: Callable[[int], Any] | None = None) -> str:
    """Hex sha256 of a file's bytes; ``fsync`` also flushes the file to disk while it is open; ``advance(n)`` is
    called with the bytes of each block read (a progress bar's ``update``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def hash_files(root: Path, rels: Iterable[str], *, fsync: bool = False, progress: bool = False,
               desc: str = "sha256") -> dict[str, dict[str, Any]]:
    """{rel: {"bytes", "sha256"}} of files under ``root``, several at once, with a tqdm bar on stderr (bytes)
    when ``progress`` and there is more than PROGRESS_BYTES to read. A missing file raises OSError."""
    from tqdm import tqdm

    rels = sorted(rels)
    sizes = {r: (root / r).stat().st_size for r in rels}
    bar = tqdm(total=sum(sizes.values()), desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False,
               disable=not progress or sum(sizes.values()) < PROGRESS_BYTES, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(rels)))) as pool:
            digests = list(pool.map(lambda r: sha256_file(root / r, fsync=fsync, advance=bar.update), rels))
    finally:
        bar.close()
    return {r: {"bytes": sizes[r], "sha256": d} for r, d in zip(rels, digests)}
