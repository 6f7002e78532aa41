"""The JAX backend: Hessians of ``loss_fn(params, batch)`` for any parameter pytree.

``params`` may be a raw dict, a Flax ``params`` collection, an Equinox module's
array part or a Haiku parameter mapping: anything ``jax.tree_util`` flattens. The
Hessian-vector product is forward-over-reverse, ``jvp(grad(loss))``, with the columns
of a block mapped by ``vmap`` and the whole product compiled once by ``jax.jit``.
Within one call the primal (the gradient pass) does not depend on the column, so
``vmap`` evaluates it once and batches only the tangents: the saving
``jax.linearize`` would bring, without keeping every batch's residuals in memory
between products.

Parameters are named by their pytree path, keys joined by dots:
``{"layers": [{"w": ...}]}`` has the block ``"layers.0.w"``; a bare array is
``"params"``. Select blocks with those names or glob patterns (``"layers.0.*"``).

Vectors are immutable JAX arrays of the parameters' dtype on the parameters'
device; float64 needs ``jax.config.update("jax_enable_x64", True)``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from specops.layout import ParamLayout, select_names
from specops.model import ModelAdapter, ModelOperator, common_batch_size
from specops.operator import MatrixOperator, check_dense_symmetric
from specops.ops import VectorOps

_HIGHEST = jax.lax.Precision.HIGHEST


def _x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _device_of(x):
    devices = getattr(x, "devices", None)
    return next(iter(devices())) if devices is not None else jax.devices()[0]


@jax.jit
def _orthogonalize_twice(W, Q, columns):
    # columns is traced: one program per buffer shape; columns past it are masked out
    mask = (jnp.arange(Q.shape[1]) < columns).astype(W.dtype)[:, None]
    C1 = jnp.matmul(Q.T, W, precision=_HIGHEST) * mask
    W = W - jnp.matmul(Q, C1, precision=_HIGHEST)
    C2 = jnp.matmul(Q.T, W, precision=_HIGHEST) * mask
    return W - jnp.matmul(Q, C2, precision=_HIGHEST), C1, C2


@jax.jit
def _orthogonalize_probes(W, X, steps):
    mask = (jnp.arange(X.shape[0]) < steps).astype(W.dtype)[:, None]
    c1 = jnp.einsum("jnp,np->jp", X, W, precision=_HIGHEST) * mask
    W = W - jnp.einsum("jnp,jp->np", X, c1, precision=_HIGHEST)
    c2 = jnp.einsum("jnp,np->jp", X, W, precision=_HIGHEST) * mask
    return W - jnp.einsum("jnp,jp->np", X, c2, precision=_HIGHEST), c1, c2


class JaxOps(VectorOps):
    """Vector operations on JAX arrays of one dtype on one device.

    Args:
        dtype: float32 or float64 (float64 needs ``jax_enable_x64``).
        device: a ``jax.Device``; default the first device.

    Raises:
        TypeError: float64 while ``jax_enable_x64`` is off (JAX would silently
            compute in float32).
    """

    name = "jax"
    def __init__(self, dtype=np.float32, device=None):
        if np.dtype(dtype) == np.float64 and not _x64_enabled():
            raise TypeError(
                "float64 JAX vectors need 64-bit mode: call jax.config.update('jax_enable_x64', True) "
                "before creating arrays, or use float32"
            )
        self.jax_device = jax.devices()[0] if device is None else device
        super().__init__(dtype, f"{self.jax_device.platform}:{self.jax_device.id}")

    def is_native(self, x) -> bool:
        return isinstance(x, jax.Array)

    def asarray(self, x):
        return jax.device_put(jnp.asarray(x, dtype=self.dtype), self.jax_device)

    def to_numpy(self, x) -> np.ndarray:
        return np.array(x, dtype=np.float64)

    def zeros(self, shape):
        return jnp.zeros(shape, dtype=self.dtype, device=self.jax_device)

    def concat(self, arrays, axis: int):
        return jnp.concatenate(arrays, axis=axis)

    def inner(self, X, Y):
        return jnp.matmul(X.T, Y, precision=_HIGHEST)

    def combine(self, X, C):
        return jnp.matmul(X, self.asarray(C), precision=_HIGHEST)

    def column_norms(self, X) -> np.ndarray:
        return np.asarray(jnp.linalg.norm(X, axis=0), dtype=np.float64)

    def qr(self, X):
        return jnp.linalg.qr(X, mode="reduced")

    def all_finite(self, X) -> bool:
        return bool(jnp.isfinite(X).all())

    def orthogonalize(self, W, Q, columns=None):
        """As :meth:`VectorOps.orthogonalize`, as one compiled program.

        JAX compiles every new shape, and a growing basis has a new shape at every
        step: the whole buffer ``Q`` keeps one shape and the columns past ``columns``
        are masked out (they may hold stale vectors after a restart).
        """
        if Q is None or Q.shape[1] == 0 or columns == 0:
            return W, np.zeros((0, W.shape[1]))
        columns = Q.shape[1] if columns is None else int(columns)
        W, C1, C2 = _orthogonalize_twice(W, Q, columns)
        return W, (self.to_numpy(C1) + self.to_numpy(C2))[:columns]

    def combine_prefix(self, X, C):
        """As :meth:`VectorOps.combine_prefix`, with ``C`` padded by zero rows so the
        program keeps the buffer's shape."""
        C = np.asarray(C, dtype=np.float64)
        pad = np.zeros((X.shape[1], C.shape[1]))
        pad[: C.shape[0]] = C
        return self.combine(X, pad)

    def orthogonalize_probes(self, W, X, steps: int):
        """As :meth:`VectorOps.orthogonalize_probes`, over the whole fixed-shape stack
        with the slices past ``steps`` masked out."""
        W, c1, c2 = _orthogonalize_probes(W, X, int(steps))
        return W, (self.to_numpy(c1) + self.to_numpy(c2))[:steps]

    def write_block(self, buffer, start: int, X, axis: int = 1):
        return _write_block(buffer, start, X, axis)

    def einsum(self, spec: str, *arrays):
        return jnp.einsum(spec, *(self.asarray(a) for a in arrays), precision=_HIGHEST)


