"""The NumPy backend: the reference implementation of the vector-operation protocol.

Dense arrays, SciPy sparse matrices and SciPy ``LinearOperator`` s are wrapped by
:func:`specops.aslinearoperator`, whose vectors are NumPy arrays on the host.
"""

from __future__ import annotations

import numpy as np

from specops.layout import ParamLayout
from specops.model import ModelAdapter, ModelOperator
from specops.ops import VectorOps


class NumpyOps(VectorOps):
    """Vector operations on NumPy arrays (host memory)."""

    name = "numpy"

    def __init__(self, dtype=np.float64):
        super().__init__(dtype, "cpu")

    def is_native(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def asarray(self, x):
        return np.asarray(x, dtype=self.dtype)

    def to_numpy(self, x) -> np.ndarray:
        return np.array(x, dtype=np.float64)

    def zeros(self, shape):
        # column-major, so column blocks of a basis are contiguous for BLAS
        return np.zeros(shape, dtype=self.dtype, order="F")

    def concat(self, arrays, axis: int):
        return np.concatenate(arrays, axis=axis)

    def inner(self, X, Y):
        return X.T @ Y

    def combine(self, X, C):
        return X @ np.asarray(C, dtype=self.dtype)

    def column_norms(self, X) -> np.ndarray:
        return np.linalg.norm(X, axis=0).astype(np.float64)

    def qr(self, X):
        return np.linalg.qr(X, mode="reduced")

    def einsum(self, spec: str, *arrays):
        return np.einsum(spec, *arrays)

    def write_block(self, buffer, start: int, X, axis: int = 1):
        index = (slice(None),) * axis + (slice(start, start + X.shape[axis]),)
        buffer[index] = X
        return buffer

    def all_finite(self, X) -> bool:
        return bool(np.isfinite(X).all())


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

    def __init__(self, loss_fn, grad_fn, hvp_fn, theta, layout: ParamLayout, names=None):
        self.loss_fn, self.grad_fn, self.hvp_fn = loss_fn, grad_fn, hvp_fn
        self.theta = np.asarray(theta, dtype=np.float64)
        if layout.num_params != self.theta.size:
            raise ValueError(f"the layout holds {layout.num_params} entries but theta has {self.theta.size}")
        self.ops = NumpyOps(self.theta.dtype)
        self.full_layout = layout
        self.layout = layout if names is None else layout.subset(names)
        self.index = np.concatenate([np.arange(layout.blocks[n].start, layout.blocks[n].stop, dtype=np.int64)
                                     for n in self.layout.names] or [np.zeros(0, np.int64)])

    def batch_size(self, batch) -> int:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
        return len(first)

    def _full(self, delta):
        theta = self.theta.copy()
        if delta is not None:
            theta[self.index] += delta
        return theta

    def loss(self, batch, delta=None) -> float:
        return float(self.loss_fn(self._full(delta), batch))

    def gradient(self, batch):
        return np.asarray(self.grad_fn(self.theta, batch))[self.index]

    def hvp(self, index, batch, V):
        full = np.zeros((self.theta.size, V.shape[1]))
        full[self.index] = V
        return np.asarray(self.hvp_fn(self.theta, batch, full))[self.index]

    def params_vector(self):
        return self.theta[self.index].copy()

    def subset(self, names):
        return NumpyAdapter(self.loss_fn, self.grad_fn, self.hvp_fn, self.theta, self.full_layout, names)


def hessian(loss_fn, grad_fn, hvp_fn, params, data, *, wrt=None, reduction: str = "mean", comm=None,
            check_deterministic: bool = True) -> ModelOperator:
    """The loss Hessian of a model written in NumPy, from its own gradient and HVP functions.

    Args:
        loss_fn, grad_fn, hvp_fn: functions of ``(theta, batch)`` (and ``V`` for the HVP)
            with ``theta`` the flat parameter vector; see :class:`NumpyAdapter`.
        params: a dict name -> array (flattened in order; the shapes are kept for
            ``H.unflatten``) or one flat array (one parameter named ``"theta"``).
        data: one batch (a tuple or dict) or a re-iterable of batches; ``batch[0]`` (or
            the first dict value) has one row per sample.
        wrt: ``None`` (every parameter) or names / glob patterns of the parameters to
            differentiate; the others are held fixed.
        reduction, comm, check_deterministic: as for :class:`~specops.model.ModelOperator`.
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
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic)


def matrix_operator(x, symmetric=None):
    """A dense NumPy matrix as an operator (same as :func:`specops.aslinearoperator`)."""
    from specops.operator import aslinearoperator

    return aslinearoperator(np.asarray(x), symmetric=symmetric)
