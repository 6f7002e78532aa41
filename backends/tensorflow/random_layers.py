"""Random layers: the Keras layers that draw random numbers when called with ``training=True``."""

from __future__ import annotations

from typing import Any

RANDOM_LAYERS = ("error", "fixed")
_RANDOM_NAME_PARTS = ("Dropout", "Noise", "Random")


def _layers(model: Any) -> list:
    """The model and every layer nested in it (Keras), or ``[]`` for other callables."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=True, recursive=True))
    return []


def _random_layers(model: Any) -> list:
    """Keras layers that draw random numbers when called with ``training=True``."""
    return [layer for layer in _layers(model)
            if getattr(layer, "seed_generator", None) is not None
            or any(part in type(layer).__name__ for part in _RANDOM_NAME_PARTS)]


def _describe(layer: Any) -> str:
    rate = next((getattr(layer, a) for a in ("rate", "stddev") if hasattr(layer, a)), None)
    return f"{layer.name} ({type(layer).__name__}" + ("" if rate is None else f", {rate:g}") + ")"

