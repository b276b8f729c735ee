"""`infinitrain eval summarize`: ROUGE-1/2/L of generated summaries at the paper's BookSum decoding (temperature 0.5,
top-p 0.95, 1024 tokens).

Each JSONL record gives a document and a reference summary; the prompt is ``document + separator`` (the same
separator ``infinitrain prepare --format summarization`` trains with), the model continues it until eos or
the token budget, and ``rouge-score`` (``eval`` extra) scores the continuation against the reference: F1 per
metric, averaged over records, plus the paper's "overall" (geometric mean of R-1, R-2, R-L).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from infinitrain.data_tools.prepare import PrepareConfig
from infinitrain.errors import ConfigError, DataError
from infinitrain.infer.codec import Codec
from infinitrain.infer.generate import Sampling, generate
from infinitrain.infer.textgen import sampling_generator

SEPARATOR = PrepareConfig.separator  # "\n\nSummary:\n", as prepared for training
METRICS = ("rouge1", "rouge2", "rougeL")


def rouge_scorer():
    try:
        from rouge_score import rouge_scorer as rs
    except ImportError:
        raise ConfigError("eval summarize needs rouge-score: pip install 'infinitrain[eval]'") from None
    return rs.RougeScorer(list(METRICS), use_stemmer=True)


def read_records(path: str | Path, document_field: str, summary_field: str, limit: int | None = None,
                 ) -> list[tuple[str, str]]:
    """(document, reference) pairs from a JSONL file; a bad line is a DataError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}:{n}: invalid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p}:{n}: expected a JSON object")
            for key in (document_field, summary_field):
                if not isinstance(rec.get(key), str):
                    raise DataError(f"{p}:{n}: no string field {key!r} (use --document-field / --summary-field)")
            out.append((rec[document_field], rec[summary_field]))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{p}: no records")
    return out


@dataclass(frozen=True, kw_only=True)
class SummarizeConfig:
    data: str
    document_field: str = "document"
    summary_field: str = "summary"
    separator: str = SEPARATOR
    max_new_tokens: int = 1024
    temperature: float = 0.5
    top_p: float | None = 0.95
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 4
    max_records: int | None = None

    def __post_init__(self) -> None:
        Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                 top_k=self.top_k)  # validates the decoding settings
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"--max-records must be >= 1, got {self.max_records}")


@dataclass
class SummarizeReport:
    """What ``eval summarize`` writes to JSON (schema version 1); scores are F1 × 100."""

    config: dict[str, Any]
    model: str
    rouge1: float = 0.0
    rouge2: float = 0.0
    rougeL: float = 0.0
    overall: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    schema: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_summarize(model, codec: Codec, cfg: SummarizeConfig, *, model_name: str = "", progress: bool = True,
                  ) -> SummarizeReport:
    from tqdm import tqdm

    scorer = rouge_scorer()
    pairs = read_records(cfg.data, cfg.document_field, cfg.summary_field, cfg.max_records)
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, eos_id=codec.eos_id)
    gen = sampling_generator(model, cfg.seed)
    report = SummarizeReport(config=asdict(cfg), model=model_name)
    t0 = time.perf_counter()
    bar = tqdm(total=len(pairs), desc="summarize", unit="doc", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    for i in range(0, len(pairs), cfg.batch_size):
        batch = pairs[i:i + cfg.batch_size]
        prompts = [codec.encode_document(doc + cfg.separator) for doc, _ in batch]
        outs = generate(model, prompts, sampling, generator=gen)
        for (doc, ref), p, out in zip(batch, prompts, outs):
            if codec.eos_id is not None and out and out[-1] == codec.eos_id:
                out = out[:-1]
            text = codec.decode(out)
            scores = scorer.score(ref, text)
            report.records.append({"prompt_tokens": len(p), "new_tokens": len(out), "summary": text,
                                   **{m: 100 * scores[m].fmeasure for m in METRICS}})
        bar.update(len(batch))
    bar.close()
    for m in METRICS:
        setattr(report, m, sum(r[m] for r in report.records) / len(report.records))
    r1, r2, rl = report.rouge1, report.rouge2, report.rougeL
    report.overall = math.exp((math.log(r1) + math.log(r2) + math.log(rl)) / 3) if min(r1, r2, rl) > 0 else 0.0
    report.seconds = time.perf_counter() - t0
    return report


def format_table(report: SummarizeReport) -> str:
    c = report.config
    return (f"{'R-1':>7s} {'R-2':>7s} {'R-L':>7s} {'overall':>8s}\n"
            f"{report.rouge1:>7.2f} {report.rouge2:>7.2f} {report.rougeL:>7.2f} {report.overall:>8.2f}\n"
            f"{len(report.records)} records, temperature {c['temperature']}, top-p {c['top_p']}, "
            f"up to {c['max_new_tokens']} new tokens, in {report.seconds:.1f} s")


def write_outputs(report: SummarizeReport, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summarize.json"
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return path
