"""Model layer of infinitrain: ``InfiniLM``, its config and presets, and the seed-compatible building blocks."""

from infinitrain.model.config import ACTIVATIONS, PRESETS, ModelConfig, count_parameters, get_preset
from infinitrain.model.layers import MLP, Block, InfiniAttention, MoDBlock, RMSNorm
from infinitrain.model.lm import InfiniLM, LMOutput, ModelState

__all__ = [
    "ACTIVATIONS", "MLP", "PRESETS", "Block", "InfiniAttention", "InfiniLM", "LMOutput", "MoDBlock", "ModelConfig",
    "ModelState", "RMSNorm", "count_parameters", "get_preset",
]
