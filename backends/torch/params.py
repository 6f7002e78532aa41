"""Parameter selection (``wrt=``), the model's dtype and device, embedding padding rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from specops.layout import select_names

from .ops import TorchOps


def _resolve_params(model: nn.Module, params: Any) -> list[str]:
    """Names of the selected trainable parameters, in model order."""
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    if params is None:
        return trainable
    items = params if isinstance(params, (list, tuple)) else [params]
    by_id = {id(p): n for n, p in named}
    names, patterns = set(), []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, nn.Module):
            found = [by_id[id(p)] for p in item.parameters() if id(p) in by_id]
            if not found:
                raise ValueError(f"the module {type(item).__name__} given in wrt is not part of the model")
            names.update(found)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError("a tensor given in wrt is not a parameter of the model")
            names.add(by_id[id(item)])
        else:
            raise TypeError(
                f"wrt takes names, glob patterns, modules or parameters; got {type(item).__name__}"
            )
    if patterns:
        names.update(select_names([n for n, _ in named], patterns))
    frozen = sorted(n for n in names if n not in trainable)
    chosen = [n for n in trainable if n in names]
    if not chosen:
        raise ValueError(
            f"wrt selects only frozen parameters ({', '.join(frozen[:6])}); set requires_grad=True "
            "on those you want the Hessian of"
        )
    return chosen


def _check_uniform(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    floating = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not floating:
        raise ValueError("the model has no floating-point parameters")
    on_meta = [n for n, p in floating if p.is_meta]
    if on_meta:
        raise ValueError(
            f"the model's parameters are on the meta device ({_listing(on_meta)}): they have shapes but no "
            "values (a model built under init_empty_weights() or with device='meta'). Materialize it first, "
            "e.g. model.to_empty(device='cpu') and load_state_dict(...), or build it on a real device"
        )
    kinds = {(p.dtype, p.device) for _, p in floating}
    if len(kinds) > 1:
        seen: dict[tuple[Any, Any], str] = {}
        for n, p in floating:
            seen.setdefault((p.dtype, p.device), n)
        listing = "; ".join(f"{n}: {d}, {dev}" for (d, dev), n in seen.items())
        raise ValueError(
            f"the model's parameters have mixed dtypes or devices ({listing}); move the whole model "
            "to one device and dtype, e.g. model.to(device, torch.float64)"
        )
    return floating[0][1].dtype, floating[0][1].device


def _padding_rows(model: nn.Module, blocks: dict[str, slice], ops: TorchOps) -> torch.Tensor | None:
    """A column (n, 1) of ones with zeros at the padding rows of ``nn.Embedding(padding_idx=...)``.

    PyTorch's gradient of an embedding leaves the ``padding_idx`` row out (it is never
    trained), although the loss depends on it. Its double backward then gives a Hessian that
    is not symmetric (the row's column is zero, its row is not), forward-over-reverse the
    transpose. The consistent operator treats the row as frozen, as the gradient does: zero
    row and column. None when the selection holds no such row.
    """
    mask = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or module.padding_idx is None:
            continue
        key = f"{name}.weight" if name else "weight"
        if key not in blocks:
            continue
        if mask is None:
            mask = ops.zeros((sum(b.stop - b.start for b in blocks.values()), 1)) + 1
        width = module.embedding_dim
        start = blocks[key].start + module.padding_idx % module.num_embeddings * width
        mask[start:start + width] = 0
    return mask


def _listing(names: Any, limit: int = 4) -> str:
    names = [n or "<model>" for n in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
