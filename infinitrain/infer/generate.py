"""Streaming generation at constant memory: segment-wise prefill with the memory carried, then one token per step.

The model's state is the whole cache: each layer's compressive memory (M, z) plus the keys/values of
the current unfinished segment, compressed into the memory at every segment boundary. So the cost per
token is the same at 1K or 1M tokens of context. Several prompts are batched; prompts of different
lengths stay exact (each row's segments start at its own first token): each row is prefilled alone in
segment chunks up to a position where the rows of its group are at the same point of a segment, the
states are stacked, and from there the group moves one token per step, each row feeding what is left of
its prompt, then its samples. Rows whose prompts end at distant points of a segment decode in separate
groups (``plan_groups``), so a short prompt never drags a long one through its prompt token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from infinitrain.errors import ConfigError
from infinitrain.model.state import ModelState


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None  # a row stops after emitting it

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Scaled and truncated logits (B, V): temperature, then top-k, then nucleus (top-p); removed = -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches p (always >= 1 token).
    """
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
        drop_sorted = before >= top_p  # the first token is never dropped (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from the last-position logits (B, V)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature=sampling.temperature, top_k=sampling.top_k,
                          top_p=sampling.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def advance(model, input_ids: Tensor, state=None):
    """``model(input_ids, state).state`` without the norm and LM head (``InfiniLM.hidden``): prefill keeps only the
    state, so a chunk never materialises (B, T, V) logits (a 2K-token chunk of a 128K vocabulary is 1 GB in fp32)."""
    return model.hidden(input_ids, state)[1]


@torch.no_grad()
def prefill(model, chunks: Iterable[Tensor], state: ModelState | None = None,
            on_progress: Callable[[int], None] | None = None) -> ModelState:
    """Feed a stream of token chunks (each (B, t)) and keep only the state: a prompt of any length, read
    piece by piece (from a file, a generator), never exists in memory as a whole. Pass the result to
    ``generate(..., state=)``. Chunks of one segment keep activation memory at its minimum."""
    was_training = model.training
    model.eval()
    try:
        done = 0
        for ids in chunks:
            state = advance(model, ids, state)
            done += ids.shape[1]
            if on_progress:
                on_progress(done)
    finally:
        model.train(was_training)
    if state is None:
        raise ConfigError("prefill got no tokens")
    return state


