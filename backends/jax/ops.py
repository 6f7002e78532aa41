"""Vector operations on JAX arrays (:class:`JaxOps`) and dense JAX matrices as operators.

Every operation on a basis or a stack of probes is one compiled program per buffer
shape: a growing basis is passed whole with the columns past the current one masked
out, and windows are sliced at traced positions, so JAX does not compile a new
program at every Lanczos step.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specops.operator import MatrixOperator, check_dense_symmetric
from specops.ops import VectorOps

_HIGHEST = jax.lax.Precision.HIGHEST

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

