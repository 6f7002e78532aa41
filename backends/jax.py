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

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from specops.checks import finite_difference_products, identity, machine_epsilon, owner_of
from specops.layout import ParamLayout, select_names
from specops.model import ModelAdapter, ModelOperator, common_batch_size
from specops.operator import MatrixOperator, check_dense_symmetric
from specops.ops import VectorOps

_HIGHEST = jax.lax.Precision.HIGHEST
#: Hessian-product engines: ``jvp`` of ``grad`` (exact), or central differences of gradients
ENGINES = ("auto", "forward_over_reverse", "finite_difference")


def _x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _device_of(x: Any) -> Any:
    devices = getattr(x, "devices", None)
    return next(iter(devices())) if devices is not None else jax.devices()[0]


@jax.jit
def _project_prefix(W: Any, Q: Any, columns: Any) -> tuple[Any, Any]:
    # columns is traced: one program per buffer shape; columns past it are masked out
    mask = (jnp.arange(Q.shape[1]) < columns).astype(W.dtype)[:, None]
    C = jnp.matmul(Q.T, W, precision=_HIGHEST) * mask
    return W - jnp.matmul(Q, C, precision=_HIGHEST), C


@partial(jax.jit, static_argnums=3)
def _project_window(W: Any, Q: Any, start: Any, width: int) -> tuple[Any, Any]:
    # start is traced: one program per window width, not one per position
    Qs = jax.lax.dynamic_slice_in_dim(Q, start, width, axis=1)
    C = jnp.matmul(Qs.T, W, precision=_HIGHEST)
    return W - jnp.matmul(Qs, C, precision=_HIGHEST), C


@jax.jit
def _all_finite(X: Any) -> Any:
    return jnp.isfinite(X).all()


@jax.jit
def _project_probes_prefix(W: Any, X: Any, steps: Any) -> tuple[Any, Any]:
    mask = (jnp.arange(X.shape[0]) < steps).astype(W.dtype)[:, None]
    c = jnp.einsum("jnp,np->jp", X, W, precision=_HIGHEST) * mask
    return W - jnp.einsum("jnp,jp->np", X, c, precision=_HIGHEST), c


