"""JAX models whose parameters are sharded over a device mesh (``NamedSharding``).

When the parameters of :func:`specops.backends.jax.hessian` are placed with ``NamedSharding``
over a ``jax.sharding.Mesh`` of several devices, the operator's vectors are sharded
too: a flat vector (or a block of them) is split by rows over every device of the mesh
(``PartitionSpec(mesh.axis_names)``), so no device ever holds a whole vector. A product
is one compiled program, the exact ``jvp`` of ``grad``, in which every parameter keeps
the sharding it was given and the data keep theirs (shard a batch over a ``"data"``
axis of a 2-D mesh for data parallelism). Reductions (inner products, norms) are
reduced inside XLA's programs; a QR is a tall-skinny QR (local QRs, then one QR of the
devices' small ``R`` factors); random probes are drawn shard by shard by global index
(:func:`specops.random.probes`), so the numbers are those of one device.

A mesh's devices must divide the rows evenly, so the vectors are padded with zero rows
to ``padded = ceil(n / devices) * devices``: arrays of the operator have ``padded``
rows, of which rows ``n..padded-1`` are zero (``H.as_params(v)`` drops them; host
copies through ``to_numpy`` have ``n`` rows). The padding rows stay zero through every
vector operation and product, so results are those of the unpadded operator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from specops import random as _random

from .adapter import JaxAdapter
from .ops import JaxOps


def mesh_of(params: Any) -> Mesh | None:
    """The mesh of the first array leaf of ``params`` sharded over more than one device, else ``None``.

    Raises:
        ValueError: leaves sharded over different meshes.
    """
    meshes = []
    for leaf in tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.devices.size > 1:
            meshes.append(sharding.mesh)
    if not meshes:
        return None
    if any(m.devices.shape != meshes[0].devices.shape or m.axis_names != meshes[0].axis_names
           or list(m.devices.flat) != list(meshes[0].devices.flat) for m in meshes[1:]):
        raise ValueError("the parameters are sharded over different meshes; place every sharded leaf on one "
                         "jax.sharding.Mesh (NamedSharding(mesh, ...))")
    return meshes[0]


class JaxMeshOps(JaxOps):
    """Vector operations on JAX arrays whose rows are sharded over every device of ``mesh``.

    Args:
        dtype: float32 or float64.
        mesh: the ``jax.sharding.Mesh``.
        n: the length of a vector; arrays have :attr:`padded` rows (zeros past ``n``).
    """

    def __init__(self, dtype: Any, mesh: Mesh, n: int) -> None:
        here = jax.process_index()  # the first of this process's devices (of every device with one process)
        super().__init__(dtype, next(d for d in mesh.devices.flat if d.process_index == here))
        self.mesh, self.n = mesh, int(n)
        size = int(mesh.devices.size)
        self.padded = -(-self.n // size) * size
        self.axes = tuple(mesh.axis_names)
        self.device = f"mesh({', '.join(f'{a}={s}' for a, s in mesh.shape.items())})"
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._qr = _tsqr(mesh, self.axes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JaxMeshOps) and (self.dtype, self.mesh, self.n) == (other.dtype, other.mesh, other.n)

    def __hash__(self) -> int:
        return hash((JaxMeshOps, self.dtype, self.n))

    def sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """How an array of ``shape`` is placed: rows split over the mesh, or replicated."""
        axis = _row_axis(shape, self.padded)
        if axis is None:
            return self._replicated
        spec: list[Any] = [None] * len(shape)
        spec[axis] = self.axes
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def _pad(self, x: Any) -> Any:
        axis = _row_axis(tuple(x.shape), self.n)
        if axis is None or self.padded == self.n:
            return x
        widths = [(0, 0)] * len(x.shape)
        widths[axis] = (0, self.padded - self.n)
        return (jnp if isinstance(x, jax.Array) else np).pad(x, widths)

    def local_rows(self, n: int) -> int:
        return self.padded if n == self.n else n

    def asarray(self, x: Any) -> Any:
        if not isinstance(x, jax.Array):
            x = np.asarray(x, dtype=self.dtype)
        x = self._pad(x)
        target = self.sharding(tuple(x.shape))
        if isinstance(x, jax.Array) and x.dtype == self.dtype and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(x.astype(self.dtype), target)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            x = multihost_utils.process_allgather(x, tiled=True)  # rows on other processes' devices
        out = np.array(x, dtype=np.float64)
        axis = _row_axis(out.shape, self.padded)
        if axis is None or self.padded == self.n:
            return out
        return out[(slice(None),) * axis + (slice(0, self.n),)]

    def to_host(self, X: Any) -> np.ndarray:
        return self.to_numpy(X).astype(self.dtype)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        shape = tuple(self.padded if s == self.n and i == (1 if len(shape) == 3 else 0) else s
                      for i, s in enumerate(shape))
        return jnp.zeros(shape, dtype=self.dtype, device=self.sharding(shape))

    def buffer(self, shape: tuple[int, ...]) -> Any:
        return self.zeros(shape)

    def qr(self, X: Any) -> tuple[Any, Any]:
        return self._qr(X)

    def host(self) -> JaxMeshOps:
        return self  # a basis "in host memory" would be a whole vector on one host: keep it sharded

    def random(self, n: int, columns: Iterable[int], seed: int, distribution: _random.Distribution = "rademacher",
               stream: str = "") -> Any:
        columns = list(columns)
        shape = (self.padded, len(columns))
        dtype = self.dtype

        def rows(index: tuple[slice, ...]) -> np.ndarray:  # only this shard's rows are drawn
            lo, hi, _ = index[0].indices(self.padded)
            out = np.zeros((hi - lo, len(columns)), dtype=dtype)
            if lo < n:
                out[: min(hi, n) - lo] = _random.probes(n, columns, seed, distribution=distribution, stream=stream,
                                                        rows=range(lo, min(hi, n)))[:, index[1]]
            return out

        return jax.make_array_from_callback(shape, self.sharding(shape), rows)

    def identity_columns(self, n: int, start: int, stop: int) -> Any:
        E = np.zeros((n, stop - start), dtype=self.dtype)
        E[np.arange(start, stop), np.arange(stop - start)] = 1.0
        return self.asarray(E)


def _row_axis(shape: tuple[int, ...], rows: int) -> int | None:
    """The axis holding a vector's rows: 0 of a vector or block, 1 of a stack of blocks."""
    axis = 1 if len(shape) == 3 else 0
    return axis if len(shape) > axis and shape[axis] == rows else None


