"""What the trainer reads: a small sample-source protocol, a deterministic resumable rank-sharded sampler, batches.

The trainer needs only :class:`SampleSource`: ``len(src)`` samples, each ``src[i]`` a :class:`Sample` of
L = N·S tokens (input ids, next-token targets, loss mask, document starts, sample id). In-memory sources
(:class:`TokenSource`, built from raw text by :func:`text_source`) serve tests and quick runs; prepared shards
(``infinitrain prepare``) plug in through :func:`open_source` once the shard reader exposes the same shape.

The order comes from ``infinitrain.data_tools.dataset.ShardSampler`` (a pure function of seed and epoch,
world-size independent, resumable from a small dict): each optimizer step takes one global batch of
micro_batch × grad_accum × world samples; this rank's contiguous slice is cut into grad_accum micro-batches.
Shape legend: B micro-batch, L sample length (N segments × S tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from infinitrain.errors import ConfigError, DataError


class Sample(NamedTuple):
    input_ids: Tensor  # (L,) int64
    targets: Tensor  # (L,) int64, the next token of each position
    loss_mask: Tensor  # (L,) bool, False where the target does not count (padding, cross-document)
    doc_start: Tensor  # (L,) bool, True where a document starts (memory resets there)
    sample_id: int
    label: int | None = None  # class id (classification data); read at the one loss_mask position


class Batch(NamedTuple):
    input_ids: Tensor  # (B, L)
    targets: Tensor  # (B, L)
    loss_mask: Tensor  # (B, L) bool
    doc_start: Tensor  # (B, L) bool
    sample_ids: Tensor  # (B,)
    labels: Tensor | None = None  # (B,) int64 class ids, -1 for a sample without one; None when no sample has one


class SampleSource(Protocol):
    """Random-access samples of a fixed length ``sample_len``; ``vocab_size`` bounds the ids."""

    sample_len: int
    vocab_size: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...


def collate(samples: list[Sample]) -> Batch:
    labels = None
    if any(s.label is not None for s in samples):
        labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)
    return Batch(torch.stack([s.input_ids for s in samples]), torch.stack([s.targets for s in samples]),
                 torch.stack([s.loss_mask for s in samples]), torch.stack([s.doc_start for s in samples]),
                 torch.tensor([s.sample_id for s in samples], dtype=torch.long), labels)


class TokenSource:
    """Samples cut from one token stream: sample i is tokens [i·L, (i+1)·L] (inputs and shifted targets)."""

    def __init__(self, tokens: Tensor, doc_starts: Tensor, sample_len: int, vocab_size: int, id_offset: int = 0):
        self.tokens, self.doc_starts = tokens.long(), doc_starts.bool()  # (T,) each
        self.sample_len, self.vocab_size, self.id_offset = sample_len, vocab_size, id_offset
        self.n = (len(self.tokens) - 1) // sample_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        a, L = i * self.sample_len, self.sample_len
        chunk = self.tokens[a:a + L + 1]
        doc = self.doc_starts[a:a + L + 1].clone()
        # a target that starts a new document is not predictable from the previous document
        return Sample(chunk[:-1], chunk[1:], ~doc[1:], doc[:-1], self.id_offset + i)


def byte_tokens(text: str) -> Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def text_source(path: str | Path, sample_len: int, vocab_size: int, val_fraction: float,
                ) -> tuple[TokenSource, TokenSource]:
    """Byte-level (ids 0..255) train and validation sources from a .txt file or a directory of .txt files
    (one document per file, sorted by name). The tail ``val_fraction`` of the stream is held out."""
    p = Path(path)
    files = sorted(p.glob("**/*.txt")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{p}: no text files found (expected a .txt file or a directory of them)")
    if vocab_size < 256:
        raise ConfigError(f"byte-level text data needs model.vocab_size >= 256, got {vocab_size}")
    parts, starts = [], []
    for f in files:
        try:
            ids = byte_tokens(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{f}: not UTF-8 text (byte {err.start})") from None
        parts.append(ids)
        s = torch.zeros(len(ids), dtype=torch.bool)
        s[:1] = True
        starts.append(s)
    tokens, doc = torch.cat(parts), torch.cat(starts)
    n_val = max(sample_len + 1, int(len(tokens) * val_fraction))
    if len(tokens) - n_val < sample_len + 1:
        raise DataError(f"{p}: {len(tokens)} tokens are too few for samples of {sample_len} plus validation")
    cut = len(tokens) - n_val
    train = TokenSource(tokens[:cut], doc[:cut], sample_len, vocab_size)
    val = TokenSource(tokens[cut:], doc[cut:], sample_len, vocab_size, id_offset=len(train))
    return train, val


class ShardSource:
    """A split of prepared shards (``infinitrain prepare``) as a SampleSource: shorter samples (summarization)
    are padded to N·S with the pad id and loss mask 0."""

    def __init__(self, directory: str | Path, split: str):
        from infinitrain.data_tools.dataset import ShardDataset

        self.ds = ShardDataset(directory, split)
        self.segment_len = self.ds.segment_len
        self.sample_len = self.ds.sample_segments * self.ds.segment_len
        self.vocab_size = int(self.ds.index["tokenizer"]["vocab_size"])
        self.label_names = self.ds.label_names  # classification data: class names by id, else None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Sample:
        s, L = self.ds[i], self.sample_len
        n = len(s.input_ids)
        ids = torch.full((L,), self.ds.pad_id, dtype=torch.long)
        tgt, mask, doc = ids.clone(), torch.zeros(L, dtype=torch.bool), torch.zeros(L, dtype=torch.bool)
        ids[:n], tgt[:n] = torch.from_numpy(s.input_ids), torch.from_numpy(s.targets)
        mask[:n] = torch.from_numpy(s.loss_mask) > 0
        doc[torch.from_numpy(s.doc_starts)] = True
        return Sample(ids, tgt, mask, doc, s.sample_id, s.label)


def open_source(path: str, sample_len: int, vocab_size: int, val_fraction: float,
                ) -> tuple[SampleSource, SampleSource | None]:
    """The train and validation sources for ``data.path``: prepared shards (a folder with index.json; its own
    val split, None when it has none), else raw text (byte-level, the tail held out)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data path does not exist")
    if (p / "index.json").is_file():
        train = ShardSource(p, "train")
        splits = train.ds.index["splits"]
        val = ShardSource(p, "val") if splits.get("val", {}).get("num_samples") else None
        return train, val
    return text_source(p, sample_len, vocab_size, val_fraction)


def make_sampler(size: int, *, micro_batch: int, grad_accum: int, rank: int, world: int, seed: int):
    from infinitrain.data_tools.dataset import ShardSampler

    return ShardSampler(size, global_batch_size=micro_batch * grad_accum * world, rank=rank, world_size=world,
                        seed=seed)


def next_micro_batches(sampler, micro_batch: int) -> list[list[int]]:
    """This rank's sample indices for the next optimizer step, as grad_accum lists of ``micro_batch``."""
    idx = [int(i) for i in sampler.next_batch()]
    return [idx[a:a + micro_batch] for a in range(0, len(idx), micro_batch)]


def val_batches(source: SampleSource | None, n_samples: int, micro_batch: int, rank: int, world: int,
                ) -> list[Batch]:
    """The first ``n_samples`` validation samples (rounded down to whole micro-batches on every rank, so all
    ranks run the same number of forwards, which ZeRO-3 needs), rank r taking every world-th."""
    if source is None:
        return []
    n = min(n_samples, len(source)) // (micro_batch * world) * (micro_batch * world)
    idx = list(range(n))[rank::world]
    return [collate([source[i] for i in idx[a:a + micro_batch]]) for a in range(0, len(idx), micro_batch)]
