"""`infinitrain data verify` and `data inspect`: check every byte of a prepared folder; summarize and decode it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infinitrain.data_tools.dataset import ShardDataset
from infinitrain.atomic import sha256_file
from infinitrain.data_tools.shards import TOKEN_DTYPES, ShardFile, decompress_stream, read_index
from infinitrain.errors import DataError, ShardCorruptError


@dataclass
class VerifyReport:
    files_checked: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)


def verify_dir(directory: str | Path) -> VerifyReport:
    """Check the index, every shard (size, sha256, footer, every frame's checksum and contents) and the documents
    file."""
    directory = Path(directory)
    index = read_index(directory)
    dtype = TOKEN_DTYPES[index["dtype"]]
    report = VerifyReport()
    for split, info in index["splits"].items():
        totals = Counter()
        for entry in info["shards"]:
            report.files_checked += 1
            try:
                totals += _verify_shard(directory / entry["name"], dtype, entry, index)
            except ShardCorruptError as err:
                report.problems.append(str(err))
        if not report.problems and (totals["samples"], totals["tokens"]) != (info["num_samples"], info["num_tokens"]):
            report.problems.append(f"{directory / 'index.json'}: split {split} totals do not match its shards")
        report.samples += totals["samples"]
    tok = directory / "tokenizer.json"  # written by prepare since 0.1 (older folders have none: not a problem)
    if tok.exists():
        report.files_checked += 1
        actual = sha256_file(tok)
        if actual != index["tokenizer"]["sha256"]:
            report.problems.append(f"{tok}: sha256 expected {index['tokenizer']['sha256']} got {actual}")
    docs = index["documents"]
    report.files_checked += 1
    path = directory / docs["name"]
    try:
        actual = sha256_file(path)
        if actual != docs["sha256"]:
            report.problems.append(f"{path}: sha256 expected {docs['sha256']} got {actual}")
        else:
            n = decompress_stream(path.read_bytes(), path).count(b"\n")
            if n != docs["num_documents"]:
                report.problems.append(f"{path}: {n} documents, index says {docs['num_documents']}")
    except FileNotFoundError:
        report.problems.append(f"{path}: missing")
    return report


def _verify_shard(path: Path, dtype: np.dtype, entry: dict, index: dict) -> Counter:
    shard = ShardFile(path, dtype, entry=entry)
    L = index["sample_tokens"]
    n_labels = len(index["labels"]["names"]) if "labels" in index else None  # classification: every sample has one
    totals = Counter()
    for j in range(len(shard.frames)):
        for packed in shard.read_frame(j):
            n = len(packed.tokens) - 1
            spans_ok = np.all((0 <= packed.loss_spans) & (packed.loss_spans <= n))
            label = packed.label
            label_ok = label is None if n_labels is None else label is not None and 0 <= label < n_labels
            if (n > L or n % index["segment_len"] or not spans_ok or not label_ok
                    or np.any(packed.tokens >= index["tokenizer"]["vocab_size"])):
                raise ShardCorruptError(f"{path}: frame at byte {shard.frames[j][0]} holds an invalid sample")
            totals["samples"] += 1
            totals["tokens"] += n
            totals["loss_tokens"] += int((packed.loss_spans[:, 1] - packed.loss_spans[:, 0]).sum())
    if (totals["tokens"], totals["loss_tokens"]) != (entry["num_tokens"], entry["num_loss_tokens"]):
        raise ShardCorruptError(f"{path}: token counts do not match the index entry")
    return totals


def read_documents_table(directory: str | Path) -> list[dict]:
    """The rows of documents.jsonl.zst (checked against its sha256)."""
    directory = Path(directory)
    docs = read_index(directory)["documents"]
    path = directory / docs["name"]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != docs["sha256"]:
        raise ShardCorruptError(f"{path}: sha256 expected {docs['sha256']} got {hashlib.sha256(data).hexdigest()}")
    return [json.loads(line) for line in decompress_stream(data, path).splitlines()]


def inspect_dir(directory: str | Path) -> dict:
    """Counts per split, the padding each split costs (one sample per row, and packed as the trainer packs
    summarization/QA samples), the document-length histogram (powers of two), and the shape settings."""
    from infinitrain.train.packing import padding_report

    directory = Path(directory)
    index = read_index(directory)
    docs = read_documents_table(directory)
    hist = Counter(1 << max(0, int(d["tokens"]).bit_length() - 1) for d in docs)
    return {"mode": index["mode"], "segment_len": index["segment_len"], "sample_segments": index["sample_segments"],
            "dtype": index["dtype"], "vocab_size": index["tokenizer"]["vocab_size"], **_labels(index),
            "splits": {s: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
                       | (padding_report(ShardDataset(directory, s)) if info["num_samples"] else {})
                       for s, info in index["splits"].items()},
            "doc_tokens_histogram": {f">={k}": hist[k] for k in sorted(hist)},
            "issues": index.get("report", {})}


def _labels(index: dict) -> dict:
    if "labels" not in index:
        return {}
    labels = index["labels"]
    return {"labels": {name: {split: counts[i] for split, counts in labels["counts"].items()}
                       for i, name in enumerate(labels["names"])}}


def decode_sample(directory: str | Path, split: str, i: int, tokenizer_path: str) -> dict:
    """Sample ``i`` decoded with the tokenizer that made it (checked by sha256)."""
    from infinitrain.data_tools.tokenizer import load_tokenizer

    ds = ShardDataset(directory, split)
    tok, info = load_tokenizer(tokenizer_path)
    if info.sha256 != ds.index["tokenizer"]["sha256"]:
        raise DataError(f"{info.path}: not the tokenizer these shards were made with (sha256 differs from index.json)")
    if not 0 <= i < len(ds):
        raise DataError(f"{directory}: split {split} has {len(ds)} samples, no sample {i}")
    s = ds[i]
    n_real = int(np.flatnonzero(s.loss_mask).max() + 1) if s.loss_mask.any() else 0
    label = {} if s.label is None else {"label": ds.label_names[s.label]}
    return {"sample_id": s.sample_id, **label, "tokens": len(s.input_ids), "loss_tokens": int(s.loss_mask.sum()),
            "doc_starts": s.doc_starts.tolist(), "doc_ids": s.doc_ids.tolist(),
            "text": tok.decode(s.input_ids[:n_real].tolist(), skip_special_tokens=False)}

