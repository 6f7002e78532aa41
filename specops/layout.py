"""The layout of a model's parameters in the flat vectors the algorithms work on.

Every backend flattens the selected parameters, in model order, into one vector of
``n`` entries. :class:`ParamLayout` is that bookkeeping, written once: the names,
their shapes and offsets, selection by name or glob pattern, and the conversion
between flat vectors (one ``(n,)`` or a block ``(n, k)``) and per-parameter arrays.
A backend adapter only supplies the parameters' names and shapes and its
:class:`~specops.ops.VectorOps`; array operations go through those ops, so the same
code serves NumPy, torch, JAX and TensorFlow arrays.

Per-parameter arrays of a block carry the column index first: parameter ``name`` of
a block ``V`` (n, k) is an array of shape ``(k, *shape)`` whose ``[j]`` is column
``j`` of ``V`` (the layout of ``torch.func.vmap`` and ``jax.vmap`` outputs).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specops.ops import Array, VectorOps


def select_names(available: list[str], patterns: str | Iterable[str]) -> list[str]:
    """Resolve names or glob patterns against parameter names, keeping model order.

    A pattern matches a name equal to it, a glob match (``"layer1.*"``), or a name
    below it in the module tree (``"layer1"`` matches ``"layer1.0.weight"`` and
    ``"layer1/kernel"``).

    Raises:
        ValueError: a pattern matches nothing (listing what exists).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = set()
    for p in patterns:
        hits = [a for a in available
                if a == p or fnmatch.fnmatchcase(a, p) or a.startswith(p + ".") or a.startswith(p + "/")]
        if not hits:
            shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
            raise ValueError(f"no parameter matches {p!r}; parameters are: {shown}")
        chosen.update(hits)
    return [a for a in available if a in chosen]


class ParamLayout:
    """Names, shapes and offsets of parameters flattened into one vector, in order.

    Args:
        names: the parameter names, in the order of the flat vector (unique).
        shapes: each parameter's array shape.

    Raises:
        ValueError: names and shapes differ in number, or a name repeats.

    Examples:
        >>> import numpy as np
        >>> from specops.backends.numpy import NumpyOps
        >>> from specops.layout import ParamLayout
        >>> layout = ParamLayout(["w", "b"], [(2, 3), (2,)])
        >>> layout.num_params, layout.blocks["b"]
        (8, slice(6, 8, None))
        >>> parts = layout.unflatten(np.arange(8.0), NumpyOps())
        >>> parts["w"]
        array([[0., 1., 2.],
               [3., 4., 5.]])
        >>> layout.flatten(parts, NumpyOps())
        array([0., 1., 2., 3., 4., 5., 6., 7.])
    """

    def __init__(self, names: Iterable[str], shapes: Iterable[Sequence[int]]) -> None:
        names = [str(n) for n in names]
        shapes = [tuple(int(d) for d in s) for s in shapes]
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        self.names = names
        self.shapes = dict(zip(names, shapes))
        self.sizes = [math.prod(s) for s in shapes]
        self.blocks, offset = {}, 0
        for name, size in zip(names, self.sizes):
            self.blocks[name] = slice(offset, offset + size)
            offset += size
        self.num_params = offset

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and self.names == other.names and self.shapes == other.shapes

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}{list(self.shapes[n])}" for n in self.names[:4])
        more = f", ... ({len(self.names)} in all)" if len(self.names) > 4 else ""
        return f"ParamLayout({shown}{more}; {self.num_params} entries)"

    # --- selection -------------------------------------------------------------------
    def select(self, patterns: str | Iterable[str]) -> list[str]:
        """The names matched by names / glob patterns, in layout order (see :func:`select_names`)."""
        return select_names(self.names, patterns)

    def subset(self, names: Iterable[str]) -> ParamLayout:
        """The layout of the named parameters only, in this layout's order."""
        unknown = [n for n in names if n not in self.shapes]
        if unknown:
            raise KeyError(f"unknown parameters: {', '.join(unknown[:6])}")
        chosen = set(names)
        kept = [n for n in self.names if n in chosen]
        return ParamLayout(kept, [self.shapes[n] for n in kept])

    # --- flat <-> per-parameter ----------------------------------------------------------
    def _check_rows(self, v: Array) -> None:
        rows = int(v.shape[0]) if len(v.shape) else 0
        if len(v.shape) not in (1, 2) or rows != self.num_params:
            raise ValueError(
                f"expected a flat vector ({self.num_params},) or a block ({self.num_params}, k), "
                f"got shape {tuple(v.shape)}"
            )

    def unflatten(self, v: Array, ops: VectorOps) -> dict[str, Array]:
        """A flat vector or block as ``name -> array``.

        Args:
            v: native ``(n,)`` or ``(n, k)``.
            ops: the backend's vector operations (for reshapes and transposes).

        Returns:
            ``name -> array`` of the parameter's shape, or ``(k, *shape)`` for a block.
        """
        self._check_rows(v)
        if len(v.shape) == 1:
            return {n: ops.reshape(v[self.blocks[n]], self.shapes[n]) for n in self.names}
        k = int(v.shape[1])
        return {n: ops.reshape(ops.transpose(v[self.blocks[n]]), (k, *self.shapes[n])) for n in self.names}

    def flatten(self, arrays: dict[str, Any] | Iterable[Any], ops: VectorOps) -> Array:
        """Per-parameter arrays as one flat vector (n,) or a block (n, k).

        Args:
            arrays: ``name -> array`` with every name of the layout (extra names are an
                error, so a misspelt or foreign parameter is never dropped silently), or
                a sequence in layout order. Arrays of the parameters' shapes give
                ``(n,)``; arrays of shape ``(k, *shape)`` give ``(n, k)``.
            ops: the backend's vector operations.

        Raises:
            KeyError: names missing or not in the layout.
            ValueError: arrays whose shapes do not fit the parameters.
        """
        if isinstance(arrays, dict):
            missing = [n for n in self.names if n not in arrays]
            extra = [n for n in arrays if n not in self.shapes]
            if missing or extra:
                raise KeyError(
                    (f"missing parameters: {', '.join(missing[:6])}" if missing else "")
                    + ("; " if missing and extra else "")
                    + (f"not parameters of this operator: {', '.join(map(str, extra[:6]))}" if extra else "")
                )
            pieces = [arrays[n] for n in self.names]
        else:
            pieces = list(arrays)
            if len(pieces) != len(self.names):
                raise ValueError(f"expected {len(self.names)} arrays (one per parameter), got {len(pieces)}")
        pieces = [ops.asarray(p) for p in pieces]
        if not pieces:
            return ops.zeros((0,))
        first, shape0 = tuple(pieces[0].shape), self.shapes[self.names[0]]
        block = len(first) == len(shape0) + 1 and first[1:] == shape0
        k: Any = first[0] if block else None
        for name, p in zip(self.names, pieces):
            want = (k, *self.shapes[name]) if block else self.shapes[name]
            if tuple(p.shape) != want:
                raise ValueError(f"parameter {name!r}: expected shape {want}, got {tuple(p.shape)}")
        if not block:
            return ops.concat([ops.reshape(p, (-1,)) for p in pieces], axis=0)
        return ops.transpose(ops.concat([ops.reshape(p, (k, -1)) for p in pieces], axis=1))
