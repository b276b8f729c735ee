"""Input discovery and document reading: files, folders and globs of .txt/.jsonl, optionally .gz or .zst.

Policy for bad input (each case is an :class:`Issue` with file and 1-based line; under ``strict`` the first one
raises :class:`~infinitrain.errors.DataError` instead):

- ``binary``: a NUL byte in a text file or JSONL line (also catches UTF-16): skipped;
- ``invalid_utf8``: bytes that are not UTF-8 are replaced by U+FFFD and the document is kept (counted);
- ``empty``: empty or whitespace-only documents (and blank JSONL lines): skipped;
- ``broken_json``, ``not_an_object``, ``missing_field``, ``not_a_string``: a bad JSONL record: skipped;
- ``bad_label`` (classification): a label that is neither a non-empty string nor an integer: skipped.

Record fields by format: ``jsonl`` text; ``summarization`` document, summary; ``qa`` context, question, answer;
``classification`` text, label (every name configurable).

A UTF-8 byte-order mark at the start of a file is dropped. A truncated or corrupt .gz/.zst input is fatal
(a :class:`DataError` naming the file and byte offset), since the rest of that file cannot be read.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zstandard

from infinitrain.errors import ConfigError, DataError

Format = Literal["auto", "text", "jsonl", "summarization", "qa", "classification"]
FORMATS: tuple[str, ...] = ("auto", "text", "jsonl", "summarization", "qa", "classification")
RECORD_FORMATS = ("jsonl", "summarization", "qa", "classification")  # always read as JSONL
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
CHUNK = 1 << 20
BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class Document:
    """One kept document: where it came from, its text (the context in qa) and the format's other fields."""

    source: int  # index into the sorted input list
    line: int  # 1-based line of the JSONL record; 1 for a whole text file
    text: str
    answer: str | None = None  # the trained continuation: the summary (summarization) or the answer (qa)
    question: str | None = None  # qa
    label: str | None = None  # classification (an integer label is kept as its decimal string)


@dataclass(frozen=True, slots=True)
class Issue:
    """Something wrong with one input document: skipped unless ``kept``."""

    source: int
    line: int
    reason: str
    detail: str = ""
    kept: bool = False


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How input files become documents."""

    format: Format = "auto"
    text_field: str | None = None  # default "text"; "document" (summarization), "context" (qa)
    summary_field: str = "summary"
    question_field: str = "question"
    answer_field: str = "answer"
    label_field: str = "label"
    strict: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    @property
    def field(self) -> str:
        if self.text_field is not None:
            return self.text_field
        return {"summarization": "document", "qa": "context"}.get(self.format, "text")

    @property
    def string_fields(self) -> dict[str, str]:
        """Document attribute -> JSONL field, for the string fields a record of this format must have."""
        extra = {"summarization": {"answer": self.summary_field},
                 "qa": {"question": self.question_field, "answer": self.answer_field}}.get(self.format, {})
        return {"text": self.field, **extra}


@dataclass
class ReadProgress:
    """Raw (on-disk) input bytes consumed so far; the reader updates it for progress bars."""

    bytes_read: int = 0
    files_done: int = 0
    by_file: list[int] = field(default_factory=list)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively for .txt/.jsonl[.gz|.zst]) and globs, each group sorted, deduplicated."""
    if not patterns:
        raise ConfigError("no INPUT given")
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _known_kind(f) is not None)
            if not found:
                raise ConfigError(f"{p}: folder has no .txt or .jsonl files (optionally .gz/.zst)")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(pat):
            found = sorted(Path(f) for f in glob.glob(pat, recursive=True) if Path(f).is_file())
            if not found:
                raise ConfigError(f"{pat}: glob matches no files")
        else:
            raise ConfigError(f"{p}: no such input file or folder")
        out.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in out:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _known_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suf in COMPRESSED_SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def file_kind(path: Path, fmt: Format) -> str:
    """'text' (the whole file is one document) or 'jsonl' (one record a line) for this file under ``fmt``."""
    if fmt == "text":
        return "text"
    if fmt in RECORD_FORMATS:
        return "jsonl"
    kind = _known_kind(path)
    if kind is None:
        raise ConfigError(f"{path}: cannot tell text from JSONL by its name; pass --format text or --format jsonl")
    return kind