@partial(jax.jit, static_argnums=3)
def _project_probes_window(W: Any, X: Any, start: Any, width: int) -> tuple[Any, Any]:
    B = jax.lax.dynamic_slice_in_dim(X, start, width, axis=0)
    c = jnp.einsum("jnp,np->jp", B, W, precision=_HIGHEST)
    return W - jnp.einsum("jnp,jp->np", B, c, precision=_HIGHEST), c


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
    def __init__(self, dtype: Any = np.float32, device: Any = None) -> None:
        if np.dtype(dtype) == np.float64 and not _x64_enabled():
            raise TypeError(
                "float64 JAX vectors need 64-bit mode: call jax.config.update('jax_enable_x64', True) "
                "before creating arrays, or use float32"
            )
        self.jax_device = jax.devices()[0] if device is None else device
        super().__init__(dtype, f"{self.jax_device.platform}:{self.jax_device.id}")

    def is_native(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def asarray(self, x: Any) -> Any:
        if isinstance(x, jax.Array) and x.dtype == self.dtype and x.sharding.device_set == {self.jax_device}:
            return x  # already in place: no dispatch (60 us a product on small models)
        return jax.device_put(jnp.asarray(x, dtype=self.dtype), self.jax_device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(x, dtype=np.float64)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return jnp.zeros(shape, dtype=self.dtype, device=self.jax_device)

    def concat(self, arrays: Any, axis: int) -> Any:
        return jnp.concatenate(arrays, axis=axis)

    def inner(self, X: Any, Y: Any) -> Any:
        return jnp.matmul(X.T, Y, precision=_HIGHEST)

    def combine(self, X: Any, C: Any) -> Any:
        return jnp.matmul(X, self.asarray(C), precision=_HIGHEST)

    def column_norms(self, X: Any) -> np.ndarray:
        return np.asarray(jnp.linalg.norm(X, axis=0), dtype=np.float64)

    def qr(self, X: Any) -> tuple[Any, Any]:
        return jnp.linalg.qr(X, mode="reduced")

    def all_finite(self, X: Any) -> bool:
        return bool(_all_finite(X))  # one compiled program: one dispatch, not two

    def project(self, W: Any, Q: Any, start: int, stop: int) -> tuple[Any, np.ndarray]:
        """As :meth:`VectorOps.project`, as one compiled program per buffer shape.

        JAX compiles every new shape, and a growing basis has a new shape at every
        step: a pass from column 0 runs over the whole buffer ``Q`` with the columns
        past ``stop`` masked out (they may hold stale vectors after a restart), and a
        pass over a window slices it at a traced position.
        """
        if start == 0:
            W, C = _project_prefix(W, Q, int(stop))
        else:
            W, C = _project_window(W, Q, int(start), int(stop - start))
        return W, self.to_numpy(C)[: stop - start]

    def combine_prefix(self, X: Any, C: np.ndarray) -> Any:
        """As :meth:`VectorOps.combine_prefix`, with ``C`` padded by zero rows.

        The padding keeps the program at the buffer's shape.
        """
        C = np.asarray(C, dtype=np.float64)
        pad = np.zeros((X.shape[1], C.shape[1]))
        pad[: C.shape[0]] = C
        return self.combine(X, pad)

    def project_probes(self, W: Any, X: Any, start: int, stop: int) -> tuple[Any, np.ndarray]:
        """As :meth:`VectorOps.project_probes`, as :meth:`project` does for a basis.

        A pass from slice 0 runs over the whole fixed-shape stack with the slices past
        ``stop`` masked out; a window is sliced at a traced position.
        """
        if start == 0:
            W, c = _project_probes_prefix(W, X, int(stop))
        else:
            W, c = _project_probes_window(W, X, int(start), int(stop - start))
        return W, self.to_numpy(c)[: stop - start]

    def to_host(self, X: Any) -> np.ndarray:
        return np.asarray(X)

    def write_block(self, buffer: Any, start: int, X: Any, axis: int = 1) -> Any:
        return _write_block(buffer, start, X, axis)

    def free_memory(self) -> int:
        """As :meth:`VectorOps.free_memory`: the device's ``bytes_limit - bytes_in_use``.

        That is where JAX reports them (GPUs, TPUs), else host memory.
        """
        stats = self.jax_device.memory_stats() if hasattr(self.jax_device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        return super().free_memory()

    def einsum(self, spec: str, *arrays: Any) -> Any:
        return jnp.einsum(spec, *(self.asarray(a) for a in arrays), precision=_HIGHEST)


@partial(jax.jit, static_argnums=3)
def _write_block(buffer: Any, start: Any, X: Any, axis: int) -> Any:
    # start is traced: one program per block shape, not one per position
    return jax.lax.dynamic_update_slice_in_dim(buffer, X, start, axis)


def matrix_operator(x: Any, symmetric: bool | None = None) -> MatrixOperator:
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


def batch_size(batch: Any) -> int:
    """The common leading dimension of the arrays of a batch pytree."""
    return common_batch_size(tree_util.tree_leaves(batch))


class DataMesh:
    """Data parallelism over the devices of one process, in one compiled program.

    A batch is split along its leading (sample) axis over a one-axis
    ``jax.sharding.Mesh`` (``NamedSharding(mesh, P("data"))``); the parameters and the
    product block are replicated. ``jax.jit`` of the unchanged loss then runs every
    device on its slice of the batch and sums the partial gradients and products with
    one all-reduce inside the program, so the result is the one-device product up to
    the order of the sums.

    Args:
        devices: ``"local"`` (``jax.local_devices()``), a list of ``jax.Device``, or a
            ``jax.sharding.Mesh`` (the batch is split over all of its axes).
        home: the device the results go back to (the operator's vectors live there).

    Raises:
        ValueError: no device, or a device of another process (split the data across
            processes with ``comm=`` instead).
    """

    def __init__(self, devices: Any, home: Any) -> None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if isinstance(devices, str):
            if devices != "local":
                raise ValueError(f"devices must be 'local', a list of devices or a Mesh, got {devices!r}")
            devices = jax.local_devices(backend=home.platform)
        if isinstance(devices, Mesh):
            self.mesh, axes = devices, tuple(devices.axis_names)
        else:
            devices = list(devices)
            if not devices:
                raise ValueError("devices is empty: pass 'local', a list of jax devices or a Mesh")
            self.mesh, axes = Mesh(np.array(devices), ("data",)), ("data",)
        remote = [d for d in self.mesh.devices.flat if d.process_index != jax.process_index()]
        if remote:
            raise ValueError(
                f"devices holds {len(remote)} device(s) of other processes; a batch is split over this "
                "process's devices only: give each process its own shard of the data and pass comm=..."
            )
        self.size = int(self.mesh.devices.size)
        self.home = home
        self._split = NamedSharding(self.mesh, PartitionSpec(axes))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())

    def splits(self, batch: Any) -> bool:
        """Whether ``batch`` is split: its size is a multiple of the number of devices."""
        return self.size > 1 and batch_size(batch) % self.size == 0

    def split(self, batch: Any) -> Any:
        def put(x: Any) -> Any:
            return jax.device_put(x, self._split) if getattr(x, "ndim", 0) >= 1 else x
        return tree_util.tree_map(put, batch)

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self._replicated)

    def gather(self, x: Any) -> Any:
        return jax.device_put(x, self.home)

    def __repr__(self) -> str:
        return f"DataMesh({self.size} devices: {', '.join(str(d) for d in self.mesh.devices.flat)})"


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
                 chunk_size: int = 16, devices: Any = None, engine: str = "auto") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.requested_engine = engine
        self.engine = "forward_over_reverse" if engine == "auto" else engine
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
        kinds = _nnx_kinds(params, len(leaves))
        if kinds is not None:  # a Flax NNX module or state: name leaves by their variable, not ".value"
            names = [n[: -len(".value")] if k and n.endswith(".value") else n for n, k in zip(names, kinds)]
        chosen = names if wrt is None else select_names(names, wrt)
        if wrt is None and _is_linen_variables(params):  # batch_stats and other collections: held fixed
            chosen = [n for n in names if n.startswith("params.")]
        if kinds is not None:
            chosen = _nnx_parameters(chosen, names, kinds, explicit=wrt is not None)
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
        self.mesh = None if devices is None else DataMesh(devices, self.ops.jax_device)

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

    def _hvp_block(self, flat: Any, fixed: Any, batch: Any, V: Any) -> Any:
        self.num_traces += 1  # runs only while tracing: counts compilations

        def grad(p: Any) -> Any:
            return jax.grad(self._scalar_loss)(p, fixed, batch)

        def column(v: Any) -> Any:
            return jax.jvp(grad, (flat,), (v,))[1]

        if V.ndim == 1:  # one vector (H @ v): no reshapes outside the compiled program
            return column(V)
        if V.shape[1] == 1:  # a single column: no vmap (batching one column costs ~0.2 ms a product)
            return column(V[:, 0])[:, None]
        return jax.vmap(column, in_axes=1, out_axes=1)(V)

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
        if self.engine == "finite_difference":
            return self._finite_difference(batch, V)
        k, c = V.shape[1], self.chunk_size
        if k <= c:
            return self._call(self._hvp, batch, V)
        return jnp.concatenate([self._call(self._hvp, batch, V[:, j : j + c]) for j in range(0, k, c)], axis=1)

    def hvp_vector(self, index: int, batch: Any, v: Any) -> Any:
        if self.engine == "finite_difference":
            return self._finite_difference(batch, v[:, None])[:, 0]
        return self._call(self._hvp, batch, v)

    # --- primitives of the core's engine check (specops.checks) -----------------------
    def _finite_difference(self, batch: Any, V: Any) -> Any:
        n = self.layout.num_params
        scale = max(1.0, float(jnp.linalg.norm(self._flat)) / max(n, 1) ** 0.5)
        return finite_difference_products(lambda d: self.gradient_at(batch, d), V, self.ops,
                                          eps=machine_epsilon(self.ops.dtype), scale=scale)[0]

    def check_product(self, batch: Any, V: Any) -> Any:
        # column by column: the program of the determinism check's single column, not a new one
        return jnp.concatenate([self.hvp(0, batch, V[:, j : j + 1]) for j in range(V.shape[1])], axis=1)

    def gradient_at(self, batch: Any, delta: Any) -> Any:
        return self._call(lambda flat, *rest: self._grad(flat + rest[-1], *rest[:-1]), batch, delta)

    def use_finite_differences(self) -> None:
        self.engine = "finite_difference"

    def verdict_key(self, batch: Any) -> tuple[Any, Any] | None:
        shapes = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in tree_util.tree_leaves(batch))
        key = (identity(self.loss_fn), tuple(self.layout.names), self.ops.dtype.name, self.requested_engine,
               self._treedef, shapes)
        return owner_of(self.loss_fn), key

    def params_vector(self) -> Any:
        return self._flat

    def subset(self, names: list[str]) -> JaxAdapter:
        return JaxAdapter(self.loss_fn, self.params, wrt=list(names), chunk_size=self.chunk_size,
                          devices=None if self.mesh is None else self.mesh.mesh, engine=self.requested_engine)

    def determinism_hints(self) -> list[str]:
        return [
            ("loss_fn draws random numbers (dropout) from a key that changes between calls: fix the key "
             "or turn the randomness off (deterministic=True in Flax)"),
            "data that changes between passes (augmentation, a reshuffling loader)",
        ]


