"""Training: recipes -> TrainConfig, the DeepSpeed engine, truncated BPTT steps, atomic checkpoints, the loop."""

from infinitrain.train.config import TrainConfig, load_recipe
from infinitrain.train.loop import TrainState, train

__all__ = ["TrainConfig", "TrainState", "load_recipe", "train"]
