"""`infinitrain eval passkey`: the paper's passkey retrieval, accuracy per (context length, needle depth), at constant
memory.

Prompts are ``infinitrain.data_tools.passkey`` records (the paper's format via the HF blog: task, filler, needle at
the depth, filler, "What is the pass key? The pass key is"), as long as fits in each length. The model continues
each prompt greedily; a sample is correct when the first integer it writes equals the key.
Prompts stream through ``generate`` segment by segment with only the state kept, so a 1M-token prompt needs the
memory of a 1K one. Lengths are tokens: ``1k`` = 1024, ``1m`` = 1024².
"""

from __future__ import annotations

import json
from contextlib import nullcontext
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infinitrain.data_tools.passkey import parse_depths, passkey_records
from infinitrain.errors import ConfigError
from infinitrain.evaluate import plots
from infinitrain.evaluate.switches import memory_read_off
from infinitrain.infer.generate import Sampling, generate
from infinitrain.infer.codec import Codec

UNITS = {"": 1, "k": 1024, "m": 1024**2}


def parse_lengths(spec: str) -> list[int]:
    """'1k,4k,16k,64k,1m' or plain token counts -> sorted unique ints (k = 1024, m = 1024²)."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", part)
        if not m or int(m.group(1)) == 0:
            raise ConfigError(f"--lengths must be comma-separated token counts like 1k,4k,16k,64k; got {spec!r}")
        out.append(int(m.group(1)) * UNITS[m.group(2).lower()])
    return sorted(set(out))


def length_label(n: int) -> str:
    for suffix, unit in (("m", 1024**2), ("k", 1024)):
        if n % unit == 0:
            return f"{n // unit}{suffix.upper()}"
    return str(n)


def first_integer(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@dataclass(frozen=True, kw_only=True)
class PasskeyConfig:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]  # fractions: 0 = needle right after the task (farthest from the question)
    samples: int = 10
    seed: int = 0
    max_new_tokens: int = 10  # Landmark's setting; enough for " 12345."
    memory: bool = True  # False: the memory read is switched off (local attention only)
    batch_size: int = 8
    prefill_chunk: int | None = None  # tokens per prefill call (default one segment)

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ConfigError(f"--lengths must be positive token counts, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"--depths must be percents in [0, 100], got {[100 * d for d in self.depths]}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class PasskeyReport:
    """What ``eval passkey`` writes to JSON (schema version 1)."""

    config: dict[str, Any]
    model: str
    cells: list[dict[str, Any]] = field(default_factory=list)  # one per (length, depth): accuracy, correct, total
    records: list[dict[str, Any]] = field(default_factory=list)  # one per sample
    accuracy: float = 0.0
    seconds: float = 0.0
    schema: int = 1
    memory_tau_scale: float = 1.0  # every memory temperature was multiplied by this at load (--memory-tau-scale)

    def accuracy_grid(self) -> list[list[float]]:
        """[depth][length] accuracies, in the config's order."""
        by = {(c["length"], c["depth"]): c["accuracy"] for c in self.cells}
        return [[by[n, d] for n in self.config["lengths"]] for d in self.config["depths"]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_passkey(model, codec: Codec, cfg: PasskeyConfig, *, model_name: str = "", progress: bool = True,
                ) -> PasskeyReport:
    """Accuracy per (length, depth) over ``cfg.samples`` prompts each (see the module docstring)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    report = PasskeyReport(config={**asdict(cfg), "lengths": list(cfg.lengths), "depths": list(cfg.depths)},
                           model=model_name)
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_id=codec.eos_id)
    total = len(cfg.lengths) * len(cfg.depths) * cfg.samples
    bar = None  # opened once the first prompts are built, so a bad --lengths fails before any bar is drawn
    chunk = cfg.prefill_chunk if cfg.memory else model.config.segment_len  # memory_read_off: one segment per call
    with memory_read_off(model) if not cfg.memory else nullcontext():
        for length in cfg.lengths:
            records = passkey_records(codec.tokenizer, length=length, depths=list(cfg.depths), count=cfg.samples,
                                      seed=cfg.seed + length)
            if bar is None:
                bar = tqdm(total=total, desc="passkey", unit="prompt", file=sys.stderr, disable=not progress,
                           dynamic_ncols=True)
            for i in range(0, len(records), cfg.batch_size):
                batch = records[i:i + cfg.batch_size]
                prompts = [codec.encode_document(r["prompt"]) for r in batch]
                outs = generate(model, prompts, sampling, prefill_chunk=chunk)
                for r, p, out in zip(batch, prompts, outs):
                    text = codec.decode(out)
                    report.records.append({"length": length, "depth": r["depth"], "pass_key": r["pass_key"],
                                           "prompt_tokens": len(p), "output": text,
                                           "correct": first_integer(text) == r["pass_key"]})
                bar.update(len(batch))
    bar.close()
    for length in cfg.lengths:
        for depth in cfg.depths:
            rs = [r for r in report.records if r["length"] == length and r["depth"] == depth]
            correct = sum(r["correct"] for r in rs)
            report.cells.append({"length": length, "depth": depth, "correct": correct, "total": len(rs),
                                 "accuracy": correct / len(rs),
                                 "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rs) / len(rs)})
    report.accuracy = sum(r["correct"] for r in report.records) / len(report.records)
    report.seconds = time.perf_counter() - t0
    return report


def format_table(report: PasskeyReport) -> str:
    """Accuracy (%) with depths as rows and lengths as columns, plus the mean of each column."""
    lengths, depths = report.config["lengths"], report.config["depths"]
    grid = report.accuracy_grid()
    head = "depth \\ length" + "".join(f"{length_label(n):>8s}" for n in lengths)
    lines = [head]
    for d, row in zip(depths, grid):
        lines.append(f"{100 * d:>13.0f}%" + "".join(f"{100 * v:>8.1f}" for v in row))
    means = [sum(col) / len(col) for col in zip(*grid)]
    lines.append(f"{'mean':>14s}" + "".join(f"{100 * v:>8.1f}" for v in means))
    mem = "on" if report.config["memory"] else "OFF"
    if report.memory_tau_scale != 1:
        mem += f", τ x{report.memory_tau_scale:g}"
    lines.append(f"passkey accuracy {100 * report.accuracy:.1f}% over {len(report.records)} prompts "
                 f"({report.config['samples']} per cell, memory {mem}) in {report.seconds:.1f} s")
    return "\n".join(lines)


def write_outputs(report: PasskeyReport, out_dir: str | Path) -> tuple[Path, Path | None]:
    """``passkey.json`` and the ``passkey.png`` heatmap (``passkey-no-memory.*`` with the memory off).
    The PNG path is None when matplotlib is missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "passkey" if report.config["memory"] else "passkey-no-memory"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    title = f"passkey accuracy (%), memory {'on' if report.config['memory'] else 'off'}"
    png = plots.heatmap(out / f"{stem}.png", report.accuracy_grid(),
                        rows=[f"{100 * d:.0f}%" for d in report.config["depths"]],
                        cols=[length_label(n) for n in report.config["lengths"]], title=title,
                        xlabel="context length (tokens)", ylabel="needle depth")
    return json_path, png


__all__ = ["PasskeyConfig", "PasskeyReport", "first_integer", "format_table", "length_label", "parse_depths",
           "parse_lengths", "run_passkey", "write_outputs"]