# --- models of dict batches (transformers) ------------------------------------------------
def _describe_output(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with keys {', '.join(map(str, obj))}"
    if hasattr(obj, "shape"):
        return f"an array of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _apply(apply_fn: Callable[..., Any], params: Any, inputs: Any) -> Any:
    """``apply_fn(params, **inputs)`` for a dict of inputs, else ``apply_fn(params, inputs)``."""
    return apply_fn(params, **inputs) if isinstance(inputs, dict) else apply_fn(params, inputs)


def model_loss(apply_fn: Callable[..., Any], loss_fn: Callable[..., Any] | None = None) -> Callable[[Any, Any], Any]:
    """``loss(params, batch)`` for :func:`hessian` from a model and a loss of its outputs.

    The rules of the PyTorch backend's transformer support: a dict batch's ``"labels"``
    are the targets and its other entries the model's inputs, passed as keywords
    (``apply_fn(params, input_ids=..., attention_mask=...)``); a pair batch is
    ``(inputs, targets)``. A model returning a dict (or an object with ``.logits``, as
    Hugging Face's Flax models do) gives ``loss_fn`` its ``logits``. With
    ``loss_fn=None`` the model gets the whole batch, labels included, and its own
    ``"loss"`` (or ``.loss``) is the loss. Label shifting for a causal LM is left to
    the model or the loss, as written.

    Args:
        apply_fn: ``apply_fn(params, ...) -> outputs``, pure and traceable (e.g.
            ``lambda p, **kw: model.apply({"params": p}, **kw)`` for Flax linen).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (the PyTorch / optax order),
            or ``None`` for the model's own loss.

    Returns:
        ``loss(params, batch)``, to pass to :func:`hessian` as ``loss_fn``.

    Raises:
        TypeError: (when the loss is first traced) a dict batch without ``"labels"``;
            a batch that is neither a dict nor a pair; a dict output without
            ``"logits"``; no ``"loss"`` with ``loss_fn=None``; a loss that returns the
            model's outputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from specops.backends import jax as sj
        >>> apply = lambda p, input_ids: {"logits": p["w"] * input_ids}
        >>> loss = sj.model_loss(apply, lambda logits, labels: jnp.mean((logits - labels) ** 2))
        >>> H = sj.hessian(loss, {"w": jnp.array(1.0)}, {"input_ids": jnp.array([1.0, 2.0]),
        ...                                                "labels": jnp.array([0.0, 0.0])})
        >>> float((H @ jnp.array([1.0]))[0])
        5.0
    """
    if not callable(apply_fn) or not (loss_fn is None or callable(loss_fn)):
        raise TypeError("model_loss takes apply_fn(params, ...) -> outputs and loss_fn(outputs, targets) or None")

    def loss(params: Any, batch: Any) -> Any:
        if loss_fn is None:
            outputs = _apply(apply_fn, params, batch)
            value = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
            if value is None:
                raise TypeError(
                    f"loss_fn=None takes the loss the model returns given the whole batch (labels included), "
                    f"but it returned {_describe_output(outputs)} without 'loss'; pass loss_fn(outputs, "
                    "targets), applied to the outputs' 'logits'"
                )
            return value
        if isinstance(batch, dict):
            if "labels" not in batch:
                raise TypeError(
                    f"a dict batch needs 'labels' (the targets; the other entries are the model's inputs, "
                    f"passed as keywords), got keys {sorted(batch)}; or write loss_fn(params, batch) and pass "
                    "it to hessian directly"
                )
            inputs, targets = {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
        else:
            raise TypeError(f"model_loss needs batches (inputs, targets) or dicts with 'labels', got "
                            f"{type(batch).__name__}")
        outputs = _apply(apply_fn, params, inputs)
        if isinstance(outputs, dict) or hasattr(outputs, "logits"):
            logits = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
            if logits is None:
                raise TypeError(f"the model returns {_describe_output(outputs)}; model_loss applies loss_fn to its "
                                "'logits', which it has not: write loss_fn(params, batch) yourself")
            outputs = logits
        value = loss_fn(outputs, targets)
        if isinstance(value, dict) or hasattr(value, "logits"):
            raise TypeError(f"the loss function returned the model's outputs ({_describe_output(value)}), "
                            "not a scalar: return outputs['loss'], or a loss of outputs['logits']")
        return value

    return loss


def hessian(loss_fn: Callable[..., Any], params: Any, data: Any, *, wrt: Any = None, reduction: str | None = None,
            comm: Any = None, check_deterministic: bool = True, dtype: Any = None, chunk_size: int = 16,
            devices: Any = None, engine: str = "auto", cross_check: bool = True) -> ModelOperator:
    """The Hessian of ``loss_fn(params, batch)`` over ``data`` with respect to ``params``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, pure and traceable by JAX; it
            reduces over the batch as ``reduction`` says.
        params: any pytree of parameters (dict, Flax params, Equinox arrays, Haiku).
            Leaves placed with ``NamedSharding`` over a mesh of several devices make the
            vectors sharded over the mesh too (``specops.backends.jax_sharded``).
        data: one batch (a tuple or dict of arrays) or a re-iterable of batches; an
            unequal last batch is compiled for once.
        wrt: ``None`` (every leaf), or pytree-path names / glob patterns
            (``"layers.0.*"``) of the leaves to differentiate; the rest are held fixed.
        reduction: ``"mean"`` (batches weighted by sample count; the default) or ``"sum"``.
            The first batch's loss is compared with its halves' at construction: a loss
            that behaves as the other reduction raises.
        comm: ``None`` or a communicator; each rank passes its own shard of the data.
        check_deterministic: check every batch's loss is finite and that two identical
            products agree.
        dtype: cast the floating leaves first (``jnp.float64`` needs ``jax_enable_x64``).
        chunk_size: columns of a block evaluated by one compiled ``vmap`` call.
        devices: split every batch over several devices, one compiled program per
            product (data parallel within the process): ``"local"`` (every local
            device), a list of devices, or a ``jax.sharding.Mesh``. Batches whose size
            the number of devices does not divide run on the parameters' device alone.
            ``None`` (default): the parameters' device. Across hosts, combine it with
            ``comm=`` (see ``docs/distributed.md``).
        engine: ``"auto"`` (``"forward_over_reverse"``, unless the construction check finds
            it wrong: then ``"finite_difference"``, with a warning), ``"forward_over_reverse"``
            (``jit(vmap(jvp(grad(loss))))``) or ``"finite_difference"`` (central differences of
            gradients: for a ``custom_vjp`` whose backward is not differentiable).
        cross_check: check the engine on the first batch at construction: symmetry on two
            probes and central differences of gradients
            (:func:`specops.checks.check_engine`); ``H.engine_check`` holds what it found.

    Returns:
        A :class:`specops.ModelOperator`: ``H @ v`` takes and returns JAX arrays.

    Raises:
        TypeError: leaves that cannot be differentiated (integers, functions), or a
            loss that is not a floating scalar.
        ValueError: a loss that is not a scalar; a selection that matches nothing.
        specops.NonFiniteError: a non-finite loss (naming the batch).
        ValueError: an explicit ``engine`` that the construction check finds wrong (the
            message names ``engine="finite_difference"``).

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
    from specops.backends import jax_sharded  # parameters sharded over a mesh: vectors sharded alike
    from specops.reduction import check_plain, loss_name
    from specops.reduction import resolve as resolve_reduction

    mesh = jax_sharded.mesh_of(params)
    make = JaxAdapter if mesh is None else partial(jax_sharded.ShardedJaxAdapter, mesh=mesh)
    adapter = make(loss_fn, params, wrt=wrt, dtype=dtype, chunk_size=chunk_size, devices=devices,
                   engine=engine)
    resolved = resolve_reduction(reduction, None, loss_name(loss_fn))
    return ModelOperator(adapter, data, reduction=resolved, comm=comm, check_deterministic=check_deterministic,
                         cross_check=cross_check, first_batch_check=lambda first: check_plain(
                             adapter, loss_fn, None, resolved, first, float(np.finfo(adapter.ops.dtype).eps)))


# --- curvature: Gauss-Newton and Fisher (see specops.curvature, specops.output_space) ---
def _loss_spec(loss_fn: Any, reduction: str) -> Any:
    """The :class:`~specops.output_space.LossSpec` of an optax loss specops reads exactly, or None.

    optax's losses are per sample or per position (classes on the last axis) or per
    entry; :func:`ggn` reduces them: a sum over each sample's values, then
    ``reduction`` over samples (``"mean"``: weight ``1/N`` for every term of a sample).
    """
    from specops.output_space import LossSpec

    try:
        import optax
    except ImportError:  # pragma: no cover - optax is optional
        return None
    known = {
        "softmax_cross_entropy_with_integer_labels": ("categorical", 1.0),
        "softmax_cross_entropy": ("categorical", 1.0),
        "sigmoid_binary_cross_entropy": ("bernoulli", 1.0),
        "squared_error": ("gaussian", 2.0),
        "l2_loss": ("gaussian", 1.0),
    }
    hit = next((v for k, v in known.items() if getattr(optax, k, None) is loss_fn), None)
    reduce = "samples" if reduction == "mean" else "sum"
    return None if hit is None else LossSpec(hit[0], -1, reduce, factor=hit[1])


_JAX_KNOWN_LOSSES = ("optax.softmax_cross_entropy_with_integer_labels or optax.softmax_cross_entropy "
                     "(categorical over the last axis), optax.sigmoid_binary_cross_entropy (Bernoulli), "
                     "optax.squared_error or optax.l2_loss (Gaussian), passed as loss_fn itself (per-sample "
                     "values, reduced by ggn/fisher)")


def _reduced_loss(loss_fn: Callable[..., Any], reduction: str) -> Callable[[Any, Any], Any]:
    """``loss_fn(outputs, targets)`` as a scalar.

    Per-sample or per-entry values are summed over each sample's entries, then averaged
    (``"mean"``) or summed over samples.
    """
    def scalar(outputs: Any, targets: Any) -> Any:
        value = loss_fn(outputs, targets)
        if jnp.ndim(value) == 0:
            return value
        per_sample = jnp.sum(jnp.reshape(value, (jnp.shape(value)[0], -1)), axis=1)
        return jnp.mean(per_sample) if reduction == "mean" else jnp.sum(per_sample)

    return scalar


def _output_ops() -> Any:
    """The JAX primitives of :class:`specops.output_space.OutputOps`."""
    from specops.output_space import OutputOps

    return OutputOps(
        softmax=lambda x, axis: jax.nn.softmax(x, axis=axis),
        sigmoid=jax.nn.sigmoid,
        sum=lambda x, axes: jnp.sum(x, axis=axes, keepdims=True),
        onehot_max=lambda x, axis: (x == jnp.max(x, axis=axis, keepdims=True)).astype(x.dtype),
        less=lambda x, y: (x < y).astype(y.dtype),
        numel=lambda x: x.size,
        grad=lambda loss, out: jax.grad(loss)(out),
        hvp=lambda loss, out, Z: jax.jvp(jax.grad(loss), (out,), (Z,))[1],
        asarray=lambda host, like: jnp.asarray(host, dtype=like.dtype),
        host=lambda x: np.asarray(x, dtype=np.float64),
    )


class _JaxCurvature:
    """``V -> J^T M J V`` for one batch of a :class:`JaxAdapter`, compiled once per shape."""

    def __init__(self, base: JaxAdapter, apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], kind: str,
                 reduction: str, num_samples: int, seed: int, datum: str = "sample", spec: Any = None) -> None:
        self.base, self.apply_fn, self.kind, self.reduction, self.datum = base, apply_fn, kind, reduction, datum
        self.spec = spec
        self.scalar_loss = _reduced_loss(loss_fn, reduction)
        self.num_samples, self.seed = num_samples, seed
        self.output_ops = _output_ops()
        self._noise: dict[int, Any] = {}
        self._block = jax.jit(self._product)

    def _output_matrix(self, out: Any, targets: Any, noise: Any) -> Callable[[Any], Any]:
        from specops.output_space import output_matrix

        return output_matrix(self.kind, self.spec, self.output_ops, out, targets,
                             lambda o: self.scalar_loss(o, targets), reduction=self.reduction, datum=self.datum,
                             noise=noise)

    def _outputs(self, inputs: Any) -> Any:
        return self.apply_fn(self.base._tree(self.base._flat, self.base._fixed), inputs)

    def validate(self, batch: Any) -> tuple[Any, float | None]:
        """Check the closed form on ``batch`` (see :func:`specops.output_space.validate`)."""
        from specops.output_space import validate

        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("ggn and fisher need batches (inputs, targets)")
        out, targets = self._outputs(batch[0]), batch[1]
        return validate(self.kind, self.spec, self.output_ops, out, targets, lambda o: self.scalar_loss(o, targets),
                        datum=self.datum, eps=float(jnp.finfo(out.dtype).eps), known=_JAX_KNOWN_LOSSES)

    def _product(self, flat: Any, fixed: Any, batch: Any, V: Any, noise: Any) -> Any:
        inputs, targets = batch

        def f(p: Any) -> Any:
            return self.apply_fn(self.base._tree(p, fixed), inputs)

        out, vjp_fn = jax.vjp(f, flat)
        M = self._output_matrix(jax.lax.stop_gradient(out), targets, noise)

        def column(v: Any) -> Any:
            return vjp_fn(M(jax.jvp(f, (flat,), (v,))[1]))[0]

        return jax.vmap(column, in_axes=1, out_axes=1)(V)

    def _draw(self, index: int, batch: Any) -> Any:
        from specops.output_space import mc_noise

        if self.kind != "mc":
            return None
        noise = self._noise.get(index)
        if noise is None:
            out = jax.eval_shape(lambda p: self.apply_fn(self.base._tree(p, self.base._fixed), batch[0]),
                                 self.base._flat)
            noise = self._noise[index] = self.base.ops.asarray(
                mc_noise(out.shape, self.spec, self.num_samples, self.seed, index))
        return noise

    def __call__(self, index: int, batch: Any, V: Any) -> Any:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("ggn and fisher need batches (inputs, targets)")
        base, c = self.base, self.base.chunk_size
        noise = self._draw(index, batch)
        blocks = [self._block(base._flat, base._fixed, tuple(batch), V[:, j:j + c], noise)
                  for j in range(0, V.shape[1], c)]
        return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def _check_reduction(adapter: JaxAdapter, data: Any, reduction: str | None, loss_fn: Any) -> str:
    """``reduction`` (default ``"mean"``), checked on the first batch's halves for a scalar loss."""
    from specops.reduction import check_plain, loss_name, resolve

    resolved = resolve(reduction, None, loss_name(loss_fn))
    first = next(iter(ModelOperator._batches_of(data)), None)
    check_plain(adapter, loss_fn, None, resolved, first, float(np.finfo(adapter.ops.dtype).eps))
    return resolved


def _curvature_operator(kind: str, apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], params: Any,
                        data: Any, *, wrt: Any, reduction: str | None, comm: Any, check_deterministic: bool,
                        dtype: Any, chunk_size: int, num_samples: int = 1, seed: int = 0,
                        datum: str = "sample") -> ModelOperator:
    import inspect

    from specops.curvature import check_num_samples, model_form_error, validated_adapter
    from specops.output_space import check_datum
    from specops.random import check_seed

    what = "ggn(...)" if kind == "ggn" else f"fisher(kind={kind!r})"
    if not (callable(apply_fn) and callable(loss_fn)):
        raise TypeError(f"{what} takes apply_fn(params, inputs) -> outputs and loss_fn(outputs, targets)")
    try:
        first = next(iter(inspect.signature(loss_fn).parameters), None)
    except (TypeError, ValueError):
        first = None
    if first in ("params", "model", "module", "net", "network"):
        raise model_form_error(what, "pass apply_fn(params, inputs) and loss_fn(outputs, targets), e.g. "
                                     "optax.softmax_cross_entropy_with_integer_labels")
    num_samples, seed, datum = check_num_samples(num_samples), check_seed(seed), check_datum(datum)
    # the reduction of a scalar loss is checked on the first batch below; per-sample values are reduced here
    reduced = reduction or "mean"
    scalar = _reduced_loss(loss_fn, reduced)

    def loss(p: Any, batch: Any) -> Any:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{what} needs batches (inputs, targets), got {type(batch).__name__}")
        return scalar(apply_fn(p, batch[0]), batch[1])

    base = JaxAdapter(loss, params, wrt=wrt, dtype=dtype, chunk_size=chunk_size)
    reduction = _check_reduction(base, data, reduction, loss_fn)
    first = next(iter(ModelOperator._batches_of(data)), None)
    adapter = validated_adapter(
        base, kind, lambda b, spec: _JaxCurvature(b, apply_fn, loss_fn, kind, reduction, num_samples, seed,  # type: ignore[arg-type]  # b is base, a JaxAdapter
                                                  datum, spec),
        _loss_spec(loss_fn, reduction), first, "jit(vmap(vjp(M jvp)))", num_samples=num_samples, datum=datum)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic)


