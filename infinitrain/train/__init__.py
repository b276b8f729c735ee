"""Training: recipes -> TrainConfig, the DeepSpeed engine, truncated BPTT steps, atomic checkpoints, the loop."""

from __future__ import annotations

__all__ = ["TrainConfig", "TrainState", "load_recipe", "train"]
_WHERE = {"TrainConfig": "config", "load_recipe": "config", "TrainState": "loop", "train": "loop"}


def __getattr__(name: str):
    # Lazy, so that registering `infinitrain train` (and `--help`) does not import torch and DeepSpeed.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"infinitrain.train.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
