"""Inference-side tools: load a model for inference, text generation, and the long-context evaluations (passkey, ppl, ROUGE)."""

from __future__ import annotations

__all__ = ["Codec", "load_for_inference"]


def __getattr__(name: str):
    # Lazy: `infinitrain --help` registers the eval commands without importing torch (1.5 s -> 0.1 s).
    if name in __all__:
        from infinitrain.evaluate import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
