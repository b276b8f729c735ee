"""What the trainer reads: a small sample-source protocol, a deterministic resumable rank-sharded sampler, batches.

The trainer needs only :class:`SampleSource`: ``len(src)`` samples, each ``src[i]`` a :class:`Sample` of
L = N·S tokens (input ids, next-token targets, loss mask, document starts, sample id). In-memory sources
(:class:`TokenSource`, built from raw text by :func:`text_source`) serve tests and quick runs; prepared shards
(``infinitrain prepare``) plug in through :func:`open_source` once the shard reader exposes the same shape.

The order comes from ``infinitrain.data_tools.dataset.ShardSampler`` (a pure function of seed and epoch,
world-size independent, resumable from a small dict): each optimizer step takes one global batch of
micro_batch × grad_accum × world samples; this rank's contiguous slice is cut into grad_accum micro-batches.
A mixture (``data.path`` a mapping, see ``infinitrain.data_tools.mixture``) is a :class:`MixtureSource` read
through a ``MixtureSampler``; :class:`DatasetMetrics` and :class:`Validation` report it per dataset.
Shape legend: B micro-batch, L sample length (N segments × S tokens), D datasets of a mixture.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from infinitrain.errors import ConfigError, DataError
from infinitrain.train.batch import Batch, Sample, collate
from infinitrain.train.packing import PACKED_MODES, PackedSource


class SampleSource(Protocol):
    """Random-access samples of a fixed length ``sample_len``; ``vocab_size`` bounds the ids."""

    sample_len: int
    vocab_size: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...


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


class MixtureSource:
    """Several sources laid end to end (dataset d's sample j is index ``offsets[d] + j``, which is also the
    returned sample id), with their names and mixture weights."""

    def __init__(self, names: list[str], parts: list[SampleSource], weights: list[float]):
        lengths = {name: part.sample_len for name, part in zip(names, parts)}
        if len(set(lengths.values())) > 1:
            raise DataError(f"the datasets of a mixture must have samples of one length, got {lengths}")
        self.names, self.parts, self.weights = list(names), list(parts), list(weights)
        self.sample_len = parts[0].sample_len
        self.vocab_size = max(part.vocab_size for part in parts)
        self.offsets = [0]
        for part in parts[:-1]:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.parts[-1])

    def dataset_of(self, i: int) -> int:
        return bisect_right(self.offsets, int(i)) - 1

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        d = self.dataset_of(i)
        return self.parts[d][int(i) - self.offsets[d]]._replace(sample_id=int(i))


def open_source(path: str | dict, sample_len: int, vocab_size: int, val_fraction: float, pack: bool = False,
                ) -> tuple[SampleSource, SampleSource | None]:
    """The train and validation sources for ``data.path``: prepared shards (a folder with index.json; its own
    val split, None when it has none), else raw text (byte-level, the tail held out); a mapping is a mixture
    of such paths (a :class:`MixtureSource` each, the validation one of the datasets that have a val split).
    pack: summarization/QA shards train as packed rows (``infinitrain.train.packing``); validation reads one
    sample per row (its loss per target is the same either way)."""
    if isinstance(path, dict):
        from infinitrain.data_tools.mixture import parse_mixture

        entries = parse_mixture(path)
        pairs = [open_source(e.path, sample_len, vocab_size, val_fraction, pack) for e in entries]
        train = MixtureSource([e.name for e in entries], [t for t, _ in pairs], [e.weight for e in entries])
        vals = [(e, v) for e, (_, v) in zip(entries, pairs) if v is not None]
        val = MixtureSource([e.name for e, _ in vals], [v for _, v in vals],
                            [e.weight for e, _ in vals]) if vals else None
        return train, val
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data path does not exist")
    if (p / "index.json").is_file():
        train = ShardSource(p, "train")
        if pack and train.ds.mode in PACKED_MODES and len(train):
            train = PackedSource(train)
        splits = train.ds.index["splits"]
        val = ShardSource(p, "val") if splits.get("val", {}).get("num_samples") else None
        return train, val
    return text_source(p, sample_len, vocab_size, val_fraction)


def make_sampler(source: SampleSource | int, *, micro_batch: int, grad_accum: int, rank: int, world: int, seed: int):
    """A ShardSampler over ``len(source)`` samples (or ``source`` samples), a MixtureSampler for a mixture."""
    from infinitrain.data_tools.dataset import ShardSampler
    from infinitrain.data_tools.mixture import MixtureSampler

    batch = micro_batch * grad_accum * world
    if isinstance(source, MixtureSource):
        return MixtureSampler(source.names, [len(p) for p in source.parts], source.weights, global_batch_size=batch,
                              rank=rank, world_size=world, seed=seed)
    size = source if isinstance(source, int) else len(source)
    return ShardSampler(size, global_batch_size=batch, rank=rank, world_size=world, seed=seed)


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


class Validation:
    """Validation batches per dataset: one set for a single source, one per mixture dataset (``n_samples``
    each). ``run`` returns ``val_loss`` and the extra metrics row: for a mixture, ``val_loss/<name>`` per
    dataset, and ``val_loss`` is their average under the mixture weights (the training distribution)."""

    def __init__(self, source: SampleSource | None, n_samples: int, micro_batch: int, rank: int, world: int):
        parts = zip(source.names, source.parts, source.weights) if isinstance(source, MixtureSource) \
            else [("", source, 1.0)]
        self.sets = {name: (val_batches(part, n_samples, micro_batch, rank, world), w) for name, part, w in parts}
        self.sets = {name: bw for name, bw in self.sets.items() if bw[0]}
        self.mixture = isinstance(source, MixtureSource)

    def __bool__(self) -> bool:
        return bool(self.sets)

    def run(self, evaluate: Callable[[list[Batch]], float]) -> tuple[float, dict]:
        losses = {name: evaluate(batches) for name, (batches, _) in self.sets.items()}
        if not self.mixture:
            return losses[""], {}
        total = sum(w for _, w in self.sets.values())
        mean = sum(losses[name] * w for name, (_, w) in self.sets.items()) / total
        return mean, {f"val_loss/{name}": loss for name, loss in losses.items()}


class DatasetMetrics:
    """Per-dataset training figures of a mixture run for metrics.jsonl (nothing for a single dataset):
    ``tokens/<name>`` = samples the sampler drew from it so far × L (skipped steps included), ``loss/<name>`` =
    its mean target cross-entropy over the applied steps since the previous row (null if none of its samples)."""

    def __init__(self, source: SampleSource, sampler):
        self.source, self.sampler = source, sampler
        self.enabled = isinstance(source, MixtureSource)
        self.sums = torch.zeros(len(source.names) if self.enabled else 0, 2, dtype=torch.float64)  # (D, 2)

    def add(self, indices: list[list[int]], micro_batches: list[Batch], sample_loss: Tensor) -> None:
        """One applied step of this rank: its micro-batch indices, batches and per-sample summed loss."""
        if not self.enabled:
            return
        d = torch.tensor([self.source.dataset_of(i) for ids in indices for i in ids])
        targets = torch.cat([mb.loss_mask.sum(1) for mb in micro_batches]).double()
        self.sums.index_add_(0, d, torch.stack([sample_loss.double().cpu(), targets], 1))

    def row(self) -> dict:
        """The figures since the last call, summed over ranks (collective: every rank calls it)."""
        if not self.enabled:
            return {}
        from infinitrain.train.step import all_reduce

        sums = all_reduce(self.sums.clone())
        self.sums.zero_()
        out = {}
        for k, (name, drawn) in enumerate(zip(self.source.names, self.sampler.samples_drawn())):
            out[f"tokens/{name}"] = drawn * self.source.sample_len
            out[f"loss/{name}"] = float(sums[k, 0] / sums[k, 1]) if sums[k, 1] > 0 else None
        return out