def ggn(apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], params: Any, data: Any, *, wrt: Any = None,
        reduction: str | None = None, comm: Any = None, check_deterministic: bool = True, dtype: Any = None,
        chunk_size: int = 16) -> ModelOperator:
    """The generalized Gauss-Newton matrix ``J^T (d^2 L/df^2) J`` over ``data``.

    The Gauss-Newton split needs the model and the loss apart: ``apply_fn(params, inputs)``
    gives the outputs ``f`` (a Flax ``model.apply``, an Equinox call, any function), and
    ``loss_fn(outputs, targets)`` the loss. A scalar loss is used as is; a per-sample or
    per-entry one (optax's losses) is summed over each sample's entries and reduced over
    samples by ``reduction``. Products are one ``jvp`` and one ``vjp`` through
    ``apply_fn``, vectorized over k columns and compiled once; the output Hessian is in
    closed form for optax's softmax cross-entropy and squared-error losses and by
    autodiff otherwise.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``, pure and traceable.
        loss_fn: ``loss_fn(outputs, targets)``: a scalar, or per-sample / per-entry values.
        params: as for :func:`hessian`.
        data: as for :func:`hessian`; every batch is a pair ``(inputs, targets)``.
        wrt: as for :func:`hessian`.
        reduction: as for :func:`hessian`.
        comm: as for :func:`hessian`.
        check_deterministic: as for :func:`hessian`.
        dtype: as for :func:`hessian`.
        chunk_size: as for :func:`hessian`.

    Returns:
        A :class:`specops.ModelOperator` (``G.adapter.kind == "ggn"``).

    Raises:
        ValueError: a ``loss_fn(params, batch)`` (the loss must be a function of the
            outputs alone). As :func:`hessian` otherwise.
    """
    return _curvature_operator("ggn", apply_fn, loss_fn, params, data, wrt=wrt, reduction=reduction, comm=comm,
                               check_deterministic=check_deterministic, dtype=dtype, chunk_size=chunk_size)


