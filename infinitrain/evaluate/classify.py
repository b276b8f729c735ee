"""`infinitrain eval classify`: accuracy, macro-F1 and the confusion matrix of a classifier on a prepared split.

Each sample of a ``prepare --format classification`` split is one document; its one trained position (the last
text token) is where the class head reads. The document is streamed from a fresh state one segment per call,
so memory stays constant however long it is; only tokens up to the read position are fed. ``memory=False``
runs the same model with the memory read off (``evaluate.switches.memory_read_off``): every segment then sees
only itself, which tells how much of the accuracy the memory carried.
Shape legend: B documents in a batch, S segment length, C classes.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infinitrain.errors import ConfigError, DataError
from infinitrain.evaluate.ppl import PplConfig
from infinitrain.evaluate.switches import memory_read_off


@dataclass(frozen=True, kw_only=True)
class ClassifyConfig(PplConfig):
    """data, split, memory, batch_size, max_documents: as ``eval ppl`` (documents of a prepared split)."""

    batch_size: int = 8


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    m = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(m, (truth, pred), 1)
    return m


def per_class(m: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 per class from a confusion matrix (0 where undefined, as scikit-learn's default)."""
    tp = np.diag(m).astype(np.float64)
    predicted, actual = m.sum(0), m.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def macro_f1(m: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes present in the truth or the predictions."""
    seen = (m.sum(0) + m.sum(1)) > 0
    return float(per_class(m)["f1"][seen].mean()) if seen.any() else 0.0


@torch.no_grad()
def class_logits(model, docs: list[np.ndarray], segment_len: int) -> torch.Tensor:
    """(B, C) class logits at the last token of each document (1-D token arrays), each streamed from a fresh
    state one segment per call; rows shorter than the longest are padded after their end (causal: unread)."""
    device = next(model.parameters()).device
    B, n = len(docs), max(len(d) for d in docs)
    ids = torch.zeros(B, n, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = torch.from_numpy(d.astype(np.int64))
    last = torch.tensor([len(d) - 1 for d in docs])
    out = torch.zeros(B, len(model.config.labels))
    state = None
    for a in range(0, n, segment_len):
        b = min(n, a + segment_len)
        o = model(ids[:, a:b].to(device), state)
        state = o.state
        here = (last >= a) & (last < b)
        if here.any():
            rows = here.nonzero().squeeze(1)
            out[rows] = o.logits[rows, last[rows] - a].float().cpu()
    return out


def run_classify(model, cfg: ClassifyConfig, *, model_name: str = "", progress: bool = False) -> dict[str, Any]:
    """Predict every document of the split; the report (accuracy, macro-F1, confusion, per class, chance)."""
    from infinitrain.data_tools.dataset import ShardDataset

    labels = model.config.labels
    if labels is None:
        raise ConfigError(f"{model_name or 'the model'}: not a classifier (its config has no labels; train with "
                          "task: classification)")
    ds = ShardDataset(cfg.data, cfg.split)
    if ds.label_names is None:
        raise DataError(f"{cfg.data}: no labels in index.json (prepare it with --format classification)")
    if list(ds.label_names) != list(labels):
        raise ConfigError(f"{cfg.data}: label names {ds.label_names} differ from the model's {list(labels)}")
    n = len(ds) if cfg.max_documents is None else min(len(ds), cfg.max_documents)
    if n == 0:
        raise DataError(f"{cfg.data}: split {cfg.split!r} has no samples")
    S = model.config.segment_len
    truth, pred, read_at = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="classify", unit="doc", file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    with memory_read_off(model) if not cfg.memory else nullcontext():
        for a in range(0, n, cfg.batch_size):
            docs = []
            for i in range(a, min(n, a + cfg.batch_size)):
                s = ds[i]
                where = np.flatnonzero(s.loss_mask)
                if s.label is None or s.label < 0 or len(where) != 1:
                    raise DataError(f"{cfg.data}: {cfg.split} sample {i} has no label or not one trained position")
                docs.append(s.input_ids[:where[0] + 1])
                truth.append(int(s.label))
                read_at.append(int(where[0]))
            pred += class_logits(model, docs, S).argmax(-1).tolist()
            if bar is not None:
                bar.update(len(docs))
    if bar is not None:
        bar.close()
    t, p = np.array(truth), np.array(pred)
    m = confusion_matrix(t, p, len(labels))
    pc = per_class(m)
    counts = np.bincount(t, minlength=len(labels))
    return {"model": model_name, "data": cfg.data, "split": cfg.split, "memory": cfg.memory, "documents": n,
            "labels": list(labels), "accuracy": float((t == p).mean()), "macro_f1": macro_f1(m),
            "majority_baseline": float(counts.max() / n), "uniform_chance": 1.0 / len(labels),
            "confusion": m.tolist(), "per_class": {name: {k: float(v[c]) for k, v in pc.items()}
                                                   for c, name in enumerate(labels)},
            "read_segment": {"min": min(read_at) // S, "mean": float(np.mean(np.array(read_at) // S)),
                             "max": max(read_at) // S},
            "segment_len": S, "seconds": time.time() - t0, "config": asdict(cfg)}


def format_table(report: dict[str, Any]) -> str:
    """Accuracy and macro-F1 with the baselines, per-class P/R/F1, and the confusion matrix (rows = truth)."""
    labels = report["labels"]
    w = max(8, *(len(x) for x in labels))
    rs = report["read_segment"]
    lines = [f"{report['documents']} documents ({report['split']}), memory {'on' if report['memory'] else 'OFF'}; "
             f"read at segment {rs['min']}..{rs['max']} (mean {rs['mean']:.1f}) of {report['segment_len']} tokens",
             f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   "
             f"(majority class {report['majority_baseline']:.4f}, uniform chance {report['uniform_chance']:.4f})",
             "", f"{'class':<{w}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for name in labels:
        c = report["per_class"][name]
        lines.append(f"{name:<{w}} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:7.4f} {int(c['support']):8d}")
    lines += ["", "confusion (rows: true class, columns: predicted)",
              " " * w + "".join(f" {x[:w]:>{w}}" for x in labels)]
    for name, row in zip(labels, report["confusion"]):
        lines.append(f"{name:<{w}}" + "".join(f" {v:>{w}d}" for v in row))
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path | None]:
    """classify.json and the classify.png confusion heatmap, rows normalised to the true class's documents
    (classify-no-memory.* with the memory off), in ``out_dir``; the PNG is None without matplotlib."""
    from infinitrain.evaluate import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "classify" if report["memory"] else "classify-no-memory"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    rows = [[v / max(1, sum(row)) for v in row] for row in report["confusion"]]
    png = plots.heatmap(out / f"{stem}.png", rows, rows=report["labels"], cols=report["labels"],
                        title=f"memory {'on' if report['memory'] else 'off'}: accuracy {100 * report['accuracy']:.1f}%",
                        xlabel="predicted class", ylabel="true class", label="share of the true class, %", cmap="Blues")
    return path, png


def classify_texts(model, codec, texts: list[str], *, memory: bool = True) -> list[dict[str, float]]:
    """Class probabilities of each text, read at its last token (what training reads), each text streamed from a
    fresh state one segment per call; ``memory=False`` reads an empty memory in every segment (``--no-memory``)."""
    docs = [np.asarray(codec.encode_document(t), np.int64) for t in texts]
    for i, d in enumerate(docs):
        if len(d) <= (codec.bos_id is not None):
            raise ConfigError(f"prompt {i + 1} is empty (it encodes to no tokens)")
    with memory_read_off(model) if not memory else nullcontext():
        probs = class_logits(model, docs, model.config.segment_len).softmax(-1)
    return [dict(zip(model.config.labels, row.tolist())) for row in probs]
