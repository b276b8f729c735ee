"""Text in, text out for `infinitrain generate`: encode prompts, batch them, stream one row's text, time prefill and
decode."""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

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
    if not prompts:
        raise ConfigError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    encoded = [codec.encode_document(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) <= (codec.bos_id is not None):
            raise ConfigError(f"prompt {i + 1} is empty (it encodes to no tokens)")
    return generate_ids(model, codec, encoded, sampling, num_samples=num_samples, seed=seed, stream=stream,
                        progress=progress)


def generate_ids(model, codec: Codec, encoded: list[list[int]], sampling: Sampling, *, num_samples: int = 1,
                 seed: int | None = None, stream: TextIO | None = None, progress: bool = True,
                 state=None) -> TextGenResult:
    """:func:`generate_text` from token ids; ``state`` continues text already fed (one row per prompt and sample)."""
    from tqdm import tqdm

    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
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

    outs = generate(model, row_ids, sampling, generator=generator, on_tokens=on_tokens, on_prefill=on_prefill,
                    state=state)
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


# --- a prompt file of any size, read, tokenized and prefilled in pieces ------------------------------------------


def clean_cut(text: str, codec: Codec, context: int = 32, tries: int = 16) -> int:
    """The last position of ``text`` (0: none) where it can be cut without changing its tokens: before a space that
    follows a non-space (byte-level pre-tokenizers start a pre-token there; a piece that starts with a space gets no
    "leading space" added), with ``context`` characters after it, where encoding the neighbourhood whole equals
    encoding its two sides (a tokenizer that would still differ there is never cut there)."""
    i = len(text) - context + 1
    for _ in range(tries):
        i = text.rfind(" ", 1, i)
        while i > 0 and text[i - 1].isspace():
            i = text.rfind(" ", 1, i)
        if i <= 0:
            return 0
        left, right = text[max(0, i - context):i], text[i:i + context]
        if codec.encode(left + right) == codec.encode(left) + codec.encode(right):
            return i
    return 0


def read_prompt_pieces(f: BinaryIO, codec: Codec, name: str, read_bytes: int = 1 << 16,
                       ) -> Iterator[tuple[list[int], int]]:
    """(token ids, bytes) of a UTF-8 byte stream, piece by piece, cut by :func:`clean_cut`: the ids concatenated
    equal ``codec.encode`` of the whole text, while about one read is held at a time (a run of text without such a
    space is read on until one comes)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, offset = "", 0
    while True:
        raw = f.read(read_bytes)
        try:
            text += decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as err:
            pending = len(decoder.getstate()[0]) if raw else 0
            raise ConfigError(f"{name}: not UTF-8 text (near byte {offset - pending + err.start})") from None
        offset += len(raw)
        cut = clean_cut(text, codec) if raw else len(text)
        if cut:
            head, text = text[:cut], text[cut:]
            yield codec.encode(head), len(head.encode("utf-8"))
        if not raw:
            return


def generate_file(model, codec: Codec, f: BinaryIO, name: str, sampling: Sampling, *, num_samples: int = 1,
                  seed: int | None = None, stream: TextIO | None = None, progress: bool = True,
                  size: int | None = None) -> TextGenResult:
    """Continue the prompt held in the byte stream ``f`` (``size`` bytes, for the bar): read, tokenized and
    prefilled one piece at a time, so memory stays flat whatever the prompt's length; the same tokens and the same
    state as :func:`generate_text` on the whole text (each sample's row is fed the same prompt)."""
    from tqdm import tqdm

    from infinitrain.infer.generate import advance

    chunk = model.config.segment_len
    device = next(model.parameters()).device
    bar = tqdm(total=size, desc="prefill", unit="B", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               leave=False, disable=not progress or (size is not None and size < 1 << 16))
    t0 = time.perf_counter()
    state, held, fed = None, ([] if codec.bos_id is None else [codec.bos_id]), 0  # as codec.encode_document
    model.eval()
    with torch.inference_mode():
        for ids, n_bytes in read_prompt_pieces(f, codec, name):
            held.extend(ids)
            whole = (len(held) - 1) // chunk * chunk  # whole segments, keeping at least one token for generate
            for i in range(0, whole, chunk):
                piece = torch.tensor(held[i:i + chunk], dtype=torch.long, device=device)
                state = advance(model, piece.expand(num_samples, -1), state)
            held, fed = held[whole:], fed + whole
            bar.update(n_bytes)
    bar.close()
    if fed + len(held) <= (codec.bos_id is not None):
        raise ConfigError(f"{name}: the prompt is empty (it encodes to no tokens)")
    result = generate_ids(model, codec, [held], sampling, num_samples=num_samples, seed=seed, stream=stream,
                          progress=False, state=state)
    result.prompt_tokens = [fed + n for n in result.prompt_tokens]
    result.prefill_seconds = time.perf_counter() - t0 - result.decode_seconds  # the streamed pieces included
    return result
