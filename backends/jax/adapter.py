"""The per-batch functions of ``loss_fn(params, batch)`` (:class:`JaxAdapter`), compiled once.

The parameters selected (:mod:`.params`) travel as one flat vector; a pytree like
``params`` is rebuilt from it inside every compiled function, the leaves held fixed
passed as arguments. Products come from the engine in use (:mod:`.engines`); a batch is
split over several devices where the adapter has a :class:`~.batches.DataMesh`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

from specops._checks import positive_int
from specops.checks import identity, owner_of
from specops.layout import ParamLayout
from specops.model import ModelAdapter

from .batches import DataMesh, batch_size
from .engines import Engine, EngineChoice, FiniteDifference, ForwardOverReverse, choose, fall_back
from .ops import JaxOps, _device_of
from .params import cast, select


class JaxAdapter(ModelAdapter):
    """The per-batch functions for ``loss_fn(params, batch)``, compiled once.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, a pure function (traced by JAX).
        params: the parameter pytree; its floating leaves are differentiated. A Flax NNX
            module or state: only its ``nnx.Param`` leaves (see :func:`hessian`).
        wrt: ``None`` (every leaf) or names / glob patterns of pytree paths; the other
            leaves are held fixed and may be of any type.
        dtype: cast every floating leaf to this dtype first (e.g. float64); ``None``
            keeps the leaves' dtype.
        chunk_size: columns per compiled ``vmap`` call (memory grows with it).
        devices: ``None`` (the parameters' device), or the devices to split every batch
            over (see :class:`DataMesh`).
        engine: one of :data:`ENGINES` (see :func:`hessian`).

    Raises:
        TypeError: a selected leaf is not a floating array (integer, function, ...),
            or selected leaves mix float dtypes.
    """

    def __init__(self, loss_fn: Callable[..., Any], params: Any, *, wrt: Any = None, dtype: Any = None,
                 chunk_size: int = 16, devices: Any = None, engine: Engine = "auto") -> None:
        self.choice: EngineChoice = choose(engine)
        self.requested_engine, self.engine = self.choice.requested, self.choice.engine
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a function loss_fn(params, batch), got {type(loss_fn).__name__}")
        self.loss_fn, self.wrt, self.chunk_size = loss_fn, wrt, positive_int("chunk_size", chunk_size)
        self._params_loss = loss_fn  # what is differentiated (a subclass may name another loss_fn)
        self._cast = dtype
        self.params = params = cast(params, dtype)
        selection = select(params, wrt)
        self._treedef, self._selected = selection.treedef, selection.selected
        leaves = selection.leaves
        self.layout = ParamLayout(selection.names, [tuple(leaves[i].shape) for i in self._selected])
        self.ops = self._vector_ops(selection.dtype, leaves[self._selected[0]])
        self._flat = self._flatten_params([leaves[i] for i in self._selected])
        # Array leaves held fixed travel as jit arguments (not baked-in constants); others are static.
        fixed = [i for i in range(len(leaves)) if i not in self._selected]
        self._fixed_index = [i for i in fixed if hasattr(leaves[i], "shape")]
        self._fixed = [leaves[i] for i in self._fixed_index]
        self._static = [None if i in self._selected or i in self._fixed_index else leaf
                        for i, leaf in enumerate(leaves)]
        self._loss = jax.jit(self._scalar_loss)
        self._grad = jax.jit(jax.grad(self._scalar_loss))
        self.mesh = None if devices is None else DataMesh(devices, self.ops.jax_device)
        self.engines = self._engines()

    def _vector_ops(self, dtype: Any, first: Any) -> JaxOps:
        """The vectors' operations: on the device of the first selected leaf."""
        return JaxOps(dtype, _device_of(first))

    def _flatten_params(self, pieces: list[Any]) -> Any:
        """The selected leaves as one flat vector (:meth:`_tree` reverses it)."""
        return self.flatten(pieces)

    def _engines(self, constrain: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None
                 ) -> dict[str, ForwardOverReverse | FiniteDifference]:
        """The product engines by name, on the current parameters."""
        exact = ForwardOverReverse(self._scalar_loss, self._call, self.chunk_size, constrain)
        differences = FiniteDifference(self.gradient_at, self._flat, self.layout.num_params, self.ops)
        return {exact.name: exact, differences.name: differences}

    @property
    def num_traces(self) -> int:
        """How many times the forward-over-reverse product was traced (each a compilation)."""
        engine = self.engines["forward_over_reverse"]
        assert isinstance(engine, ForwardOverReverse)
        return engine.num_traces

    def as_params(self, v: Any) -> Any:
        """``v`` (n,) or (n, k) as a pytree like ``params``.

        The selected leaves come from ``v`` (with a leading axis of length k for a block),
        the other array leaves are zeros, the rest as they are.
        """
        pieces = self.unflatten(v)
        leaves = tree_util.tree_leaves(self.params)
        lead = () if len(v.shape) == 1 else (int(v.shape[1]),)
        out = [jnp.zeros(lead + tuple(leaf.shape), self.ops.dtype) if hasattr(leaf, "shape") else leaf
               for leaf in leaves]
        for i, name in zip(self._selected, self.layout.names):
            out[i] = pieces[name]
        return tree_util.tree_unflatten(self._treedef, out)

    # --- pure functions (traced) ----------------------------------------------------
    def _tree(self, flat: Any, fixed: Any) -> Any:
        leaves = list(self._static)
        for i, leaf in zip(self._fixed_index, fixed):
            leaves[i] = leaf
        for i, piece in zip(self._selected, self.layout.unflatten(flat, self.ops).values()):
            leaves[i] = piece
        return tree_util.tree_unflatten(self._treedef, leaves)

    def _scalar_loss(self, flat: Any, fixed: Any, batch: Any) -> Any:
        value = self._params_loss(self._tree(flat, fixed), batch)
        shape = jnp.shape(value)
        if shape != ():
            raise ValueError(
                f"loss_fn must return a scalar, got shape {shape}; reduce it over the batch with "
                ".mean() (reduction='mean') or .sum() (reduction='sum'), and return only the loss"
            )
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise TypeError(f"loss_fn must return a floating scalar, got {jnp.result_type(value)}")
        return value

    # --- ModelAdapter -----------------------------------------------------------------
    def batch_size(self, batch: Any) -> int:
        return batch_size(batch)

    def _call(self, fn: Callable[..., Any], batch: Any, *vectors: Any) -> Any:
        """``fn(flat, fixed, batch, *vectors)``, over the mesh's devices where there is one."""
        if self.mesh is None or not self.mesh.splits(batch):
            return fn(self._flat, self._fixed, batch, *vectors)
        m = self.mesh
        return m.gather(fn(m.replicate(self._flat), m.replicate(self._fixed), m.split(batch),
                           *map(m.replicate, vectors)))

    def loss(self, batch: Any, delta: Any = None) -> float:
        if delta is None:
            return float(self._call(self._loss, batch))
        return float(self._call(lambda flat, *rest: self._loss(flat + rest[-1], *rest[:-1]), batch, delta))

    def gradient(self, batch: Any) -> Any:
        return self._call(self._grad, batch)

    def hvp(self, index: int, batch: Any, V: Any) -> Any:
        return self.engines[self.engine].products(batch, V)

    def hvp_vector(self, index: int, batch: Any, v: Any) -> Any:
        return self.engines[self.engine].vector(batch, v)

    # --- primitives of the core's engine check (specops.checks) -----------------------
    def check_product(self, batch: Any, V: Any) -> Any:
        # column by column: the program of the determinism check's single column, not a new one
        return jnp.concatenate([self.hvp(0, batch, V[:, j : j + 1]) for j in range(V.shape[1])], axis=1)

    def gradient_at(self, batch: Any, delta: Any) -> Any:
        return self._call(lambda flat, *rest: self._grad(flat + rest[-1], *rest[:-1]), batch, delta)

    def use_finite_differences(self) -> None:
        self.choice = fall_back(self.choice)
        self.engine = self.choice.engine

    def verdict_key(self, batch: Any) -> tuple[Any, Any] | None:
        shapes = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in tree_util.tree_leaves(batch))
        key = (identity(self.loss_fn), tuple(self.layout.names), self.ops.dtype.name, self.requested_engine,
               self._treedef, shapes)
        return owner_of(self.loss_fn), key

    def params_vector(self) -> Any:
        return self._flat

    def subset(self, names: list[str]) -> JaxAdapter:
        return JaxAdapter(self.loss_fn, self.params, wrt=list(names), chunk_size=self.chunk_size,
                          devices=None if self.mesh is None else self.mesh.mesh, engine=self.choice.requested)

    def determinism_hints(self) -> list[str]:
        return [
            ("loss_fn draws random numbers (dropout) from a key that changes between calls: fix the key "
             "or turn the randomness off (deterministic=True in Flax)"),
            "data that changes between passes (augmentation, a reshuffling loader)",
        ]

