"""Inference: read a run, checkpoint or export into a model (``loading``), generate at constant memory (``generate``),
text in and out for `infinitrain generate` (``textgen``)."""

from __future__ import annotations

__all__ = ["Codec", "load_for_inference"]


def __getattr__(name: str):
    # Lazy: `infinitrain --help` registers the generate command without importing torch (1.5 s -> 0.1 s).
    if name in __all__:
        from infinitrain.infer import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
