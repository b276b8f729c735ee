"""The trainer's view of prepared data: a random-access sample dataset and a deterministic, resumable, rank-sharded
sampler.

API (all a trainer needs)::

    from infinitrain.data_tools.dataset import ShardDataset, ShardSampler

    ds = ShardDataset("data/pg19", "train")         # "val" for the held-out split
    assert ds.segment_len == model.segment_len        # S, and ds.sample_segments = K (samples are <= K*S tokens)
    s = ds[i]                                         # Record (what the shard stores), numpy int64 arrays:
    #   s.input_ids (T,)   s.targets (T,) == input ids shifted by one   s.loss_mask (T,) 1 where the target counts
    #   s.doc_starts (d,)  positions where a document begins: reset the memory there
    #   s.sample_id  int, the index i (stable across runs)   s.doc_ids (p,) ids of the documents in the sample
    #   s.label      int class id (classification data; ds.label_names[s.label] is its name), else None
    # T = K*S for plain text; for summarization, qa and classification T is a multiple of S up to K*S
    # (padding has loss_mask 0). In classification data the one loss_mask position is where the label is read.

    sampler = ShardSampler(len(ds), global_batch_size=64, rank=rank, world_size=world, seed=1234)
    sampler.load_state_dict(ckpt["data"])             # optional: resume exactly where the checkpoint stopped
    idx = sampler.next_batch()                        # this rank's 64 // world indices of the next global batch
    # the trainer pads records to N*S and stacks them: infinitrain.train.data.ShardSource and train.batch.collate
    ckpt["data"] = sampler.state_dict()               # a small dict: {"epoch", "batch", "seed", ...}

The order is a pure function of (seed, epoch): every epoch is a fresh permutation of all samples, cut into
global batches (an incomplete last batch is dropped); rank r takes the r-th contiguous slice of each global
batch, so the ranks of one step never share a sample and the global order does not depend on the world size
(a checkpoint taken with 2 ranks resumes on 1 or 4 with the same global batch). Each shard's size and sha256
are checked against index.json the first time this process opens it, and every zstd frame carries a content
checksum, so corrupt data raises :class:`~infinitrain.errors.ShardCorruptError` instead of training on it.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from infinitrain.data_tools.shards import TOKEN_DTYPES, PackedSample, ShardFile, read_index
from infinitrain.errors import ConfigError, DataError

SAMPLER_STATE_VERSION = 1


class Record(NamedTuple):
    """One stored sample as the shard holds it (numpy int64 arrays, T <= N*S tokens); the trainer's fixed-length
    tensor view of it is :class:`infinitrain.train.batch.Sample` (made by ``train.data.ShardSource``)."""

    input_ids: np.ndarray  # (T,)
    targets: np.ndarray  # (T,) input_ids shifted left by one, plus the next token
    loss_mask: np.ndarray  # (T,) 1 where targets[t] is trained on, else 0
    doc_starts: np.ndarray  # (d,) sorted positions t where a document's first token is input_ids[t]
    sample_id: int  # index in the split
    doc_ids: np.ndarray  # (p,) ids of the documents with tokens in this sample, in order (see documents.jsonl.zst)
    label: int | None = None  # class id of a classification sample (index into ShardDataset.label_names)


def to_record(packed: PackedSample, sample_id: int) -> Record:
    tokens = packed.tokens.astype(np.int64)
    mask = np.zeros(len(tokens) - 1, np.int64)
    for start, end in packed.loss_spans:
        mask[start:end] = 1
    return Record(tokens[:-1], tokens[1:], mask, packed.doc_starts.astype(np.int64), sample_id,
                  packed.doc_ids.astype(np.int64), packed.label)


class ShardDataset:
    """Random access to the samples of one split of a prepared folder (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, split: str = "train", *, frame_cache: int = 4):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        if split not in self.index["splits"]:
            raise DataError(f"{self.directory}/index.json: no split {split!r} (has {', '.join(self.index['splits'])})")
        self.split = split
        info = self.index["splits"][split]
        self.shards: list[dict] = info["shards"]
        self.dtype = TOKEN_DTYPES[self.index["dtype"]]
        self.segment_len: int = self.index["segment_len"]
        self.sample_segments: int = self.index["sample_segments"]
        self.pad_id: int = self.index["tokenizer"]["pad_id"]
        self.eos_id: int = self.index["tokenizer"]["eos_id"]
        self.num_samples: int = info["num_samples"]
        self.mode: str = self.index.get("mode", "pretrain")
        self.label_names: list[str] | None = self.index.get("labels", {}).get("names")  # classification only
        self._firsts = [s["first_sample"] for s in self.shards]
        if sum(s["num_samples"] for s in self.shards) != self.num_samples:
            raise DataError(f"{self.directory}/index.json: shard sample counts do not add up to {self.num_samples}")
        self._files: dict[int, ShardFile] = {}
        self._frames: OrderedDict[tuple[int, int], list[PackedSample]] = OrderedDict()
        self._frame_cache = frame_cache

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Record:
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples in split {self.split!r}")
        k = bisect_right(self._firsts, i) - 1
        shard = self.shard_file(k)
        local = i - self._firsts[k]
        j = shard.frame_of(local)
        frame = self._frames.get((k, j))
        if frame is None:
            frame = shard.read_frame(j)
            self._frames[(k, j)] = frame
            if len(self._frames) > self._frame_cache:
                self._frames.popitem(last=False)
        else:
            self._frames.move_to_end((k, j))
        return to_record(frame[local - shard.frames[j][2]], i)

    def shard_file(self, k: int) -> ShardFile:
        """Shard ``k``, opened (and checked against the index) once per process."""
        f = self._files.get(k)
        if f is None:
            f = ShardFile(self.directory / self.shards[k]["name"], self.dtype, entry=self.shards[k])
            self._files[k] = f
        return f

    def __getstate__(self) -> dict:  # DataLoader workers re-open (and re-check) shards themselves
        state = self.__dict__.copy()
        state["_files"], state["_frames"] = {}, OrderedDict()
        return state


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(num_samples) that depends only on (seed, epoch): splitmix64 keys, stable argsort.

    Written out (not numpy's Generator) so that the order never changes with the numpy version.
    """
    with np.errstate(over="ignore"):
        salt = splitmix64(np.array([seed & (2**64 - 1)], np.uint64) ^ splitmix64(np.array([epoch], np.uint64)))
        keys = splitmix64(np.arange(num_samples, dtype=np.uint64) ^ salt)
    return np.argsort(keys, kind="stable")


def splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ShardSampler:
    """Which sample indices this rank reads next; its whole position is ``state_dict()`` (see module docstring)."""

    def __init__(self, num_samples: int, *, global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ConfigError(f"global batch {global_batch_size} must be a positive multiple of world size "
                              f"{world_size}")
        if num_samples < global_batch_size:
            raise ConfigError(f"the split has {num_samples} samples, fewer than one global batch of "
                              f"{global_batch_size}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batches_per_epoch = num_samples // global_batch_size
        self.epoch, self.batch = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = epoch_order(self.num_samples, self.seed, self.epoch) if self.shuffle \
                else np.arange(self.num_samples)
        return self._order

    def next_batch(self) -> np.ndarray:
        """This rank's indices of the next global batch (then the cursor moves past that batch)."""
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        per_rank = self.global_batch_size // self.world_size
        start = self.batch * self.global_batch_size + self.rank * per_rank
        self.batch += 1
        return self._epoch_order()[start:start + per_rank].copy()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"version": SAMPLER_STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "batch": self.batch,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state``; the world size may differ, the data and global batch may not."""
        if state.get("kind") == "mixture":
            raise ConfigError("the checkpoint's data cursor is a mixture's; this run reads one dataset")
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise ConfigError(f"data cursor version {state.get('version')}, expected {SAMPLER_STATE_VERSION}")
        for key in ("num_samples", "global_batch_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"data cursor was saved with {key}={state[key]}, this run has {getattr(self, key)}")
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


def eval_indices(num_samples: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Every sample once, split across ranks (for validation): rank r takes r, r + world, r + 2*world, ..."""
    return np.arange(rank, num_samples, world_size)
