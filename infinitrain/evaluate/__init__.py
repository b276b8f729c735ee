"""Inference-side tools: load a model for inference, text generation, and the long-context evaluations (passkey, ppl, ROUGE)."""

from infinitrain.evaluate.loading import Codec, load_for_inference

__all__ = ["Codec", "load_for_inference"]