def iter_chunks(path: Path, progress: ReadProgress | None = None) -> Iterator[bytes]:
    """The decompressed bytes of a file in chunks; a truncated or corrupt .gz/.zst raises DataError."""
    name = path.name.lower()
    with open(path, "rb") as raw:
        if name.endswith(".gz"):
            gz = gzip.GzipFile(fileobj=raw)
            while True:
                try:
                    chunk = gz.read(CHUNK)
                except (EOFError, OSError, zlib.error) as err:
                    raise DataError(f"{path}: corrupt or truncated gzip stream near byte {raw.tell()} "
                                    f"({err})") from None
                _advance(progress, raw)
                if not chunk:
                    return
                yield chunk
        elif name.endswith(".zst"):
            yield from _zstd_chunks(path, raw, progress)
        else:
            while chunk := raw.read(CHUNK):
                _advance(progress, raw)
                yield chunk


def _zstd_chunks(path: Path, raw, progress: ReadProgress | None) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    dobj, started = dctx.decompressobj(), False
    while data := raw.read(CHUNK):
        _advance(progress, raw)
        while data:
            started = True
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as err:
                raise DataError(f"{path}: corrupt zstd stream near byte {raw.tell()} ({err})") from None
            if out:
                yield out
            if dobj.eof:  # a frame ended; the file may hold more frames
                data, dobj, started = dobj.unused_data, dctx.decompressobj(), False
            else:
                data = b""
    if started:
        raise DataError(f"{path}: truncated zstd stream (the last frame is incomplete at byte {raw.tell()})")


def _advance(progress: ReadProgress | None, raw) -> None:
    if progress is not None:
        pos = raw.tell()
        progress.bytes_read += pos - progress.by_file[-1]
        progress.by_file[-1] = pos


def iter_lines(path: Path, progress: ReadProgress | None = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline)."""
    rest, lineno = b"", 0
    for chunk in iter_chunks(path, progress):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            lineno += 1
            yield lineno, part
    if rest:
        yield lineno + 1, rest


def read_documents(paths: Sequence[Path], opts: ReadOptions,
                   progress: ReadProgress | None = None) -> Iterator[Document | Issue]:
    """Every document of every input in order, interleaved with the issues met on the way."""
    for source, path in enumerate(paths):
        if progress is not None:
            progress.by_file.append(0)
        if file_kind(path, opts.format) == "text":
            items = [_text_document(source, path, b"".join(iter_chunks(path, progress)))]
        else:
            items = (_jsonl_record(source, path, lineno, line, opts) for lineno, line in iter_lines(path, progress))
        for item_list in items:
            for item in item_list:
                if isinstance(item, Issue) and opts.strict:
                    detail = f" ({item.detail})" if item.detail else ""
                    raise DataError(f"{path}:{item.line}: {item.reason}{detail}")
                yield item
        if progress is not None:
            progress.files_done += 1


def _decode(source: int, line: int, data: bytes, out: list) -> str | None:
    if b"\x00" in data:
        out.append(Issue(source, line, "binary", f"NUL byte at byte {data.index(0)}"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        out.append(Issue(source, line, "invalid_utf8", f"at byte {err.start}, replaced by U+FFFD", kept=True))
        text = data.decode("utf-8", errors="replace")
    return text[1:] if line == 1 and text.startswith(BOM) else text


def _text_document(source: int, path: Path, data: bytes) -> list:
    out: list = []
    text = _decode(source, 1, data, out)
    if text is not None:
        out.append(Document(source, 1, text) if text.strip() else Issue(source, 1, "empty"))
    return out


def _jsonl_record(source: int, path: Path, lineno: int, line: bytes, opts: ReadOptions) -> list:
    out: list = []
    text = _decode(source, lineno, line, out)
    if text is None:
        return out
    if not text.strip():
        return [Issue(source, lineno, "empty", "blank line")]
    try:
        rec = json.loads(text)
    except ValueError as err:
        return [Issue(source, lineno, "broken_json", str(err))]
    if not isinstance(rec, dict):
        return [Issue(source, lineno, "not_an_object", type(rec).__name__)]
    values = {}
    for attr, name in opts.string_fields.items():
        if name not in rec:
            return [Issue(source, lineno, "missing_field", name)]
        if not isinstance(rec[name], str):
            return [Issue(source, lineno, "not_a_string", name)]
        if not rec[name].strip() and not (attr == "question" and opts.format == "qa"):  # a qa question may be empty
            return [Issue(source, lineno, "empty", name)]
        values[attr] = rec[name]
    if opts.format == "classification":
        label = rec.get(opts.label_field)
        if opts.label_field not in rec:
            return [Issue(source, lineno, "missing_field", opts.label_field)]
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label.strip():
            return [Issue(source, lineno, "bad_label", f"{opts.label_field}={label!r}")]
        values["label"] = label
    out.append(Document(source, lineno, **values))
    return out


def input_fingerprint(paths: Sequence[Path]) -> list[dict]:
    """Path, size and mtime of each input: what the done-file compares to decide if a re-run is a no-op."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out