def fisher(apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], params: Any, data: Any, *,
           kind: str = "empirical", num_samples: int = 1, seed: int = 0, wrt: Any = None,
           reduction: str | None = None, comm: Any = None, check_deterministic: bool = True, dtype: Any = None,
           chunk_size: int = 16, datum: str = "sample") -> ModelOperator:
    """The empirical (``kind="empirical"``) or Monte-Carlo (``kind="mc"``) Fisher over ``data``.

    Arguments as for :func:`ggn`; see ``specops.backends.torch.fisher`` for the
    definitions. ``kind="mc"`` needs one of optax's cross-entropy or squared-error losses
    as ``loss_fn`` (its likelihood); the labels are drawn once per batch from ``seed``,
    the same noise as on the other backends.

    Args:
        kind: ``"empirical"`` or ``"mc"``.
        num_samples: sampled labels per sample for ``kind="mc"``.
        seed: the seed of the sampled labels.
        apply_fn: as for :func:`ggn`.
        loss_fn: as for :func:`ggn`.
        params: as for :func:`ggn`.
        data: as for :func:`ggn`.
        wrt: as for :func:`ggn`.
        reduction: as for :func:`ggn`.
        comm: as for :func:`ggn`.
        check_deterministic: as for :func:`ggn`.
        dtype: as for :func:`ggn`.
        chunk_size: as for :func:`ggn`.
        datum: of ``kind="empirical"``: ``"sample"`` (default) or ``"term"`` (each loss term
            one datum: each position of a cross-entropy's last axis, each row of the last
            axis of a squared error; needs one of the optax losses specops reads). See
            ``docs/curvature.md``.

    Returns:
        A :class:`specops.ModelOperator` (``F.adapter.kind`` is ``kind``).

    Raises:
        ValueError: ``kind="mc"`` with a loss whose likelihood is not known; a bad ``kind``,
            ``num_samples`` or ``seed``.
    """
    from specops.curvature import check_estimator as check_kind

    return _curvature_operator(check_kind(kind), apply_fn, loss_fn, params, data, wrt=wrt, reduction=reduction,
                               comm=comm, check_deterministic=check_deterministic, dtype=dtype,
                               chunk_size=chunk_size, num_samples=num_samples, seed=seed, datum=datum)


from specops.backends.jax_optim import preconditioner, stability_threshold  # noqa: E402,F401 (optax state, issue 25)