@partial(jax.jit, static_argnums=3)
def _write_block(buffer, start, X, axis):
    # start is traced: one program per block shape, not one per position
    return jax.lax.dynamic_update_slice_in_dim(buffer, X, start, axis)


def matrix_operator(x, symmetric=None) -> MatrixOperator:
    """A dense JAX matrix as an operator whose products stay in JAX on its device.

    Args:
        x: a square JAX array; integer matrices become the default float dtype.
        symmetric: as for :func:`specops.aslinearoperator`.

    Raises:
        ValueError: a non-square, non-finite or (with ``symmetric=None``) non-symmetric matrix.
    """
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"specops operators are square; got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    host = np.asarray(x, dtype=np.float64)
    if not np.isfinite(host).all():
        raise ValueError("the matrix has NaN or infinite entries")
    if symmetric is None:
        check_dense_symmetric(host, "JAX matrix")
    return MatrixOperator(x, JaxOps(x.dtype, _device_of(x)), symmetric=symmetric is not False)


def _path_name(path) -> str:
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


def _is_float_array(leaf) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _describe(leaf) -> str:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None:
        return str(dtype)
    return "function" if callable(leaf) else type(leaf).__name__


def batch_size(batch) -> int:
    """The common leading dimension of the arrays of a batch pytree."""
    return common_batch_size(tree_util.tree_leaves(batch))


