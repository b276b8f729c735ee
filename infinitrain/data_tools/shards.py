"""Shard format v1 and v2 (spec: SHARD_FORMAT.md): the symmetric writer and reader of checksummed zstd sample shards and
index.json."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from infinitrain.atomic import commit_file, sha256_file, write_atomic
from infinitrain.errors import DataError, ShardCorruptError

FORMAT_VERSION = 1  # written unless the samples carry labels
LABEL_FORMAT_VERSION = 2  # v1 plus a label column in every frame (classification)
READ_VERSIONS = (FORMAT_VERSION, LABEL_FORMAT_VERSION)
NO_LABEL = -1  # in a v2 label column: this sample has no label
INDEX_NAME = "index.json"
SHARD_SUFFIX = ".shard"
MAGIC = b"INFSHRD1"
TRAILER = struct.Struct("<QQ8s")  # footer offset, footer size, magic
COUNTS = np.dtype([("tokens", "<u4"), ("spans", "<u4"), ("doc_starts", "<u4"), ("doc_ids", "<u4")])
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # how token ids are stored (index "dtype")


@dataclass(frozen=True, slots=True)
class PackedSample:
    """One stored sample: the ids of input positions plus the last target, and where loss and documents are."""

    tokens: np.ndarray  # (n + 1,) uint16/uint32: input_ids = tokens[:-1], targets = tokens[1:]
    loss_spans: np.ndarray  # (m, 2) int32 [start, end) input positions whose target is trained on
    doc_starts: np.ndarray  # (d,) int32 input positions where a document begins
    doc_ids: np.ndarray  # (p,) int64 ids of the documents with tokens in the sample, in order
    label: int | None = None  # class id (index into index.json labels.names); stored only in v2 shards

    @property
    def raw_bytes(self) -> int:
        """Bytes in a v1 frame (a v2 frame adds 4 per sample for the label)."""
        return (COUNTS.itemsize + self.tokens.nbytes + 8 * len(self.loss_spans) + 4 * len(self.doc_starts)
                + 8 * len(self.doc_ids))


def dtype_name(dtype: np.dtype) -> str:
    return {v: k for k, v in TOKEN_DTYPES.items()}[np.dtype(dtype).newbyteorder("<")]


# --- frames ---------------------------------------------------------------------------------------


def encode_frame(samples: Sequence[PackedSample], dtype: np.dtype, version: int = FORMAT_VERSION) -> bytes:
    """Column layout: n, counts (n records), all tokens, all spans, all doc starts, all doc ids (v2: all labels)."""
    counts = np.array([(len(s.tokens), len(s.loss_spans), len(s.doc_starts), len(s.doc_ids)) for s in samples], COUNTS)
    parts = [struct.pack("<I", len(samples)), counts.tobytes()]
    parts += [np.asarray(s.tokens, dtype).tobytes() for s in samples]
    parts += [np.asarray(s.loss_spans, "<i4").tobytes() for s in samples]
    parts += [np.asarray(s.doc_starts, "<i4").tobytes() for s in samples]
    parts += [np.asarray(s.doc_ids, "<i8").tobytes() for s in samples]
    if version == LABEL_FORMAT_VERSION:
        parts.append(np.array([NO_LABEL if s.label is None else s.label for s in samples], "<i4").tobytes())
    elif any(s.label is not None for s in samples):
        raise ValueError(f"version {version} frames cannot hold labels")
    return b"".join(parts)


def decode_frame(raw: bytes, dtype: np.dtype, version: int = FORMAT_VERSION) -> list[PackedSample]:
    """Inverse of :func:`encode_frame`; raises ValueError when the sizes do not add up."""
    (n,) = struct.unpack_from("<I", raw, 0)
    counts = np.frombuffer(raw, COUNTS, n, 4)
    pos = 4 + counts.nbytes
    cols = []
    for name, dt, width in (("tokens", dtype, 1), ("spans", np.dtype("<i4"), 2), ("doc_starts", np.dtype("<i4"), 1),
                            ("doc_ids", np.dtype("<i8"), 1)):
        total = int(counts[name].sum(dtype=np.int64)) * width
        arr = np.frombuffer(raw, dt, total, pos)
        pos += arr.nbytes
        cols.append(np.split(arr, np.cumsum(counts[name].astype(np.int64) * width)[:-1]))
    labels: list = [None] * n
    if version == LABEL_FORMAT_VERSION:
        labels = [None if x == NO_LABEL else int(x) for x in np.frombuffer(raw, "<i4", n, pos)]
        pos += 4 * n
    if pos != len(raw):
        raise ValueError(f"frame holds {len(raw)} bytes, its counts describe {pos}")
    return [PackedSample(t, s.reshape(-1, 2), d, i, lab) for t, s, d, i, lab in zip(*cols, labels)]


# --- writer ---------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one split's samples, in order, to ``{prefix}-{n:05d}.shard`` files of about ``shard_bytes`` raw bytes.

    Each shard is written to ``<name>.tmp``, fsynced and renamed when complete; :meth:`close` returns the
    index entries. Output depends only on the samples and the settings (byte-identical across runs). With
    ``labels`` the shards are version 2 (a label column); without, version 1.
    """

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, *, shard_bytes: int = 64 << 20,
                 frame_bytes: int = 1 << 20, level: int = 3, labels: bool = False):
        self.directory, self.prefix, self.dtype = Path(directory), prefix, np.dtype(dtype)
        self.version = LABEL_FORMAT_VERSION if labels else FORMAT_VERSION
        self.shard_bytes, self.frame_bytes = shard_bytes, min(frame_bytes, shard_bytes)
        self.cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        self.entries: list[dict] = []
        self._file = None
        self._pending: list[PackedSample] = []
        self._pending_bytes = 0
        self._first_sample = 0  # of the open shard, in the split

    def add(self, sample: PackedSample) -> None:
        if self._file is None:
            self._open()
        self._pending.append(sample)
        self._pending_bytes += sample.raw_bytes + (4 if self.version == LABEL_FORMAT_VERSION else 0)
        self._shard_counts["samples"] += 1
        self._shard_counts["tokens"] += len(sample.tokens) - 1
        self._shard_counts["loss_tokens"] += int((sample.loss_spans[:, 1] - sample.loss_spans[:, 0]).sum())
        if self._pending_bytes >= self.frame_bytes:
            self._flush_frame()
            if self._raw_bytes >= self.shard_bytes:
                self._close_shard()

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.entries

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.entries):05d}{SHARD_SUFFIX}"
        self._tmp = self.directory / (self._name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self._raw_bytes = 0
        self._frames: list[list[int]] = []
        self._shard_counts = {"samples": 0, "tokens": 0, "loss_tokens": 0}

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def _flush_frame(self) -> None:
        if not self._pending:
            return
        raw = encode_frame(self._pending, self.dtype, self.version)
        comp = self.cctx.compress(raw)
        first = self._shard_counts["samples"] - len(self._pending)
        self._frames.append([self._offset, len(comp), first, len(self._pending)])
        self._write(comp)
        self._raw_bytes += len(raw)
        self._pending, self._pending_bytes = [], 0

    def _close_shard(self) -> None:
        self._flush_frame()
        c = self._shard_counts
        footer = {"format": "infinitrain-shard", "version": self.version, "dtype": dtype_name(self.dtype),
                  "num_samples": c["samples"], "num_tokens": c["tokens"], "frames": self._frames}
        comp = self.cctx.compress(json.dumps(footer, separators=(",", ":")).encode())
        footer_offset = self._offset
        self._write(comp)
        self._write(TRAILER.pack(footer_offset, len(comp), MAGIC))
        commit_file(self._file, self._tmp, self.directory / self._name)
        self._file = None
        self.entries.append({"name": self._name, "bytes": self._offset, "sha256": self._sha.hexdigest(),
                             "first_sample": self._first_sample, "num_samples": c["samples"],
                             "num_tokens": c["tokens"], "num_loss_tokens": c["loss_tokens"]})
        self._first_sample += c["samples"]


# --- reader ---------------------------------------------------------------------------------------


class ShardFile:
    """An open, checked shard. Opening compares size and sha256 with the index entry (when given) and parses the
    footer; :meth:`read_frame` decompresses one frame (zstd verifies its content checksum)."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, *, entry: dict | None = None):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise ShardCorruptError(f"{self.path}: shard listed in the index is missing") from None
        if entry is not None:
            actual = sha256_file(self.path)
            if size != entry["bytes"] or actual != entry["sha256"]:
                raise ShardCorruptError(f"{self.path}: sha256 expected {entry['sha256']} got {actual} "
                                        f"(size expected {entry['bytes']} got {size})")
        self.size = size
        footer = self._read_footer()
        frames = footer.get("frames")
        if footer.get("version") not in READ_VERSIONS or footer.get("dtype") != dtype_name(self.dtype):
            raise ShardCorruptError(f"{self.path}: footer says version {footer.get('version')} dtype "
                                    f"{footer.get('dtype')}, expected one of {READ_VERSIONS} and "
                                    f"{dtype_name(self.dtype)}")
        self.version = int(footer["version"])
        self.frames = [tuple(int(x) for x in fr) for fr in frames]
        self.num_samples = int(footer["num_samples"])
        self.num_tokens = int(footer["num_tokens"])
        self._check_frame_table()
        if entry is not None and self.num_samples != entry["num_samples"]:
            raise ShardCorruptError(f"{self.path}: footer has {self.num_samples} samples, index {entry['num_samples']}")
        self._starts = [fr[2] for fr in self.frames]

    def _pread(self, offset: int, size: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ShardCorruptError(f"{self.path}: short read of {size} bytes at byte {offset}")
        return data

    def _read_footer(self) -> dict:
        if self.size < TRAILER.size:
            raise ShardCorruptError(f"{self.path}: {self.size} bytes is too short for a shard (truncated)")
        offset, size, magic = TRAILER.unpack(self._pread(self.size - TRAILER.size, TRAILER.size))
        if magic != MAGIC or offset + size != self.size - TRAILER.size:
            raise ShardCorruptError(f"{self.path}: bad trailer at byte {self.size - TRAILER.size} "
                                    "(not a shard, or truncated)")
        try:
            footer = json.loads(self._decompress(self._pread(offset, size), offset))
        except ValueError as err:
            raise ShardCorruptError(f"{self.path}: unreadable footer at byte {offset} ({err})") from None
        if not isinstance(footer, dict) or not isinstance(footer.get("frames"), list):
            raise ShardCorruptError(f"{self.path}: footer at byte {offset} is not a shard footer")
        self.footer_offset = offset
        return footer

    def _check_frame_table(self) -> None:
        pos, sample = 0, 0
        for off, size, first, n in self.frames:
            if off != pos or first != sample or size <= 0 or n <= 0:
                raise ShardCorruptError(f"{self.path}: inconsistent frame table at byte {off}")
            pos, sample = off + size, first + n
        if pos != self.footer_offset or sample != self.num_samples:
            raise ShardCorruptError(f"{self.path}: frame table does not cover the shard")

    def _decompress(self, data: bytes, offset: int) -> bytes:
        try:
            return zstandard.ZstdDecompressor().decompress(data)
        except zstandard.ZstdError as err:
            raise ShardCorruptError(f"{self.path}: zstd frame at byte {offset}: {err}") from None

    def frame_of(self, local_index: int) -> int:
        return bisect_right(self._starts, local_index) - 1

    def read_frame(self, j: int) -> list[PackedSample]:
        off, size, _, n = self.frames[j]
        raw = self._decompress(self._pread(off, size), off)
        try:
            samples = decode_frame(raw, self.dtype, self.version)
        except (ValueError, struct.error) as err:
            raise ShardCorruptError(f"{self.path}: frame at byte {off} does not parse ({err})") from None
        if len(samples) != n:
            raise ShardCorruptError(f"{self.path}: frame at byte {off} holds {len(samples)} samples, table says {n}")
        return samples


def decompress_stream(data: bytes, path: Path) -> bytes:
    """Every frame of a zstd stream (content checksums verified); a truncated stream raises ShardCorruptError."""
    out, pos = [], 0
    dctx = zstandard.ZstdDecompressor()
    while pos < len(data):
        dobj = dctx.decompressobj()
        try:
            out.append(dobj.decompress(data[pos:]))
        except zstandard.ZstdError as err:
            raise ShardCorruptError(f"{path}: zstd frame at byte {pos}: {err}") from None
        if not dobj.eof:
            raise ShardCorruptError(f"{path}: truncated zstd frame at byte {pos}")
        pos = len(data) - len(dobj.unused_data)
    return b"".join(out)


# --- index ----------------------------------------------------------------------------------------


def make_index(*, tokenizer: dict, dtype: np.dtype, segment_len: int, sample_segments: int, mode: str,
               splits: dict[str, list[dict]], zstd_level: int, version: int = FORMAT_VERSION, **extra) -> dict:
    """The index.json content: everything a reader needs plus the per-shard sizes and hashes (see SHARD_FORMAT.md)."""
    return {"format": "infinitrain-shards", "version": version, "dtype": dtype_name(dtype),
            "segment_len": segment_len, "sample_segments": sample_segments,
            "sample_tokens": segment_len * sample_segments,
            "mode": mode, "tokenizer": tokenizer,
            "compression": {"codec": "zstd", "level": zstd_level, "content_checksum": True},
            "splits": {name: {"num_samples": sum(e["num_samples"] for e in entries),
                              "num_tokens": sum(e["num_tokens"] for e in entries),
                              "num_loss_tokens": sum(e["num_loss_tokens"] for e in entries),
                              "shards": entries} for name, entries in splits.items()},
            **extra}


def write_index(directory: Path, index: dict) -> None:
    """Write index.json atomically: it is the last file prepare writes, so its presence means complete."""
    write_atomic(Path(directory) / INDEX_NAME, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())


def read_index(directory: str | os.PathLike) -> dict:
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path}: no index (not a prepared data folder, or prepare did not finish)")
    try:
        index = json.loads(path.read_bytes())
    except ValueError as err:
        raise ShardCorruptError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != "infinitrain-shards":
        raise ShardCorruptError(f"{path}: not an infinitrain shard index")
    if index.get("version") not in READ_VERSIONS:
        raise DataError(f"{path}: index version {index.get('version')}, this reader reads versions "
                        f"{', '.join(map(str, READ_VERSIONS))}")
    if index.get("dtype") not in TOKEN_DTYPES:
        raise ShardCorruptError(f"{path}: unknown dtype {index.get('dtype')!r}")
    return index
