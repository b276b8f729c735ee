"""`infinitrain prepare`: read, tokenize (multiprocess, resumable), split, pack and write checksummed shards.

Two stages. (1) The main process reads documents in input order and groups them into work units of about
``unit_chars`` characters; W workers (the main process and W-1 spawned ones) tokenize each unit and write it to
``DIR/.work/unit-NNNNNN.bin`` atomically, so a killed run resumes by skipping the units already on disk.
(2) The main process reads the units in order, assigns each document to train or val, packs, and writes the
shards, documents file, report, ``index.json`` (last) and the done-file. Unit boundaries never show in the
output, and stage 2 is sequential, so the output is byte-identical whatever the worker count and however often
the run was interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from infinitrain.atomic import commit_file, write_atomic
from infinitrain.data_tools.inputs import (FORMATS, Issue, ReadOptions, ReadProgress, expand_inputs,
                                           input_fingerprint, read_documents)
from infinitrain.data_tools.pack import StreamPacker, answer_sample
from infinitrain.data_tools.shards import (FORMAT_VERSION, INDEX_NAME, LABEL_FORMAT_VERSION, SHARD_SUFFIX, ShardWriter,
                                           make_index, write_index)
from infinitrain.data_tools.tokenizer import TokenizerInfo, encoder, load_tokenizer
from infinitrain.errors import ConfigError, DataError, InfinitrainError

TOKENIZER_NAME = "tokenizer.json"  # a copy of --tokenizer, byte for byte
DONE_NAME = ".prepare-done.json"
WORK_NAME = ".work"
DOCS_NAME = "documents.jsonl.zst"
REPORT_NAME = "report.json"
SPLITS = ("train", "val")
MAX_REPORTED_ISSUES = 1000
FAULT_ENV = "INFINITRAIN_FAULT"  # test hook: "prepare.unit:N" / "prepare.shard:N" SIGKILLs the run there
UNIT_HEADER = struct.Struct("<Q")
UNIT_VERSION = 2  # layout of the .work units: (text, question, answer) token lengths per document, label in meta
RECORD_MODES = ("summarization", "qa", "classification")  # one sample per record (else: packed pretrain stream)


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Arguments of `infinitrain prepare` (see its --help)."""

    inputs: tuple[str, ...]
    tokenizer: str
    out: str
    segment_len: int
    sample_segments: int
    format: str = "auto"
    text_field: str | None = None
    summary_field: str = "summary"
    question_field: str = "question"
    answer_field: str = "answer"
    label_field: str = "label"
    separator: str = "\n\nSummary:\n"  # summarization: between the document and the summary
    question_separator: str = "\n\nQuestion: "  # qa: between the context and the question
    answer_separator: str = "\nAnswer:"  # qa: between the question and the answer
    eos_token: str | None = None
    min_doc_tokens: int = 0
    val_fraction: float = 0.0
    seed: int = 0
    strict: bool = False
    workers: int = 1
    shard_bytes: int = 64 << 20
    frame_bytes: int = 1 << 20
    zstd_level: int = 3
    unit_chars: int = 1 << 18  # text per resumable work unit (does not change the output; small: even load)
    max_piece_chars: int = 1 << 12  # long documents are tokenized in pieces of at most this many characters
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [(self.segment_len >= 1, "--segment-len must be >= 1"),
                  (self.sample_segments >= 1, "--sample-segments must be >= 1"),
                  (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}"),
                  (self.min_doc_tokens >= 0, "--min-doc-tokens must be >= 0"),
                  (0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)"),
                  (self.workers >= 1, "--workers must be >= 1"),
                  (1 <= self.zstd_level <= 22, "--zstd-level must be in 1..22"),
                  (self.shard_bytes >= 1 << 10 and self.frame_bytes >= 1 << 8, "shard/frame size too small"),
                  (self.unit_chars >= 1 and self.max_piece_chars >= 64, "unit/piece size too small")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if not self.inputs:
            raise ConfigError("no INPUT given")

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(format=self.format, text_field=self.text_field, summary_field=self.summary_field,
                           question_field=self.question_field, answer_field=self.answer_field,
                           label_field=self.label_field, strict=self.strict)

    @property
    def mode(self) -> str:
        """The index's ``mode``: the record format, or ``pretrain`` for packed text."""
        return self.format if self.format in RECORD_MODES else "pretrain"

    def output_args(self) -> dict:
        """The arguments that shape the output (worker count, progress and unit size do not); only those of
        this format are listed, so adding options for other formats does not change a folder's fingerprint."""
        skip = {"inputs", "tokenizer", "out", "workers", "progress", "unit_chars"}
        args = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        args["text_field"] = self.read_options.field
        used = {"summarization": {"separator", "summary_field"},
                "qa": {"question_separator", "answer_separator", "question_field", "answer_field"},
                "classification": {"label_field"}}.get(self.format, set())
        for name in {"separator", "summary_field", "question_separator", "answer_separator", "question_field",
                     "answer_field", "label_field"} - used:
            args.pop(name)
        return args


@dataclass(frozen=True, kw_only=True)
class PrepareResult:
    out: Path
    up_to_date: bool
    index: dict
    units_total: int = 0
    units_resumed: int = 0
    seconds: float = 0.0


# --- public entry ---------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig) -> PrepareResult:
    t0 = time.perf_counter()
    paths = expand_inputs(cfg.inputs)
    tokenizer, tok_info = load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token)
    before_answer = cfg.answer_separator if cfg.format == "qa" else cfg.separator
    separators = tuple(np.array(tokenizer.encode(text, add_special_tokens=False).ids, tok_info.dtype)
                       for text in (cfg.question_separator, before_answer))
    out = Path(cfg.out)
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _build(cfg, paths, tok_info, separators, out, t0)
    except InfinitrainError:
        if fresh:  # bad input leaves no half-made folder (a killed run keeps its .work to resume)
            shutil.rmtree(out, ignore_errors=True)
        raise