class JaxAdapter(ModelAdapter):
    """The per-batch functions for ``loss_fn(params, batch)``, compiled once.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, a pure function (traced by JAX).
        params: the parameter pytree; its floating leaves are differentiated.
        wrt: ``None`` (every leaf) or names / glob patterns of pytree paths; the other
            leaves are held fixed and may be of any type.
        dtype: cast every floating leaf to this dtype first (e.g. float64); ``None``
            keeps the leaves' dtype.
        chunk_size: columns per compiled ``vmap`` call (memory grows with it).

    Raises:
        TypeError: a selected leaf is not a floating array (integer, function, ...),
            or selected leaves mix float dtypes.
    """

    engine = "jax: jit(vmap(jvp(grad(loss))))"

    def __init__(self, loss_fn, params, *, wrt=None, dtype=None, chunk_size: int = 16):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a function loss_fn(params, batch), got {type(loss_fn).__name__}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.loss_fn, self.wrt, self.chunk_size = loss_fn, wrt, int(chunk_size)
        self._cast = dtype
        if dtype is not None:
            params = tree_util.tree_map(lambda a: a.astype(dtype) if _is_float_array(a) else a, params)
        self.params = params
        paths_leaves, self._treedef = tree_util.tree_flatten_with_path(params)
        names = [_path_name(p) for p, _ in paths_leaves]
        leaves = [leaf for _, leaf in paths_leaves]
        if not leaves:
            raise ValueError("params is an empty pytree: there is nothing to differentiate")
        chosen = names if wrt is None else select_names(names, wrt)
        self._selected = [names.index(c) for c in chosen]
        bad = [f"{names[i]!r} ({_describe(leaves[i])})" for i in self._selected if not _is_float_array(leaves[i])]
        if bad:
            raise TypeError(
                f"only floating arrays can be differentiated, but params has {', '.join(bad)}. Pass "
                "wrt=[...] naming the floating leaves, or keep the others out of params (close over them "
                "in loss_fn; with Equinox, eqx.partition(model, eqx.is_inexact_array))"
            )
        dtypes = {np.dtype(leaves[i].dtype) for i in self._selected}
        if len(dtypes) > 1:
            raise TypeError(
                f"the selected leaves mix dtypes {sorted(d.name for d in dtypes)}; pass dtype=... to cast "
                "them to one"
            )
        first = leaves[self._selected[0]]
        self.ops = JaxOps(dtypes.pop(), _device_of(first))
        self.layout = ParamLayout(chosen, [tuple(leaves[i].shape) for i in self._selected])
        self._flat = self.flatten([leaves[i] for i in self._selected])
        # Array leaves held fixed travel as jit arguments (not baked-in constants); others are static.
        fixed = [i for i in range(len(leaves)) if i not in self._selected]
        self._fixed_index = [i for i in fixed if hasattr(leaves[i], "shape")]
        self._fixed = [leaves[i] for i in self._fixed_index]
        self._static = [None if i in self._selected or i in self._fixed_index else leaf
                        for i, leaf in enumerate(leaves)]
        self.num_traces = 0
        self._loss = jax.jit(self._scalar_loss)
        self._grad = jax.jit(jax.grad(self._scalar_loss))
        self._hvp = jax.jit(self._hvp_block)

    def as_params(self, v):
        """``v`` (n,) or (n, k) as a pytree like ``params``: the selected leaves from ``v``
        (with a leading axis of length k for a block), the other array leaves zeros, the
        rest as they are."""
        pieces = self.unflatten(v)
        leaves = tree_util.tree_leaves(self.params)
        lead = () if len(v.shape) == 1 else (int(v.shape[1]),)
        out = [jnp.zeros(lead + tuple(leaf.shape), self.ops.dtype) if hasattr(leaf, "shape") else leaf
               for leaf in leaves]
        for i, name in zip(self._selected, self.layout.names):
            out[i] = pieces[name]
        return tree_util.tree_unflatten(self._treedef, out)

    # --- pure functions (traced) ----------------------------------------------------
    def _tree(self, flat, fixed):
        leaves = list(self._static)
        for i, leaf in zip(self._fixed_index, fixed):
            leaves[i] = leaf
        for i, piece in zip(self._selected, self.layout.unflatten(flat, self.ops).values()):
            leaves[i] = piece
        return tree_util.tree_unflatten(self._treedef, leaves)

    def _scalar_loss(self, flat, fixed, batch):
        value = self.loss_fn(self._tree(flat, fixed), batch)
        shape = jnp.shape(value)
        if shape != ():
            raise ValueError(
                f"loss_fn must return a scalar, got shape {shape}; reduce it over the batch with "
                ".mean() (reduction='mean') or .sum() (reduction='sum'), and return only the loss"
            )
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise TypeError(f"loss_fn must return a floating scalar, got {jnp.result_type(value)}")
        return value

    def _hvp_block(self, flat, fixed, batch, V):
        self.num_traces += 1  # runs only while tracing: counts compilations

        def grad(p):
            return jax.grad(self._scalar_loss)(p, fixed, batch)

        def column(v):
            return jax.jvp(grad, (flat,), (v,))[1]

        return jax.vmap(column, in_axes=1, out_axes=1)(V)

    # --- ModelAdapter -----------------------------------------------------------------
    def batch_size(self, batch) -> int:
        return batch_size(batch)

    def loss(self, batch, delta=None) -> float:
        flat = self._flat if delta is None else self._flat + delta
        return float(self._loss(flat, self._fixed, batch))

    def gradient(self, batch):
        return self._grad(self._flat, self._fixed, batch)

    def hvp(self, index: int, batch, V):
        k, c = V.shape[1], self.chunk_size
        if k <= c:
            return self._hvp(self._flat, self._fixed, batch, V)
        return jnp.concatenate([self._hvp(self._flat, self._fixed, batch, V[:, j : j + c])
                                for j in range(0, k, c)], axis=1)

    def params_vector(self):
        return self._flat

    def subset(self, names: list[str]) -> JaxAdapter:
        return JaxAdapter(self.loss_fn, self.params, wrt=list(names), chunk_size=self.chunk_size)

    def determinism_hints(self) -> list[str]:
        return [
            ("loss_fn draws random numbers (dropout) from a key that changes between calls: fix the key "
             "or turn the randomness off (deterministic=True in Flax)"),
            "data that changes between passes (augmentation, a reshuffling loader)",
        ]


