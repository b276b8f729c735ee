"""Model layer of infinitrain: ``InfiniLM``, its config and presets, its layers, and the Llama import.

The seed-compatible building blocks live in ``infinitrain.compat``."""

from infinitrain.model.config import ACTIVATIONS, PRESETS, ModelConfig, get_preset
from infinitrain.model.layers import MLP, Block, InfiniAttention, MoDBlock, RMSNorm
from infinitrain.model.llama import LoadReport, load_llama
from infinitrain.model.lm import InfiniLM, LMOutput, ModelState, count_parameters

__all__ = [
    "ACTIVATIONS", "MLP", "PRESETS", "Block", "InfiniAttention", "InfiniLM", "LMOutput", "MoDBlock", "ModelConfig",
    "ModelState", "RMSNorm", "count_parameters", "get_preset",
    # Hugging Face Llama import (infinitrain.model.llama)
    "LoadReport", "load_llama",
]
