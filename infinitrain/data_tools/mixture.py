"""Weighted mixtures of datasets: the recipe's ``data.path`` mapping, and a deterministic, resumable sampler over them.

A mixture is written in a recipe as either form (they may be mixed)::

    data:
      path: {data/pg19: 0.5, data/arxiv: 0.3, data/c4-long: 0.2}       # DIR: weight (name = the folder's name)
      path:
        pg19:  {path: data/pg19, weight: 0.5}                            # name: {path, weight}
        arxiv: {path: data/arxiv, weight: 0.3}

Weights are positive and need not sum to 1 (they are normalised). Sampling (:class:`MixtureSampler`): global
sample position ``c`` (counted from the start of training over all global batches) draws its dataset from
``u(seed, c)``, a splitmix64 hash mapped to [0, 1) and looked up in the cumulative weights, so the choice is a
pure function of (seed, c): independent of world size and of how the run was interrupted. The chosen dataset
then gives its next index from its own shuffled sampler (a :class:`ShardSampler` with a seed derived from the
run seed and the dataset's name, one sample per call, a new permutation every epoch), so small datasets repeat
and large ones are never exhausted. The whole position is ``state_dict()``: the positions drawn and each
dataset's (epoch, index).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infinitrain.data_tools.dataset import ShardSampler, splitmix64
from infinitrain.errors import ConfigError

MIXTURE_STATE_VERSION = 1
_DRAW_SALT = 0x6D69787475726521  # "mixture!": separates the dataset draws from the epoch permutations


@dataclass(frozen=True, slots=True)
class MixtureEntry:
    name: str  # used in metric names (``loss/<name>``) and in the sampler state
    path: str
    weight: float


def parse_mixture(spec: Mapping, where: str = "data.path") -> tuple[MixtureEntry, ...]:
    """The entries of a mixture mapping (see the module docstring); a bad spec is a one-line ConfigError."""
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(f"{where}: a mixture must be a non-empty mapping {{DIR: weight}} or "
                          f"{{name: {{path, weight}}}}")
    entries = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: mixture keys must be non-empty strings, got {key!r}")
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"path", "weight"})
            if unknown or "path" not in value or "weight" not in value:
                raise ConfigError(f"{where}.{key}: expected {{path: DIR, weight: w}}, got keys {sorted(value)}")
            name, path, weight = key, value["path"], value["weight"]
        else:
            name, path, weight = Path(key).name or key, key, value
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.{key}: path must be a non-empty string, got {path!r}")
        number = not isinstance(weight, bool) and isinstance(weight, (int, float))
        if not (number and math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{where}.{key}: weight must be a positive number, got {weight!r}")
        entries.append(MixtureEntry(name, path, float(weight)))
    names = [e.name for e in entries]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{where}: two datasets are named {name!r}; name them: "
                              f"{{name: {{path: DIR, weight: w}}}}")
    return tuple(entries)


def dataset_draws(seed: int, start: int, count: int, weights: Sequence[float]) -> np.ndarray:
    """Pure: the dataset index drawn by global sample positions ``start .. start + count - 1``."""
    p = np.asarray(weights, np.float64)
    cdf = np.cumsum(p / p.sum())
    with np.errstate(over="ignore"):
        salt = splitmix64(np.array([seed & (2**64 - 1)], np.uint64) ^ np.uint64(_DRAW_SALT))
        bits = splitmix64(np.arange(start, start + count, dtype=np.uint64) ^ salt)
    u = (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1), 53 random bits
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1)


def dataset_seed(seed: int, name: str) -> int:
    """The shuffle seed of one dataset of the mixture (so datasets of equal size are not shuffled alike)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


class MixtureSampler:
    """Like ShardSampler (``next_batch``, ``state_dict``, ``load_state_dict``), over several datasets laid end to
    end: dataset d's local index j is global index ``offsets[d] + j``. See the module docstring for the order."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int], weights: Sequence[float], *,
                 global_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not len(names) == len(sizes) == len(weights) or not names:
            raise ConfigError("a mixture needs one size and one weight per dataset name")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ConfigError(f"global batch {global_batch_size} must be a positive multiple of world size "
                              f"{world_size}")
        for name, n in zip(names, sizes):
            if n < 1:
                raise ConfigError(f"dataset {name!r} of the mixture has no samples")
        self.names, self.sizes, self.weights = list(names), [int(n) for n in sizes], [float(w) for w in weights]
        self.global_batch_size, self.rank, self.world_size, self.seed = global_batch_size, rank, world_size, seed
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.samplers = [ShardSampler(n, global_batch_size=1, seed=dataset_seed(seed, name))
                         for name, n in zip(self.names, self.sizes)]
        self.drawn = 0  # global sample positions drawn so far

    def next_global_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, global index) of every position of the next global batch; moves the cursor past it."""
        which = dataset_draws(self.seed, self.drawn, self.global_batch_size, self.weights)
        index = np.array([self.offsets[d] + self.samplers[d].next_batch()[0] for d in which], np.int64)
        self.drawn += self.global_batch_size
        return which, index

    def next_batch(self) -> np.ndarray:
        """This rank's global indices of the next global batch (its contiguous slice, as in ShardSampler)."""
        per_rank = self.global_batch_size // self.world_size
        return self.next_global_batch()[1][self.rank * per_rank:(self.rank + 1) * per_rank]

    def samples_drawn(self) -> list[int]:
        """Samples each dataset has given so far (all ranks, skipped steps included)."""
        return [s.epoch * s.num_samples + s.batch for s in self.samplers]

    def state_dict(self) -> dict:
        return {"version": MIXTURE_STATE_VERSION, "kind": "mixture", "seed": self.seed,
                "global_batch_size": self.global_batch_size, "drawn": self.drawn,
                "datasets": [{"name": n, "num_samples": k, "weight": w, "epoch": s.epoch, "batch": s.batch}
                             for n, k, w, s in zip(self.names, self.sizes, self.weights, self.samplers)]}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state``; the world size may differ, the datasets, weights, seed and global batch may not."""
        if state.get("kind") != "mixture" or state.get("version") != MIXTURE_STATE_VERSION:
            raise ConfigError("the checkpoint's data cursor is not a mixture's (was the run started on one dataset?)")
        saved = [(d["name"], d["num_samples"], d["weight"]) for d in state["datasets"]]
        now = list(zip(self.names, self.sizes, self.weights))
        if saved != now:
            raise ConfigError(f"data cursor was saved with the mixture (name, samples, weight) {saved}, this run has "
                              f"{now}")
        for key in ("seed", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"data cursor was saved with {key}={state[key]}, this run has {getattr(self, key)}")
        self.drawn = int(state["drawn"])
        for s, d in zip(self.samplers, state["datasets"]):
            s.epoch, s.batch, s._order = int(d["epoch"]), int(d["batch"]), None