def hessian(loss_fn, params, data, *, wrt=None, reduction: str = "mean", comm=None,
            check_deterministic: bool = True, dtype=None, chunk_size: int = 16) -> ModelOperator:
    """The Hessian of ``loss_fn(params, batch)`` over ``data`` with respect to ``params``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, pure and traceable by JAX; it
            reduces over the batch as ``reduction`` says.
        params: any pytree of parameters (dict, Flax params, Equinox arrays, Haiku).
        data: one batch (a tuple or dict of arrays) or a re-iterable of batches; an
            unequal last batch is compiled for once.
        wrt: ``None`` (every leaf), or pytree-path names / glob patterns
            (``"layers.0.*"``) of the leaves to differentiate; the rest are held fixed.
        reduction: ``"mean"`` (batches weighted by sample count) or ``"sum"``.
        comm: ``None`` or a communicator; each rank passes its own shard of the data.
        check_deterministic: check every batch's loss is finite and that two identical
            products agree.
        dtype: cast the floating leaves first (``jnp.float64`` needs ``jax_enable_x64``).
        chunk_size: columns of a block evaluated by one compiled ``vmap`` call.

    Returns:
        A :class:`specops.ModelOperator`: ``H @ v`` takes and returns JAX arrays.

    Raises:
        TypeError: leaves that cannot be differentiated (integers, functions), or a
            loss that is not a floating scalar.
        ValueError: a loss that is not a scalar; a selection that matches nothing.
        specops.NonFiniteError: a non-finite loss (naming the batch).

    Example:
        >>> import jax.numpy as jnp
        >>> from specops.backends import jax as sj
        >>> params = {"w": jnp.array([1.0, 2.0])}
        >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0.5, 1.0])
        >>> H = sj.hessian(lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2), params, (x, y))
        >>> H.to_dense()
        array([[1., 0.],
               [0., 1.]])
    """
    adapter = JaxAdapter(loss_fn, params, wrt=wrt, dtype=dtype, chunk_size=chunk_size)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm,
                         check_deterministic=check_deterministic)
