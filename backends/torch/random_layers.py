"""Random-layer detection: modules that draw random numbers in training mode, torch's generator states."""

from __future__ import annotations

from typing import Literal, get_args
import torch
from torch import nn

#: What a random forward pass does: raise, or keep one fixed mask.
RandomLayers = Literal["error", "fixed"]
RANDOM_LAYERS: tuple[RandomLayers, ...] = get_args(RandomLayers)
_RANDOM_NAME_PARTS = ("Dropout", "DropPath", "DropBlock", "StochasticDepth")


def _random_modules(model: nn.Module) -> list[str]:
    """``"name (Class, p=...)"`` for each module that draws random numbers in its current mode."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        cls = type(m).__name__
        if isinstance(m, nn.MultiheadAttention):
            p = m.dropout
        elif isinstance(m, nn.RReLU):
            found.append(f"{name or '<model>'} ({cls}, lower={m.lower}, upper={m.upper})")
            continue
        elif isinstance(m, nn.modules.dropout._DropoutNd) or any(part in cls for part in _RANDOM_NAME_PARTS):
            p = next((getattr(m, a) for a in ("p", "drop_prob", "drop_rate") if hasattr(m, a)), None)
        else:
            continue
        if isinstance(p, (int, float)) and p == 0:
            continue
        found.append(f"{name or '<model>'} ({cls}" + ("" if p is None else f", p={p:g}") + ")")
    return found


def _random_layers_fix() -> str:
    return (
        "Call model.eval() first (this also switches batch norm to its running statistics; to "
        "turn off only the random layers: `for m in model.modules(): if 'Dropout' in "
        "type(m).__name__: m.eval()`), or pass random_layers='fixed' to take the Hessian of one "
        "fixed random sub-network (each batch keeps one mask in every product)"
    )


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states