def _build(cfg: PrepareConfig, paths: list[Path], tok_info: TokenizerInfo, separators: tuple[np.ndarray, np.ndarray],
           out: Path, t0: float) -> PrepareResult:
    version = LABEL_FORMAT_VERSION if cfg.format == "classification" else FORMAT_VERSION
    fingerprint = {"format_version": version, "args": cfg.output_args(), "tokenizer": tok_info.to_dict(),
                   "inputs": input_fingerprint(paths)}
    index = up_to_date_index(out, fingerprint)
    if index is not None:
        return PrepareResult(out=out, up_to_date=True, index=index, seconds=time.perf_counter() - t0)
    for name in (DONE_NAME, INDEX_NAME):  # from here on the folder is "incomplete" until index.json is back
        (out / name).unlink(missing_ok=True)
    work = _work_dir(out, fingerprint, cfg)
    n_units, resumed = tokenize_units(cfg, paths, tok_info, work)
    index = write_output(cfg, paths, tok_info, separators, work, n_units)
    write_atomic(out / DONE_NAME, json.dumps(fingerprint, indent=1, sort_keys=True).encode())
    _remove_stale(out, index)
    shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(out=out, up_to_date=False, index=index, units_total=n_units, units_resumed=resumed,
                         seconds=time.perf_counter() - t0)


