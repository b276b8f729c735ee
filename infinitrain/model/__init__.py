"""Model layer of infinitrain: ``InfiniLM``, its config and presets, and the seed-compatible building blocks."""

from infinitrain.model.config import ACTIVATIONS, PRESETS, ModelConfig, count_parameters, get_preset
from infinitrain.model.layers import MLP, Block, InfiniAttention, MoDBlock, RMSNorm
from infinitrain.model.llama import LoadReport, load_llama
from infinitrain.model.lm import InfiniLM, LMOutput, ModelState
from infinitrain.model.seed import (
    CompressiveMemory,
    InfiniTransformer,
    MoDInfiniTransformer,
    RoPEEmbeddings,
    YaRNEmbeddings,
)

__all__ = [
    "ACTIVATIONS", "MLP", "PRESETS", "Block", "InfiniAttention", "InfiniLM", "LMOutput", "MoDBlock", "ModelConfig",
    "ModelState", "RMSNorm", "count_parameters", "get_preset",
    # seed-compatible building blocks (infinitrain.model.seed)
    "CompressiveMemory", "InfiniTransformer", "MoDInfiniTransformer", "RoPEEmbeddings", "YaRNEmbeddings",
    # Hugging Face Llama import (infinitrain.model.llama)
    "LoadReport", "load_llama",
]
