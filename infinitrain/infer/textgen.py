"""Text in, text out for `infinitrain generate`: encode prompts, batch them, stream one row's text, time prefill and
decode."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch

from infinitrain.errors import ConfigError
from infinitrain.infer.generate import Sampling, TextStream, generate
from infinitrain.infer.codec import Codec


@dataclass
class TextGenResult:
    """Continuations in row order (prompt 0 sample 0, prompt 0 sample 1, ...), with token counts and timings."""

    texts: list[str]
    prompt_index: list[int]
    sample_index: list[int]
    prompt_tokens: list[int]
    new_tokens: list[int]
    prefill_seconds: float  # until the first new token of every row exists
    decode_seconds: float  # the rest
    streamed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        later = sum(self.new_tokens) - len(self.new_tokens)  # the first token of each row comes with the prefill
        return later / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    def summary(self) -> str:
        return (f"prefill {sum(self.prompt_tokens):,} tokens in {self.prefill_seconds:.2f} s "
                f"({self.prefill_tokens_per_s:,.0f} tok/s); decode {sum(self.new_tokens):,} tokens in "
                f"{self.decode_seconds:.2f} s ({self.decode_tokens_per_s:,.1f} tok/s, {len(self.texts)} rows)")


def sampling_generator(model, seed: int) -> torch.Generator:
    """A seeded generator on the model's device: ``torch.multinomial`` refuses one of another device (a CPU
    generator with a CUDA model: "Expected a 'cuda' device type for generator")."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def generate_text(model, codec: Codec, prompts: list[str], sampling: Sampling, *, num_samples: int = 1,
                  seed: int | None = None, stream: TextIO | None = None, progress: bool = True) -> TextGenResult:
    """Continue every prompt ``num_samples`` times in one batch. With ``stream`` and a single row, its text is
    written there as it is generated; a tqdm bar on stderr follows the prefill of prompts longer than a segment."""
    from tqdm import tqdm

    if not prompts:
        raise ConfigError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    encoded = [codec.encode_document(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) <= (codec.bos_id is not None):
            raise ConfigError(f"prompt {i + 1} is empty (it encodes to no tokens)")
    rows = [(i, s) for i, _ in enumerate(encoded) for s in range(num_samples)]
    row_ids = [encoded[i] for i, _ in rows]
    generator = sampling_generator(model, seed) if seed is not None else None
    longest, total = max(len(r) for r in row_ids), sum(len(r) for r in row_ids)
    bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, dynamic_ncols=True, leave=False,
               disable=not progress or longest <= model.config.segment_len)
    live = TextStream(codec.decode) if stream is not None and len(rows) == 1 else None
    t0 = time.perf_counter()
    started = torch.zeros(len(rows), dtype=torch.bool)  # rows that have emitted their first token
    prefill_end: list[float] = []  # when the last row emitted its first token

    def on_prefill(done: int, total: int) -> None:
        bar.update(done - bar.n)

    def on_tokens(ids: torch.Tensor, active: torch.Tensor) -> None:
        if not bool(started.all()):
            started.logical_or_(active.cpu())
            if bool(started.all()):
                prefill_end.append(time.perf_counter())
                bar.update(total - bar.n)
                bar.close()
        if live is not None:
            stream.write(live.push([int(ids[0])]))
            stream.flush()

    outs = generate(model, row_ids, sampling, generator=generator, on_tokens=on_tokens, on_prefill=on_prefill)
    t1 = time.perf_counter()
    bar.close()
    if live is not None:
        stream.write(live.flush())
        stream.flush()
    t_prefill = prefill_end[0] if prefill_end else t1
    texts = []
    for out in outs:
        if codec.eos_id is not None and out and out[-1] == codec.eos_id:
            out = out[:-1]
        texts.append(codec.decode(out))
    return TextGenResult(texts=texts, prompt_index=[i for i, _ in rows], sample_index=[s for _, s in rows],
                         prompt_tokens=[len(r) for r in row_ids], new_tokens=[len(o) for o in outs],
                         prefill_seconds=t_prefill - t0, decode_seconds=t1 - t_prefill, streamed=live is not None)
