"""Seed-compatible building blocks (the API of dingo-actual/infini-transformer), kept apart from
``infinitrain.model``."""

from infinitrain.compat.seed import (
    CompressiveMemory,
    InfiniTransformer,
    MoDInfiniTransformer,
    RoPEEmbeddings,
    YaRNEmbeddings,
    seed_betas_to_scalar,
)

__all__ = ["CompressiveMemory", "InfiniTransformer", "MoDInfiniTransformer", "RoPEEmbeddings", "YaRNEmbeddings",
           "seed_betas_to_scalar"]
