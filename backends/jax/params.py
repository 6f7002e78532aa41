"""Parameter selection: which leaves of a parameter pytree are differentiated, and their names.

Leaves are named by their pytree path, keys joined by dots (``{"layers": [{"w": ...}]}``
has the block ``"layers.0.w"``; a bare array is ``"params"``). A Flax NNX module or
state differentiates its ``nnx.Param`` leaves only (named by the variable, without
``.value``); a Flax linen variables dict its ``"params"`` collection (``batch_stats``
and the other state collections are held fixed); an Equinox module's array part is a
plain pytree. Only floating arrays of one dtype can be selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import tree_util

from specops.layout import select_names


def _path_name(path: Any) -> str:
    parts = []
    for key in path:
        if isinstance(key, tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key).strip(".[]'\""))
    return ".".join(parts) or "params"


def _nnx_kinds(params: Any, count: int) -> list[str] | None:
    """The Flax NNX variable type of each array leaf of ``params`` (``"Param"``, ``"BatchStat"``, ...).

    None when ``params`` holds no NNX variables (or Flax is not imported).
    """
    import sys

    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return None
    kinds: list[str] = []
    for node in tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        kind = type(node).__name__ if isinstance(node, nnx.Variable) else ""
        kinds.extend([kind] * len(tree_util.tree_leaves(node)) if kind else [kind])
    if len(kinds) != count or not any(kinds):
        return None
    return kinds


def _is_linen_variables(params: Any) -> bool:
    """A Flax linen variables dict: ``{"params": ..., "batch_stats": ...}`` (known collections only)."""
    from collections.abc import Mapping

    return (isinstance(params, Mapping) and "params" in params and len(params) > 1
            and set(params) - {"params"} <= _LINEN_STATE)


#: Flax linen collections that hold state, not parameters
_LINEN_STATE = {"batch_stats", "cache", "intermediates", "perturbations", "losses", "spectral_norm"}


def _nnx_parameters(chosen: list[str], names: list[str], kinds: list[str], explicit: bool) -> list[str]:
    """The ``nnx.Param`` leaves of ``chosen``: batch statistics and other state are never differentiated."""
    kind = dict(zip(names, kinds))
    others = [f"{n!r} ({kind[n]})" for n in chosen if kind[n] and kind[n] != "Param"]
    if others and explicit:
        raise TypeError(
            f"wrt= selects Flax NNX state that is not a parameter: {', '.join(others[:4])}; only nnx.Param "
            "leaves are differentiated. Select parameters only, or pass the parameters alone: "
            "graphdef, params, rest = nnx.split(model, nnx.Param, ...)")
    return [n for n in chosen if kind[n] in ("Param", "")]


def _is_float_array(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _describe(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None:
        return str(dtype)
    return "function" if callable(leaf) else type(leaf).__name__


@dataclass(frozen=True)
class Selection:
    """The leaves of a parameter pytree and which of them are differentiated.

    Attributes:
        treedef: the pytree's structure.
        leaves: every leaf, in ``tree_leaves`` order.
        names: the selected leaves' names, in order (the blocks of the flat vector).
        selected: the selected leaves' positions in :attr:`leaves`.
        dtype: the selected leaves' common floating dtype.
    """

    treedef: Any
    leaves: list[Any]
    names: list[str]
    selected: list[int]
    dtype: np.dtype


def select(params: Any, wrt: Any) -> Selection:
    """The leaves of ``params`` that ``wrt`` selects (``None``: every parameter leaf).

    Raises:
        ValueError: an empty pytree, or a selection that matches nothing.
        TypeError: a selected leaf is not a floating array, selected leaves mix float
            dtypes, or ``wrt`` names Flax NNX state that is not an ``nnx.Param``.
    """
    paths_leaves, treedef = tree_util.tree_flatten_with_path(params)
    names = [_path_name(p) for p, _ in paths_leaves]
    leaves = [leaf for _, leaf in paths_leaves]
    if not leaves:
        raise ValueError("params is an empty pytree: there is nothing to differentiate")
    kinds = _nnx_kinds(params, len(leaves))
    if kinds is not None:  # a Flax NNX module or state: name leaves by their variable, not ".value"
        names = [n[: -len(".value")] if k and n.endswith(".value") else n for n, k in zip(names, kinds)]
    chosen = names if wrt is None else select_names(names, wrt)
    if wrt is None and _is_linen_variables(params):  # batch_stats and other collections: held fixed
        chosen = [n for n in names if n.startswith("params.")]
    if kinds is not None:
        chosen = _nnx_parameters(chosen, names, kinds, explicit=wrt is not None)
    selected = [names.index(c) for c in chosen]
    if not selected:
        raise ValueError(f"nothing to differentiate: no parameter leaf among {names[:8]} is selected; pass "
                         "wrt=[...] naming floating leaves")
    bad = [f"{names[i]!r} ({_describe(leaves[i])})" for i in selected if not _is_float_array(leaves[i])]
    if bad:
        raise TypeError(
            f"only floating arrays can be differentiated, but params has {', '.join(bad)}. Pass "
            "wrt=[...] naming the floating leaves, or keep the others out of params (close over them "
            "in loss_fn; with Equinox, eqx.partition(model, eqx.is_inexact_array))"
        )
    dtypes = {np.dtype(leaves[i].dtype) for i in selected}
    if len(dtypes) > 1:
        raise TypeError(
            f"the selected leaves mix dtypes {sorted(d.name for d in dtypes)}; pass dtype=... to cast "
            "them to one"
        )
    return Selection(treedef, leaves, chosen, selected, dtypes.pop())


def cast(params: Any, dtype: Any) -> Any:
    """``params`` with every floating leaf cast to ``dtype`` (``None``: as they are)."""
    if dtype is None:
        return params
    return tree_util.tree_map(lambda a: a.astype(dtype) if _is_float_array(a) else a, params)