def _tsqr(mesh: Mesh, axes: tuple[str, ...]) -> Callable[[Any], tuple[Any, Any]]:
    """A compiled tall-skinny QR of a row-sharded block: no device gathers the block."""
    rows, whole = PartitionSpec(axes, None), PartitionSpec()

    def local(X: Any) -> tuple[Any, Any]:
        Q1, R1 = jnp.linalg.qr(X, mode="reduced")  # R1: (min(m, k), k)
        Rs = jax.lax.all_gather(R1, axes, tiled=True)
        Q2, R = jnp.linalg.qr(Rs, mode="reduced")
        signs = jnp.where(jnp.diagonal(R) < 0, -1.0, 1.0).astype(R.dtype)  # one answer on every device
        Q2, R = Q2 * signs, R * signs[:, None]
        block = jax.lax.dynamic_slice_in_dim(Q2, jax.lax.axis_index(axes) * R1.shape[0], R1.shape[0])
        return jnp.matmul(Q1, block, precision=jax.lax.Precision.HIGHEST), R

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=rows, out_specs=(rows, whole), check_vma=False))


class ShardedJaxAdapter(JaxAdapter):
    """:class:`~specops.backends.jax.JaxAdapter` for parameters sharded over ``mesh``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the parameter pytree, leaves placed with ``NamedSharding`` on ``mesh``.
        mesh: the parameters' mesh (see :func:`mesh_of`).
        **options: the other options of :class:`~specops.backends.jax.JaxAdapter`.

    Raises:
        ValueError: ``devices=`` given (the data keep the sharding they are given instead).
    """

    ops: JaxMeshOps

    def __init__(self, loss_fn: Callable[..., Any], params: Any, *, mesh: Mesh, **options: Any) -> None:
        if options.get("devices") is not None:
            raise ValueError("devices= splits batches for replicated parameters; the parameters are sharded over "
                             "a mesh: shard the data yourself (jax.device_put(batch, NamedSharding(mesh, "
                             "PartitionSpec('data')))) and leave devices=None")
        self._mesh = mesh
        super().__init__(loss_fn, params, **options)
        leaves = tree_util.tree_leaves(self.params)
        self._shardings = [getattr(leaves[i], "sharding", None) for i in self._selected]
        ops = self.ops

        def constrained(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any) -> Any:
                out = fn(*args)
                return jax.lax.with_sharding_constraint(out, ops.sharding(tuple(out.shape)))
            return run

        self._grad = jax.jit(constrained(jax.grad(self._scalar_loss)))
        self._unpadded = self.layout.num_params
        self.engines = self._engines(constrained)

    def _vector_ops(self, dtype: Any, first: Any) -> JaxMeshOps:
        return JaxMeshOps(dtype, self._mesh, self.layout.num_params)

    def _flatten_params(self, pieces: list[Any]) -> Any:
        ops = self.ops
        assert isinstance(ops, JaxMeshOps)

        def flat_params(pieces: Any) -> Any:
            return ops._pad(jnp.concatenate([jnp.ravel(p) for p in pieces]))

        return jax.jit(flat_params, out_shardings=ops.sharding((ops.padded,)))(pieces)

    def _tree(self, flat: Any, fixed: Any) -> Any:
        leaves = list(self._static)
        for i, leaf in zip(self._fixed_index, fixed):
            leaves[i] = leaf
        pieces = self.layout.unflatten(flat[: self._unpadded], self.ops).values()
        for i, piece, sharding in zip(self._selected, pieces, self._shardings):
            leaves[i] = piece if sharding is None else jax.lax.with_sharding_constraint(piece, sharding)
        return tree_util.tree_unflatten(self._treedef, leaves)

    def loss(self, batch: Any, delta: Any = None) -> float:
        if delta is not None:
            delta = self.ops.asarray(delta)
        return super().loss(batch, delta)

    def as_params(self, v: Any) -> Any:
        """``v`` (padded or not, (n,) or (n, k)) as a pytree like ``params``, each leaf with its sharding.

        A block's leaves have a leading axis of length k, replicated.
        """
        v = self.ops.asarray(v)
        block = len(v.shape) == 2
        leaves = tree_util.tree_leaves(self.params)
        out_shardings = []
        for i, sharding in zip(self._selected, self._shardings):
            spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
            spec = PartitionSpec(None, *spec) if block else spec
            out_shardings.append(NamedSharding(self.ops.mesh, spec))

        def split(v: Any) -> Any:
            pieces = self.layout.unflatten(v[: self._unpadded], self.ops)
            return [pieces[name] for name in self.layout.names]

        pieces = jax.jit(split, out_shardings=out_shardings)(v)
        lead = (int(v.shape[1]),) if block else ()
        out = [jnp.zeros(lead + tuple(leaf.shape), self.ops.dtype) if hasattr(leaf, "shape") else leaf
               for leaf in leaves]
        for i, piece in zip(self._selected, pieces):
            out[i] = piece
        return tree_util.tree_unflatten(self._treedef, out)

    def subset(self, names: list[str]) -> ShardedJaxAdapter:
        return ShardedJaxAdapter(self.loss_fn, self.params, mesh=self.ops.mesh, wrt=list(names),
                                 chunk_size=self.chunk_size)


__all__ = ["JaxMeshOps", "ShardedJaxAdapter", "mesh_of"]