def up_to_date_index(out: Path, fingerprint: dict) -> dict | None:
    """The existing index when the done-file matches and every shard is there with its size, else None."""
    try:
        done = json.loads((out / DONE_NAME).read_bytes())
        index = json.loads((out / INDEX_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    if done != fingerprint:
        return None
    files = [e for split in index["splits"].values() for e in split["shards"]] + [index["documents"]]
    if all((out / e["name"]).is_file() and (out / e["name"]).stat().st_size == e["bytes"] for e in files):
        return index
    return None


def _work_dir(out: Path, fingerprint: dict, cfg: PrepareConfig) -> Path:
    """``.work`` reused only when it was made for exactly this fingerprint and unit layout, else emptied."""
    work = out / WORK_NAME
    key = json.dumps({**fingerprint, "unit_chars": cfg.unit_chars, "unit_version": UNIT_VERSION},
                     sort_keys=True).encode()
    try:
        if (work / "fingerprint.json").read_bytes() == key:
            return work
    except OSError:
        pass
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_atomic(work / "fingerprint.json", key)
    return work


def _fault(site: str, count: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{site}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


# --- stage 1: tokenize units ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitJob:
    """What a worker needs to tokenize one unit and write it."""

    number: int
    path: str
    docs: list  # (source, line, text, question, answer, label, split key, more): see iter_units
    issues: list  # (source, line, reason, detail, kept) met while reading these documents


def iter_units(cfg: PrepareConfig, paths: list[Path], work: Path, progress: ReadProgress) -> Iterator[UnitJob]:
    """Documents grouped into units of about ``unit_chars``; a longer document is cut (by :func:`split_text`, so
    its ids do not change) into parts spread over several units, which workers then tokenize in parallel."""
    docs, issues, chars, number = [], [], 0, 0
    for item in read_documents(paths, cfg.read_options, progress):
        if isinstance(item, Issue):
            issues.append((item.source, item.line, item.reason, item.detail, item.kept))
            continue
        key = _split_key(item.text, item.answer, item.question)
        parts = split_text(item.text, cfg.unit_chars) if len(item.text) > cfg.unit_chars else [item.text]
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            # (source, line, text, question, answer, label, split key, 1 if the document continues in the next
            # entry); the other fields ride with the last part
            q, a = (item.question or "", item.answer or "") if last else ("", "")
            docs.append((item.source, item.line, part, q, a, item.label if last else None, key, 0 if last else 1))
            chars += len(part) + len(q) + len(a)
            if chars >= cfg.unit_chars:
                yield UnitJob(number, str(work / f"unit-{number:06d}.bin"), docs, issues)
                docs, issues, chars, number = [], [], 0, number + 1
    if docs or issues:
        yield UnitJob(number, str(work / f"unit-{number:06d}.bin"), docs, issues)


def tokenize_units(cfg: PrepareConfig, paths: list[Path], tok_info: TokenizerInfo, work: Path) -> tuple[int, int]:
    """Tokenize every unit not already in ``work``; returns (units, units found done)."""
    from tqdm import tqdm

    progress = ReadProgress()
    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not cfg.progress or None,
               dynamic_ncols=True, mininterval=0.5)
    settings = (Path(tok_info.path).read_text(encoding="utf-8"), tok_info.dtype.str, cfg.format, cfg.max_piece_chars)
    n_units = resumed = docs = tokens = 0
    t0 = time.perf_counter()

    def account(stats: tuple[int, int]) -> None:
        nonlocal docs, tokens
        docs, tokens = docs + stats[0], tokens + stats[1]
        bar.update(progress.bytes_read - bar.n)
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{docs / dt:,.0f} docs/s {tokens / dt:,.0f} tok/s", refresh=False)

    pool, saved_env = None, os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        # W workers = this process + W-1 spawned ones: this process tokenizes a unit whenever the spawned
        # workers have enough queued, rather than wait for them (and it needs no start-up, unlike them).
        _init_worker(settings)
        if cfg.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(cfg.workers - 1, initializer=_init_worker, initargs=(settings,))
        pending = []
        for job in iter_units(cfg, paths, work, progress):
            n_units += 1
            if _unit_ok(Path(job.path)):
                resumed += 1
                account((0, 0))
                continue
            if pool is not None and len(pending) < 2 * (cfg.workers - 1):
                pending.append(pool.apply_async(_tokenize_job, (job,)))
            else:
                account(_tokenize_job(job))
            while pending and pending[0].ready():
                account(pending.pop(0).get())
            _fault("prepare.unit", n_units - len(pending))
        for result in pending:
            account(result.get())
        bar.update(progress.bytes_read - bar.n)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if saved_env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_env
        bar.close()
    return n_units, resumed


_WORKER: dict = {}


def _init_worker(settings: tuple) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core
    tok_json, dtype, fmt, max_piece = settings
    _WORKER.update(tok=encoder(Tokenizer.from_str(tok_json)), dtype=np.dtype(dtype), format=fmt, max_piece=max_piece)


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut a long text into pieces of at most ``max_chars`` characters, before a space that follows a non-space.

    Byte-level BPE pre-tokenizers (GPT-2, Llama 3, ours) start a new pre-token there, so the pieces encode to
    exactly the ids of the whole text; only a text with no such space in the second half of a window is cut
    hard. Keeps tokenization time and memory bounded for single-line documents of many megabytes.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind(" ", start + max_chars // 2, end)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + max_chars // 2, cut)
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_texts(texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (long texts through :func:`split_text`), in the worker's tokenizer."""
    tok, max_piece = _WORKER["tok"], _WORKER["max_piece"]
    pieces, owner = [], []
    for i, text in enumerate(texts):
        parts = split_text(text, max_piece) if len(text) > max_piece else [text]
        pieces += parts
        owner += [i] * len(parts)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the same ids without offsets (tokenizers >= 0.20)
    encs = encode(pieces, add_special_tokens=False)
    out: list[list[int]] = [[] for _ in texts]
    for i, enc in zip(owner, encs):
        out[i].extend(enc.ids)
    return [np.array(ids, np.int64) for ids in out]


def _tokenize_job(job: UnitJob) -> tuple[int, int]:
    """Tokenize one unit and write it; returns (documents, tokens). Body: every text, then every question, then
    every answer (empty where the format has none)."""
    fmt = _WORKER["format"]
    none = [np.zeros(0, np.int64)] * len(job.docs)
    docs = encode_texts([d[2] for d in job.docs])
    questions = encode_texts([d[3] for d in job.docs]) if fmt == "qa" else none
    answers = encode_texts([d[4] for d in job.docs]) if fmt in ("qa", "summarization") else none
    meta = {"docs": [[d[0], d[1], d[6], d[7], d[5]] for d in job.docs], "issues": job.issues}
    lengths = np.array([[len(t), len(q), len(a)] for t, q, a in zip(docs, questions, answers)], np.int64).reshape(-1, 3)
    dtype = _WORKER["dtype"]
    body = np.concatenate([*docs, *questions, *answers]).astype(dtype) if docs else np.zeros(0, dtype)
    head = json.dumps(meta, separators=(",", ":")).encode()
    raw = b"".join([UNIT_HEADER.pack(len(head)), head, lengths.tobytes(), body.tobytes()])
    # not fsynced (~6 ms a unit here): a unit torn by a crash fails its zstd checksum on resume and is redone
    write_atomic(Path(job.path), zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw), durable=False)
    return len(docs), int(lengths.sum())


def _split_key(text: str, *others: str | None) -> str:
    """A content hash, so identical documents always land in the same split (no train/val leak by duplicates).
    A classification label is not hashed: the same text with two labels stays in one split."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8)
    for other in others:
        if other is not None:
            h.update(b"\0" + other.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def is_val(split_key: str, seed: int, fraction: float) -> bool:
    """Pure: whether a document goes to val, from its content hash and the seed."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{split_key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


@dataclass
class ValSplit:
    """Which split each kept document goes to. Normally by content hash (:func:`is_val`). When that holds out
    nothing although ``val_fraction > 0`` (a few long documents: one book, one .txt file), the tail is held out
    instead: packed text from token ``tail_from`` of the stream on (the document there is cut in two, each part
    ending with eos), or records from record number ``tail_from`` on."""

    fraction: float
    seed: int
    mode: str
    tail_from: int | None = None
    seen: int = 0  # tokens (packed text, eos included) or records assigned so far

    @classmethod
    def plan(cls, cfg: PrepareConfig, work: Path, n_units: int, dtype: np.dtype) -> "ValSplit":
        split = cls(cfg.val_fraction, cfg.seed, cfg.mode)
        if cfg.val_fraction <= 0:
            return split
        lengths, pending = [], 0
        for k in range(n_units):  # stops at the first document the hash holds out: cheap on real corpora
            meta, doc_tokens, _, _ = read_unit(work / f"unit-{k:06d}.bin", dtype)
            for (_, _, key, more, _), toks in zip(meta["docs"], doc_tokens):
                pending += len(toks)
                if more:
                    continue
                if pending >= max(cfg.min_doc_tokens, 1):
                    if is_val(key, cfg.seed, cfg.val_fraction):
                        return split
                    lengths.append(pending)
                pending = 0
        if split.mode == "pretrain":
            total = sum(lengths) + len(lengths)  # each document ends with eos
            split.tail_from = total - max(1, math.ceil(cfg.val_fraction * total))
        elif len(lengths) >= 2:
            split.tail_from = len(lengths) - max(1, round(cfg.val_fraction * len(lengths)))
        return split

    def assign(self, key: str, toks: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(split, tokens) for one document: one pair, or two where the val tail starts inside it."""
        if self.tail_from is None:
            yield ("val" if is_val(key, self.seed, self.fraction) else "train"), toks
        elif self.mode != "pretrain":
            self.seen += 1
            yield ("val" if self.seen > self.tail_from else "train"), toks
        else:
            cut = min(max(self.tail_from - self.seen, 0), len(toks))
            self.seen += len(toks) + 1
            if cut > 0:
                yield "train", toks[:cut]
            if cut < len(toks):
                yield "val", toks[cut:]

    def describe(self) -> dict:
        """For index.json: how val was chosen."""
        if self.tail_from is None:
            return {"method": "hash", "fraction": self.fraction}
        return {"method": "tail", "fraction": self.fraction,
                "from_token" if self.mode == "pretrain" else "from_record": self.tail_from}


def _unit_ok(path: Path) -> bool:
    try:
        read_unit(path, np.dtype("<u4"), check_only=True)
        return True
    except (OSError, ValueError, zstandard.ZstdError):
        return False


def read_unit(path: Path, dtype: np.dtype, check_only: bool = False):
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    (n,) = UNIT_HEADER.unpack_from(raw)
    meta = json.loads(raw[UNIT_HEADER.size:UNIT_HEADER.size + n])
    if check_only:
        return None
    pos = UNIT_HEADER.size + n
    k = len(meta["docs"])
    lengths = np.frombuffer(raw, np.int64, 3 * k, pos).reshape(-1, 3)
    body = np.frombuffer(raw, dtype, offset=pos + lengths.nbytes)
    ends = np.cumsum(lengths.T.reshape(-1))
    parts = np.split(body, ends[:-1]) if len(ends) else []
    return meta, parts[:k], parts[k:2 * k], parts[2 * k:]


# --- stage 2: pack and write ----------------------------------------------------------------------


def label_names(work: Path, n_units: int, dtype: np.dtype) -> list[str]:
    """Every label of the (valid) input records, sorted by :func:`label_order`; a label's id is its position."""
    names = {d[4] for k in range(n_units) for d in read_unit(work / f"unit-{k:06d}.bin", dtype)[0]["docs"]}
    return sorted(names - {None}, key=label_order)


def label_order(name: str) -> tuple:
    """Integer-looking names first, numerically ("2" before "10"), then the others by code point."""
    try:
        return (0, int(name), name)
    except ValueError:
        return (1, 0, name)


def record_middle(mode: str, separators: tuple[np.ndarray, np.ndarray], question: np.ndarray) -> np.ndarray:
    """The tokens between a record's text and its answer: the separator (summarization), question separator +
    question + answer separator (qa), nothing (classification: the sample is ``text + eos``). ``separators`` =
    (question separator, separator before the answer) as token ids."""
    question_sep, sep = separators
    if mode == "qa":
        return np.concatenate([question_sep, question.astype(sep.dtype), sep])
    return sep if mode == "summarization" else sep[:0]


def write_output(cfg: PrepareConfig, paths: list[Path], tok: TokenizerInfo, separators: tuple[np.ndarray, np.ndarray],
                 work: Path, n_units: int) -> dict:
    """Stage 2: pack every unit's documents into the shards of their split and write the documents file, the
    report, the tokenizer copy and ``index.json`` (last); returns the index."""
    out = Path(cfg.out)
    labels = label_names(work, n_units, tok.dtype) if cfg.mode == "classification" else None
    packing = _Packing(cfg, paths, tok, separators, labels, ValSplit.plan(cfg, work, n_units, tok.dtype))
    docs_sha = _write_documents(out, lambda docs_out: packing.pack(work, n_units, docs_out))
    splits = {s: packing.writers[s].close() for s in SPLITS}
    if packing.doc_id == 0:
        raise DataError(f"{cfg.inputs[0]}: no usable documents in the input ({_summarize(packing.counts)})")
    counts, issues = packing.counts, packing.issues
    report = {"documents": {"kept": packing.doc_id, **{s: packing.n_docs[s] for s in SPLITS}},
              "issue_counts": dict(sorted(counts.items())), "issues": issues, "issues_listed": len(issues)}
    write_atomic(out / REPORT_NAME, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    extra = {"labels": {"names": labels, "counts": packing.label_counts}} if labels is not None else {}
    index = make_index(tokenizer=tok.to_dict(), dtype=tok.dtype, segment_len=cfg.segment_len,
                       sample_segments=cfg.sample_segments, mode=cfg.mode, splits=splits, zstd_level=cfg.zstd_level,
                       version=LABEL_FORMAT_VERSION if labels is not None else FORMAT_VERSION, **extra,
                       documents={"name": DOCS_NAME, "bytes": (out / DOCS_NAME).stat().st_size,
                                  "sha256": docs_sha, "num_documents": packing.doc_id},
                       sources=[{"path": str(p), "bytes": p.stat().st_size} for p in paths],
                       args=cfg.output_args(), report=dict(sorted(counts.items())),
                       val_split=packing.val_split.describe())
    for s in SPLITS:
        index["splits"][s]["num_documents"] = packing.n_docs[s]
    # The tokenizer travels with its data (train, export and generate find it here); its sha256 is in the index.
    write_atomic(out / TOKENIZER_NAME, Path(tok.path).read_bytes())
    write_index(out, index)
    return index


def _write_documents(out: Path, fill) -> str:
    """The documents file, written by ``fill(stream)`` as zstd through a temp file, fsynced and renamed into
    place; returns its sha256."""
    docs_tmp = out / (DOCS_NAME + ".tmp")
    docs_sha = hashlib.sha256()
    docs_file = open(docs_tmp, "wb")
    with zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(
            _HashingWriter(docs_file, docs_sha), closefd=False) as docs_out:
        fill(docs_out)
    commit_file(docs_file, docs_tmp, out / DOCS_NAME)
    return docs_sha.hexdigest()


class _Packing:
    """Stage 2's running state: the shard writer and packer of each split, the sample, document and label
    counts, and the issues noted (the first ``MAX_REPORTED_ISSUES`` listed, all counted)."""

    def __init__(self, cfg: PrepareConfig, paths: list[Path], tok: TokenizerInfo,
                 separators: tuple[np.ndarray, np.ndarray], labels: list[str] | None, val_split: ValSplit):
        self.cfg, self.paths, self.tok, self.separators, self.val_split = cfg, paths, tok, separators, val_split
        self.L = cfg.segment_len * cfg.sample_segments
        self.label_ids = {name: i for i, name in enumerate(labels or [])}
        self.label_counts = {s: [0] * len(self.label_ids) for s in SPLITS} if labels is not None else None
        self.writers = {s: ShardWriter(Path(cfg.out), s, tok.dtype, shard_bytes=cfg.shard_bytes,
                                       frame_bytes=cfg.frame_bytes, level=cfg.zstd_level, labels=labels is not None)
                        for s in SPLITS}
        self.packers = {s: StreamPacker(sample_tokens=self.L, pad_id=tok.pad_id, dtype=tok.dtype) for s in SPLITS}
        self.n_samples = dict.fromkeys(SPLITS, 0)
        self.n_docs = dict.fromkeys(SPLITS, 0)
        self.counts: Counter = Counter()
        self.issues: list[dict] = []
        self.shards_done = self.doc_id = 0

    def note(self, source, line, reason, detail="", kept=False) -> None:
        self.counts[reason] += 1
        if len(self.issues) < MAX_REPORTED_ISSUES:
            self.issues.append({"file": str(self.paths[source]), "line": line, "reason": reason, "detail": detail,
                                "kept": kept})

    def emit(self, split: str, samples) -> None:
        for s in samples:
            self.writers[split].add(s)
        self.n_samples[split] += len(samples)
        if sum(len(w.entries) for w in self.writers.values()) > self.shards_done:
            self.shards_done += 1
            _fault("prepare.shard", self.shards_done)

    def pack(self, work: Path, n_units: int, docs_out) -> None:
        """Every unit of stage 1 in order (a long document cut into parts across units is joined first); each
        kept document's row goes to ``docs_out``."""
        from tqdm import tqdm

        parts: list[np.ndarray] = []
        cfg = self.cfg
        for k in tqdm(range(n_units), desc="pack", unit="unit", disable=not cfg.progress or None, dynamic_ncols=True):
            meta, doc_tokens, questions, answers = read_unit(work / f"unit-{k:06d}.bin", self.tok.dtype)
            for issue in meta["issues"]:
                self.note(*issue)
            for (source, line, key, more, label), toks, question, answer in zip(meta["docs"], doc_tokens, questions,
                                                                                answers):
                if more or parts:  # a long document cut into parts across entries (and units)
                    parts.append(toks)
                    if more:
                        continue
                    toks, parts = np.concatenate(parts), []
                for row in self.add(source, line, key, label, toks, question, answer):
                    docs_out.write((json.dumps(row, separators=(",", ":")) + "\n").encode())
        for split in SPLITS:
            self.emit(split, self.packers[split].finish())

    def add(self, source, line, key, label, toks: np.ndarray, question: np.ndarray, answer: np.ndarray) -> list[dict]:
        """Pack one whole document into its split (two parts where the val tail starts inside it); the
        documents-file rows of what was kept (a document too short, or a part too long, is noted instead)."""
        if len(toks) < max(self.cfg.min_doc_tokens, 1):
            self.note(source, line, "too_short", f"{len(toks)} tokens")
            return []
        if self.tok.bos_at_doc_start:  # the tokenizer's template starts every text with its BOS (Llama 3)
            toks = np.concatenate([np.array([self.tok.bos_id], self.tok.dtype), toks])
        rows = (self._add_part(split, source, line, label, part, question, answer)
                for split, part in self.val_split.assign(key, toks))
        return [row for row in rows if row is not None]

    def _add_part(self, split: str, source, line, label, toks: np.ndarray, question: np.ndarray,
                  answer: np.ndarray) -> dict | None:
        cfg, tok, L, mode = self.cfg, self.tok, self.L, self.cfg.mode
        row = {"id": self.doc_id, "split": split, "source": source, "line": line, "tokens": len(toks)}
        if mode == "pretrain":
            sample, position = divmod(self.packers[split].total, L)
            self.emit(split, self.packers[split].add(self.doc_id, np.append(toks, np.array([tok.eos_id], tok.dtype))))
        else:
            middle = record_middle(mode, self.separators, question)
            if mode == "qa" and len(middle) + min(len(answer), L // 2 - 1) >= L:
                self.note(source, line, "too_long", f"question and separators take {len(middle)} of {L} tokens")
                return None
            sample, position = self.n_samples[split], 0
            self.emit(split, [answer_sample(self.doc_id, toks, middle, answer, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                            segment_len=cfg.segment_len, sample_segments=cfg.sample_segments,
                                            dtype=tok.dtype, label=self.label_ids.get(label))])
            if self.label_counts is not None:
                self.label_counts[split][self.label_ids[label]] += 1
                row["label"] = self.label_ids[label]
        self.n_docs[split] += 1
        self.doc_id += 1
        return {**row, "sample": sample, "position": position}


def _summarize(counts: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "empty input"


class _HashingWriter:
    """A file wrapper that feeds every written byte to a hash (the documents file's sha256)."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _remove_stale(out: Path, index: dict) -> None:
    """Delete shards of earlier builds that the new index does not list (only our own file names)."""
    keep = {e["name"] for split in index["splits"].values() for e in split["shards"]}
    for split in SPLITS:
        for f in out.glob(f"{split}-*{SHARD_SUFFIX}*"):
            if f.name not in keep:
                f.unlink(missing_ok=True)
    (out / (DOCS_NAME + ".tmp")).unlink(missing_ok=True)
