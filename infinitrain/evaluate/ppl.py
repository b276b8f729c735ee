"""`infinitrain eval ppl`: loss and perplexity per segment index over whole documents (every segment, not the last one
only).

Documents are rebuilt from a prepared split (``ShardDataset``): in ``pretrain`` mode the samples are consecutive
windows of one stream, so a document runs from one ``doc_start`` to the next across sample boundaries; in
``summarization`` mode each sample is its own document (loss on the summary only, as trained). Each document is
streamed from a fresh state, one segment per call, so memory stays constant however long it is; the loss of
position t (predicting token t+1) is counted in segment t // S. The target after a document's last token is the
next document's first token and is not counted. ``memory=False`` runs the same model with the memory read off.
Shape legend: B documents in a batch, S segment length, V vocabulary.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from infinitrain.errors import ConfigError, DataError
from infinitrain.evaluate import plots
from infinitrain.evaluate.switches import memory_read_off


class Document(NamedTuple):
    """One whole document: inputs (n,), their next-token targets (n,), and which targets count (n,) bool."""

    input_ids: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def iter_documents(ds) -> Iterator[Document]:
    """The documents of a ``ShardDataset`` split in order (see the module docstring)."""
    if ds.index.get("mode", "pretrain") != "pretrain":
        for i in range(len(ds)):
            s = ds[i]
            yield _trim(Document(s.input_ids, s.targets, s.loss_mask > 0))
        return
    parts: list[Document] = []
    for i in range(len(ds)):
        s = ds[i]
        cuts = sorted(set(int(x) for x in s.doc_starts) | {0, len(s.input_ids)})
        for a, b in zip(cuts, cuts[1:]):
            if a in s.doc_starts and parts:
                yield _join(parts, ends_before_next=True)
                parts = []
            parts.append(Document(s.input_ids[a:b], s.targets[a:b], s.loss_mask[a:b] > 0))
    if parts:
        yield _join(parts, ends_before_next=False)


def _join(parts: list[Document], *, ends_before_next: bool) -> Document:
    doc = Document(*(np.concatenate(x) for x in zip(*parts)))
    if ends_before_next:
        doc.mask[-1] = False  # its target is the next document's first token
    return _trim(doc)


def _trim(doc: Document) -> Document:
    """Drop trailing positions whose targets do not count (padding after the last document)."""
    kept = np.flatnonzero(doc.mask)
    n = int(kept[-1]) + 1 if len(kept) else 0
    return Document(doc.input_ids[:n], doc.targets[:n], doc.mask[:n])


@torch.no_grad()
def segment_losses(model, docs: list[Document], segment_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed loss and target count per segment index (both (N,), N = segments of the longest document) for a
    batch of documents, each streamed from a fresh state in segment-sized calls."""
    device = next(model.parameters()).device
    B, S = len(docs), segment_len
    n_seg = max(math.ceil(len(d.input_ids) / S) for d in docs)
    L = n_seg * S
    ids = torch.zeros(B, L, dtype=torch.long)
    tgt = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, d in enumerate(docs):
        n = len(d.input_ids)
        ids[b, :n], tgt[b, :n] = torch.from_numpy(d.input_ids), torch.from_numpy(d.targets)
        mask[b, :n] = torch.from_numpy(d.mask)
    ends = torch.tensor([len(d.input_ids) for d in docs])
    loss_sum, count = np.zeros(n_seg), np.zeros(n_seg, np.int64)
    state, rows = None, torch.arange(B)
    for k in range(n_seg):
        alive = ends[rows] > k * S  # documents that still have tokens in segment k
        if not bool(alive.all()):
            rows, state = rows[alive], _select_rows(state, alive.nonzero().flatten())
        sl = slice(k * S, (k + 1) * S)
        m = mask[rows, sl].to(device)
        out = model(ids[rows, sl].to(device), state, targets=tgt[rows, sl].to(device), loss_mask=m)  # the model's loss
        state = out.state
        loss_sum[k] = float(out.loss_sum)
        count[k] = int(m.sum())
    return loss_sum, count