class TextStream:
    """Incremental detokenisation for streaming: ``push(ids)`` returns the newly printable text.

    Decodes a short window (the text already printed since the last stable point plus the new ids) so a step
    costs O(1), and holds text back while it ends in an incomplete UTF-8 sequence (U+FFFD) or a multi-token
    character, as Hugging Face's TextStreamer / TGI do.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text that was already printed
        self.read = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the very end is printed as U+FFFD)."""
        before = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], sampling: Sampling, *,
             generator: torch.Generator | None = None, on_tokens: Callable[[Tensor, Tensor], None] | None = None,
             on_prefill: Callable[[int, int], None] | None = None, prefill_chunk: int | None = None,
             state: ModelState | None = None) -> list[list[int]]:
    """Continue every prompt (a list of token ids, at least one each); returns the new tokens per prompt.

    on_tokens(ids (B,), active (B,) bool) is called after each decoding step (for streaming output);
    on_prefill(done, total) reports prefill progress. The prefill runs in chunks of ``prefill_chunk``
    tokens (default: one segment), so activation memory stays bounded whatever the prompt length.
    ``state`` continues from earlier tokens already fed to the model (e.g. by :func:`prefill`, which streams
    a prompt too long to hold as a list); the prompts are then what follows them, one row per state row.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if sampling.max_new_tokens == 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # less per-op bookkeeping than no_grad; nothing made here is trained
            return _generate(model, prompts, sampling, generator, on_tokens, on_prefill,
                             prefill_chunk or model.config.segment_len, state)
    finally:
        model.train(was_training)


def _generate(model, prompts, sampling, generator, on_tokens, on_prefill, chunk, state) -> list[list[int]]:
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    held = 0 if state is None else state.tokens_in_segment
    fed = [0, sum(lengths)]  # prompt tokens fed so far, of all rows (on_prefill's count)

    def progress(n: int) -> None:
        fed[0] += n
        if on_prefill and n:
            on_prefill(fed[0], fed[1])

    S = model.config.segment_len
    out: list[list[int]] = [[] for _ in prompts]
    for rows, phase in plan_groups(lengths, held, S, sampling.max_new_tokens):
        # each row alone up to the group's phase, in segment chunks; the rest goes in lockstep
        start = [lengths[b] - 1 - (held + lengths[b] - 1 - phase) % S for b in rows]
        done: dict[tuple, ModelState | None] = {}  # rows with the same head share its prefill (--num-samples)
        singles = []
        for b, c in zip(rows, start):
            key = (b if state is not None else -1, tuple(prompts[b][:c]))
            if key not in done:
                ids = torch.as_tensor(key[1], dtype=torch.long, device=device)[None]
                done[key] = _prefill_row(model, ids, None if state is None else state.row(b), held, chunk, progress)
            else:
                progress(c)
            singles.append(done[key])
        group_state = None if all(s is None for s in singles) else ModelState.cat(singles)
        decoded = _decode_group(model, [prompts[b] for b in rows], start, group_state, sampling, generator,
                                _widen(on_tokens, rows, len(prompts), device), progress, chunk)
        for b, o in zip(rows, decoded):
            out[b] = o
    return out


def plan_groups(lengths: Sequence[int], held: int, segment_len: int, new_tokens: int) -> list[tuple[list[int], int]]:
    """Rows decoded together, and the in-segment phase at which each group is stacked: [(rows, phase), ...].

    A batched state holds the same number of unfinished-segment tokens in every row, so rows move in lockstep
    from the phase at which they are stacked. Row b can be prefilled alone (in segment chunks) up to any
    position c <= len_b - 1 with that phase; the len_b - 1 - c prompt tokens left go one per step, beside the
    other rows. A group stacked at the phase of its member whose prompt ends earliest in the segment costs
    (most tokens left) + new_tokens steps; this picks the grouping with the fewest steps over all groups (rows
    contiguous in the circular order of their end phases; a dynamic programme, fewer groups on ties)."""
    S, B = segment_len, len(lengths)
    end = [(held + n - 1) % S for n in lengths]  # phase before the last prompt token
    order = sorted(range(B), key=lambda b: end[b])
    best: tuple[tuple[int, int], list[tuple[list[int], int]]] | None = None
    for rot in range(B if B > 1 else 1):
        ring = order[rot:] + order[:rot]
        cost: list[tuple[int, int] | None] = [(0, 0)] + [None] * B
        back = [0] * (B + 1)
        for i in range(B):
            if cost[i] is None:
                continue
            phase, worst = end[ring[i]], 0
            for j in range(i, B):
                left = (end[ring[j]] - phase) % S
                if left > lengths[ring[j]] - 1:  # this row's prompt does not reach back to the phase
                    break
                worst = max(worst, left)
                c = (cost[i][0] + worst + new_tokens, cost[i][1] + 1)
                if cost[j + 1] is None or c < cost[j + 1]:
                    cost[j + 1], back[j + 1] = c, i
        if cost[B] is None:
            continue
        groups, j = [], B
        while j:
            i = back[j]
            groups.append((ring[i:j], end[ring[i]]))
            j = i
        if best is None or cost[B] < best[0]:
            best = (cost[B], groups[::-1])
    return best[1]


def _prefill_row(model, ids: Tensor, state: ModelState | None, held: int, chunk: int,
                 progress: Callable[[int], None]) -> ModelState | None:
    """Feed ids (1, t) in pieces of at most ``chunk`` tokens that end where the stream position (held + fed) is a
    multiple of ``chunk``: with chunk = S (the default) no piece crosses a segment boundary."""
    i, t = 0, ids.shape[1]
    while i < t:
        j = min(t, i + chunk - (held + i) % chunk)
        state = advance(model, ids[:, i:j], state)
        progress(j - i)
        i = j
    return state


def _widen(on_tokens, rows: list[int], total: int, device):
    """on_tokens for a group: its (g,) ids and flags spread over all ``total`` rows (the rest inactive)."""
    if on_tokens is None:
        return None
    index = torch.tensor(rows, device=device)

    def call(ids: Tensor, active: Tensor) -> None:
        full_ids = torch.zeros(total, dtype=ids.dtype, device=device).index_copy(0, index, ids)
        on_tokens(full_ids, torch.zeros(total, dtype=torch.bool, device=device).index_copy(0, index, active))

    return call


def _decode_group(model, prompts, start: list[int], state, sampling, generator, on_tokens, progress,
                  chunk: int) -> list[list[int]]:
    """Rows stacked in ``state``, row b having fed its prompt up to start[b] (all at one phase): feed the prompt
    tokens every row still has in common as pieces, then one token per step, each row its prompt until it runs
    out, then its samples."""
    device = next(model.parameters()).device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    held = 0 if state is None else state.tokens_in_segment
    common = min(n - 1 - s for n, s in zip(lengths, start))
    if common:
        ids = torch.stack([torch.as_tensor(list(p[s:s + common]), dtype=torch.long, device=device)
                           for p, s in zip(prompts, start)])
        state = _prefill_row(model, ids, state, held, chunk, lambda n: progress(n * B))
        start = [s + common for s in start]
    # The loop's bookkeeping is in Python lists: a decode step of a small model is a few hundred
    # microseconds, and every tensor op on (B,) flags would cost a few of them.
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    pos = list(start)  # the prompt index each row feeds next
    token = torch.tensor([p[s] for p, s in zip(prompts, pos)], dtype=torch.long, device=device)
    while True:
        logits, state = model(token[:, None], state)[:2]
        progress(sum(1 for b in range(B) if pos[b] < lengths[b]))
        pos = [q + 1 for q in pos]
        in_prompt = [q < n for q, n in zip(pos, lengths)]  # these rows still have prompt tokens to feed
        sampled = sample_next(logits[:, -1], sampling, generator)
        ids = sampled.tolist()
        emitting = [not (p or d) for p, d in zip(in_prompt, done)]
        if on_tokens and any(emitting):
            on_tokens(sampled, torch.tensor(emitting, device=device))
        for b in range(B):
            if emitting[b]:
                out[b].append(ids[b])
                done[b] = ids[b] == sampling.eos_id or len(out[b]) >= sampling.max_new_tokens
        if all(done):
            return out
        if any(in_prompt):
            nxt = [prompts[b][pos[b]] if in_prompt[b] else ids[b] for b in range(B)]
            token = torch.tensor(nxt, dtype=torch.long, device=device)
        else:
            token = sampled
