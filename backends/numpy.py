"""The NumPy backend: the reference implementation of the vector-operation protocol.

Dense arrays, SciPy sparse matrices and SciPy ``LinearOperator`` s are wrapped by
:func:`specops.aslinearoperator`, whose vectors are NumPy arrays on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from specops.layout import ParamLayout
from specops.model import ModelAdapter, ModelOperator
from specops.operator import LinearOperator
from specops.ops import VectorOps, sum_over_rows
from specops.reduction import Reduction


class NumpyOps(VectorOps[np.ndarray]):
    """Vector operations on NumPy arrays (host memory)."""

    name = "numpy"
    in_place = True

    def __init__(self, dtype: npt.DTypeLike = np.float64) -> None:
        super().__init__(dtype, "cpu")

    def is_native(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def asarray(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=self.dtype)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=np.float64)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        # column-major, so column blocks of a basis are contiguous for BLAS
        return np.zeros(shape, dtype=self.dtype, order="F")

    def concat(self, arrays: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(arrays, axis=axis)

    def inner(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return sum_over_rows(lambda x, y: (x.T @ y).astype(np.float64), X, Y).astype(self.dtype)

    def combine(self, X: np.ndarray, C: npt.ArrayLike) -> np.ndarray:
        return X @ np.asarray(C, dtype=self.dtype)

    def column_norms(self, X: np.ndarray) -> np.ndarray:
        return np.sqrt(sum_over_rows(lambda x: np.square(x, dtype=np.float64).sum(axis=0), X))

    def qr(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.linalg.qr(X, mode="reduced")

    def einsum(self, spec: str, *arrays: np.ndarray) -> np.ndarray:
        return np.einsum(spec, *arrays)

    def write_block(self, buffer: np.ndarray, start: int, X: np.ndarray, axis: int = 1) -> np.ndarray:
        index = (slice(None),) * axis + (slice(start, start + X.shape[axis]),)
        buffer[index] = X
        return buffer

    def buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        # uninitialized, column-major: the algorithms read only what they wrote
        return np.empty(shape, dtype=self.dtype, order="F")

    def all_finite(self, X: np.ndarray) -> bool:
        return bool(np.isfinite(X).all())

    def to_host(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=self.dtype)


class NumpyAdapter(ModelAdapter):
    """A model given as NumPy functions of the flat parameter vector.

    Args:
        loss_fn: ``loss_fn(theta, batch) -> float``.
        grad_fn: ``grad_fn(theta, batch) -> (n,)``.
        hvp_fn: ``hvp_fn(theta, batch, V) -> (n, k)`` for ``V`` of shape (n, k).
        theta: all parameters, flat (n,).
        layout: the :class:`~specops.layout.ParamLayout` of ``theta``.
        names: the parameters this adapter differentiates (all by default).
    """

    engine = "numpy-callables"
    requested_engine = "auto"

    def __init__(self, loss_fn: Callable[..., Any], grad_fn: Callable[..., Any], hvp_fn: Callable[..., Any],
                 theta: npt.ArrayLike, layout: ParamLayout, names: list[str] | None = None) -> None:
        self.loss_fn, self.grad_fn, self.hvp_fn = loss_fn, grad_fn, hvp_fn
        self.theta = np.asarray(theta, dtype=np.float64)
        if layout.num_params != self.theta.size:
            raise ValueError(f"the layout holds {layout.num_params} entries but theta has {self.theta.size}")
        self.ops = NumpyOps(self.theta.dtype)
        self.full_layout = layout
        self.layout = layout if names is None else layout.subset(names)
        self.index = np.concatenate([np.arange(layout.blocks[n].start, layout.blocks[n].stop, dtype=np.int64)
                                     for n in self.layout.names] or [np.zeros(0, np.int64)])

    def batch_size(self, batch: Any) -> int:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
        return len(first)

    def _full(self, delta: np.ndarray | None) -> np.ndarray:
        theta = self.theta.copy()
        if delta is not None:
            theta[self.index] += delta
        return theta

    def loss(self, batch: Any, delta: np.ndarray | None = None) -> float:
        return float(self.loss_fn(self._full(delta), batch))

    def gradient(self, batch: Any) -> np.ndarray:
        return np.asarray(self.grad_fn(self.theta, batch))[self.index]

    def hvp(self, index: int, batch: Any, V: np.ndarray) -> np.ndarray:
        full = np.zeros((self.theta.size, V.shape[1]))
        full[self.index] = V
        return np.asarray(self.hvp_fn(self.theta, batch, full))[self.index]

    def params_vector(self) -> np.ndarray:
        return self.theta[self.index].copy()

    def subset(self, names: list[str]) -> NumpyAdapter:
        return NumpyAdapter(self.loss_fn, self.grad_fn, self.hvp_fn, self.theta, self.full_layout, names)

    # --- primitives of the core's engine check (specops.checks) -----------------------
    def check_product(self, batch: Any, V: np.ndarray) -> np.ndarray:
        return self.hvp(0, batch, V)

    def gradient_at(self, batch: Any, delta: np.ndarray) -> np.ndarray:
        return np.asarray(self.grad_fn(self._full(delta), batch))[self.index]

    def verdict_key(self, batch: Any) -> tuple[Any, Any] | None:
        from specops.checks import identity, owner_of

        values = batch.values() if isinstance(batch, dict) else batch
        shapes = tuple(np.shape(x) for x in values)
        return owner_of(self.hvp_fn), (identity(self.hvp_fn), identity(self.loss_fn), identity(self.grad_fn),
                                       tuple(self.layout.names), shapes)

    def use_finite_differences(self) -> None:
        from specops.checks import finite_difference_products, machine_epsilon

        scale = max(1.0, float(np.sqrt(np.mean(self.theta ** 2)))) if self.theta.size else 1.0

        def product(theta: np.ndarray, batch: Any, full: np.ndarray) -> np.ndarray:
            out = np.zeros_like(full)
            out[self.index] = finite_difference_products(
                lambda d: self.gradient_at(batch, d), full[self.index], self.ops,
                eps=machine_epsilon(self.ops.dtype), scale=scale)[0]
            return out

        self.hvp_fn, self.engine = product, "finite_difference"


def hessian(loss_fn: Callable[..., Any], grad_fn: Callable[..., Any], hvp_fn: Callable[..., Any],
            params: dict[str, npt.ArrayLike] | npt.ArrayLike, data: Any, *, wrt: str | Sequence[str] | None = None,
            reduction: Reduction = "mean", comm: Any = None, check_deterministic: bool = True,
            cross_check: bool = True) -> ModelOperator:
    """The loss Hessian of a model written in NumPy, from its own gradient and HVP functions.

    Args:
        loss_fn: ``loss_fn(theta, batch) -> float``, with ``theta`` the flat parameter
            vector; see :class:`NumpyAdapter`.
        grad_fn: ``grad_fn(theta, batch) -> (n,)`` array, the gradient of ``loss_fn``.
        hvp_fn: ``hvp_fn(theta, batch, V) -> (n, k)`` array, the Hessian times ``V``.
        params: a dict name -> array (flattened in order; the shapes are kept for
            ``H.unflatten``) or one flat array (one parameter named ``"theta"``).
        data: one batch (a tuple or dict) or a re-iterable of batches; ``batch[0]`` (or
            the first dict value) has one row per sample.
        wrt: ``None`` (every parameter) or names / glob patterns of the parameters to
            differentiate; the others are held fixed.
        reduction: as for :class:`~specops.model.ModelOperator`.
        comm: as for :class:`~specops.model.ModelOperator`.
        check_deterministic: as for :class:`~specops.model.ModelOperator`.
        cross_check: check ``hvp_fn`` at construction against central differences of
            ``grad_fn`` and for symmetry (:func:`specops.checks.check_engine`): a wrong
            ``hvp_fn`` is replaced by finite differences with a warning.

    Returns:
        The Hessian operator, a :class:`~specops.model.ModelOperator` on NumPy vectors.
    """
    if isinstance(params, dict):
        values = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
        layout = ParamLayout(list(values), [v.shape for v in values.values()])
        theta = np.concatenate([v.ravel() for v in values.values()] or [np.zeros(0)])
    else:
        theta = np.asarray(params, dtype=np.float64).ravel()
        layout = ParamLayout(["theta"], [theta.shape])
    names = None if wrt is None else layout.select(wrt)
    adapter = NumpyAdapter(loss_fn, grad_fn, hvp_fn, theta, layout, names)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic,
                         cross_check=cross_check)


def matrix_operator(x: npt.ArrayLike, symmetric: bool | None = None) -> LinearOperator:
    """A dense NumPy matrix as an operator (same as :func:`specops.aslinearoperator`)."""
    from specops.operator import aslinearoperator

    return aslinearoperator(np.asarray(x), symmetric=symmetric)