def _select_rows(x, idx: torch.Tensor):
    """Keep batch rows ``idx`` of every tensor in a (nested NamedTuple) model state."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)]
    if hasattr(x, "_fields"):
        return type(x)(*(_select_rows(v, idx) for v in x))
    return type(x)(_select_rows(v, idx) for v in x)


@dataclass(frozen=True, kw_only=True)
class PplConfig:
    data: str
    split: str = "val"
    memory: bool = True
    batch_size: int = 4  # documents streamed side by side
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"--max-documents must be >= 1, got {self.max_documents}")


@dataclass
class PplReport:
    """What ``eval ppl`` writes to JSON (schema version 1); ``segments[k]`` is segment index k of every document."""

    config: dict[str, Any]
    model: str
    segment_len: int
    documents: int = 0
    tokens: int = 0
    loss: float = math.nan
    ppl: float = math.nan
    segments: list[dict[str, Any]] = field(default_factory=list)  # {"segment", "tokens", "documents", "loss", "ppl"}
    seconds: float = 0.0
    schema: int = 1
    dtype: str = ""  # the weights' dtype as evaluated (a bf16 run loads as bf16 unless --dtype): compare like with like

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_ppl(model, cfg: PplConfig, *, model_name: str = "", progress: bool = True) -> PplReport:
    """Per-segment-index loss and perplexity over the documents of ``cfg.data``/``cfg.split``."""
    from tqdm import tqdm

    from infinitrain.data_tools.dataset import ShardDataset

    if not (Path(cfg.data) / "index.json").is_file():
        raise DataError(f"{cfg.data}: no index.json (expected a folder written by `infinitrain prepare`)")
    ds = ShardDataset(cfg.data, cfg.split)
    S = model.config.segment_len
    vocab = int(ds.index["tokenizer"]["vocab_size"])
    if vocab > model.config.vocab_size:
        raise DataError(f"{cfg.data}: tokenizer vocabulary ({vocab}) exceeds the model's vocab_size "
                        f"({model.config.vocab_size}); was it prepared with another tokenizer?")
    t0 = time.perf_counter()
    loss_sum, count, docs_per_seg = np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    n_docs, batch = 0, []
    bar = tqdm(desc="ppl", unit="doc", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def flush() -> None:
        nonlocal loss_sum, count, docs_per_seg
        ls, c = segment_losses(model, batch, S)
        n = max(len(loss_sum), len(ls))
        loss_sum, count = _pad(loss_sum, n) + _pad(ls, n), _pad(count, n) + _pad(c, n)
        per_doc = np.zeros(n, np.int64)
        for d in batch:
            per_doc[:math.ceil(len(d.input_ids) / S)] += 1
        docs_per_seg = _pad(docs_per_seg, n) + per_doc
        bar.update(len(batch))
        batch.clear()

    with memory_read_off(model) if not cfg.memory else nullcontext():
        for doc in iter_documents(ds):
            if not doc.mask.any():
                continue
            batch.append(doc)
            n_docs += 1
            if len(batch) == cfg.batch_size:
                flush()
            if cfg.max_documents is not None and n_docs >= cfg.max_documents:
                break
        if batch:
            flush()
    bar.close()
    if n_docs == 0:
        raise DataError(f"{cfg.data}: split {cfg.split!r} has no document with a scored token")
    report = PplReport(config=asdict(cfg), model=model_name, segment_len=S, documents=n_docs,
                       tokens=int(count.sum()), seconds=time.perf_counter() - t0)
    report.loss = float(loss_sum.sum() / count.sum())
    report.ppl = math.exp(report.loss)
    for k, (ls, c, nd) in enumerate(zip(loss_sum, count, docs_per_seg)):
        loss = float(ls / c) if c else math.nan
        report.segments.append({"segment": k, "tokens": int(c), "documents": int(nd), "loss": loss,
                                "ppl": math.exp(loss) if c else math.nan})
    return report


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.zeros(n - len(a), a.dtype)]) if len(a) < n else a


def format_table(report: PplReport, max_rows: int = 40) -> str:
    """One row per segment index (the first and last ones when there are many), then the totals."""
    segs = report.segments
    shown = segs if len(segs) <= max_rows else segs[:max_rows // 2] + [None] + segs[-max_rows // 2:]
    lines = [f"{'segment':>8s} {'tokens from':>12s} {'docs':>6s} {'targets':>9s} {'loss':>8s} {'ppl':>10s}"]
    for s in shown:
        if s is None:
            lines.append(f"{'...':>8s}")
            continue
        lines.append(f"{s['segment']:>8d} {s['segment'] * report.segment_len:>12d} {s['documents']:>6d} "
                     f"{s['tokens']:>9d} {s['loss']:>8.4f} {s['ppl']:>10.3f}")
    mem = "on" if report.config["memory"] else "OFF"
    lines.append(f"all {report.tokens} targets of {report.documents} documents: loss {report.loss:.4f}, "
                 f"ppl {report.ppl:.3f} (memory {mem}, segment {report.segment_len}) in {report.seconds:.1f} s")
    return "\n".join(lines)


def write_outputs(report: PplReport, out_dir: str | Path) -> tuple[Path, Path | None]:
    """``ppl.json`` (``ppl-no-memory.json`` with the memory off) and ``ppl.png``: loss per segment index, with
    both runs drawn when both JSON files are in ``out_dir``. The PNG path is None without matplotlib."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / ("ppl.json" if report.config["memory"] else "ppl-no-memory.json")
    json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    series = {}
    for name, label in (("ppl.json", "memory on"), ("ppl-no-memory.json", "memory off")):
        p = out / name
        if p.is_file():
            try:
                segs = json.loads(p.read_text())["segments"]
            except (ValueError, KeyError):
                continue
            series[label] = ([s["segment"] for s in segs], [s["loss"] for s in segs])
    png = plots.curves(out / "ppl.png", series, title=f"loss per segment index (S = {report.segment_len})",
                       xlabel="segment index in the document", ylabel="loss (nats / token)")
    return json_path, png
