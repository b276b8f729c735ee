"""What a run trains for: ``task: lm`` (next-token prediction) or ``task: classification``.

Classification reuses the whole trainer unchanged (TBPTT windows, DeepSpeed, the loss function): the model
ends in a class head (``model.labels``: ``InfiniLM`` then returns class logits (B, T, C) in place of token
logits), and each sample's one trained position (the last text token, see ``data_tools/SHARD_FORMAT.md``:
its hidden state has read the whole text through the memory) gets the sample's class id as its target. The
trainer's token cross-entropy over the loss mask is then exactly the cross-entropy of the class logits read at
that position, per sample. The class names come from the prepared data's index (``labels.names``) and are
recorded in the run's config.yaml (``model.labels``) and in every export's config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from infinitrain.errors import ConfigError, DataError
from infinitrain.train.config import TrainConfig
from infinitrain.train.data import MixtureSource, Sample, SampleSource


def index_labels(path: str | Path) -> list[str] | None:
    """The class names of a prepared folder (``labels.names`` of its index.json), None if it has none."""
    index = Path(path) / "index.json"
    if not index.is_file():
        return None
    try:
        names = json.loads(index.read_text()).get("labels", {}).get("names")
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{index}: unreadable index ({err})") from None
    return list(names) if names else None


def data_labels(cfg: TrainConfig, sources: tuple | None) -> list[str] | None:
    """The class names of the training data: of ``sources[0]`` when given, else of ``data.path`` (every
    dataset of a mixture must have the same names)."""
    if sources is not None:
        src = sources[0]
        parts = src.parts if isinstance(src, MixtureSource) else [src]
        found = [getattr(p, "label_names", None) for p in parts]
        where = [f"dataset {i}" for i in range(len(parts))]
    else:
        path = cfg.data.path
        if path is None:
            return None
        if isinstance(path, dict):
            from infinitrain.data_tools.mixture import parse_mixture

            entries = parse_mixture(path)
            found, where = [index_labels(e.path) for e in entries], [str(e.path) for e in entries]
        else:
            found, where = [index_labels(path)], [str(path)]
    for names, w in zip(found, where):
        if names is None:
            raise DataError(f"{w}: task classification needs labelled data (`infinitrain prepare --format "
                            "classification`: label names in index.json)")
        if list(names) != list(found[0]):
            raise DataError(f"{w}: label names {names} differ from {where[0]}'s {found[0]}")
    return list(found[0]) if found else None


def resolve(cfg: TrainConfig, sources: tuple | None = None) -> TrainConfig:
    """``task: classification``: ``model.labels`` from the data (or checked against it when the recipe sets it).
    A language model's config is returned unchanged."""
    if cfg.task != "classification":
        return cfg
    names = data_labels(cfg, sources)
    if names is None:
        if cfg.model.labels is None:
            raise ConfigError("task classification: no training data to read the class names from "
                              "(pass --data DIR or set data.path)")
        return cfg
    if cfg.model.labels is not None and list(cfg.model.labels) != names:
        raise ConfigError(f"model.labels {list(cfg.model.labels)} differ from the data's label names {names}")
    return cfg.replace(model=cfg.model.replace(labels=names))


class LabelTargets:
    """A classification source as the trainer reads it: the sample's class id is the target at its one
    loss-mask position (the last text token), 0 elsewhere (masked out); everything else as the underlying source."""

    def __init__(self, source: SampleSource, n_classes: int):
        self.source, self.n_classes = source, n_classes
        self.sample_len, self.vocab_size = source.sample_len, source.vocab_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Sample:
        s = self.source[i]
        where = s.loss_mask.nonzero()
        if s.label is None or not 0 <= s.label < self.n_classes or len(where) != 1:
            raise DataError(f"sample {s.sample_id}: a classification sample needs one label in 0..{self.n_classes - 1} "
                            f"and one trained position (got label {s.label}, {len(where)} positions)")
        # class ids everywhere (masked out but in range), the label at its position
        targets = torch.zeros_like(s.targets)
        targets[where[0, 0]] = s.label
        return s._replace(targets=targets)


def task_sources(cfg: TrainConfig, sources: tuple) -> tuple:
    """(train, val) as the task trains on them: unchanged for ``lm``, :class:`LabelTargets` for classification."""
    if cfg.task != "classification":
        return sources
    n = len(cfg.model.labels)

    def wrap(s):
        if isinstance(s, MixtureSource):  # stays a mixture for the sampler and the per-dataset metrics
            return MixtureSource(s.names, [LabelTargets(p, n) for p in s.parts], s.weights)
        return None if s is None else LabelTargets(s, n)

    return tuple(wrap(s) for s in sources)
