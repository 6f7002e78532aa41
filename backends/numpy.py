"""The NumPy backend: the reference implementation of the vector-operation protocol.

Dense arrays, SciPy sparse matrices and SciPy ``LinearOperator`` s are wrapped by
:func:`specops.aslinearoperator`, whose vectors are NumPy arrays on the host.
"""

from __future__ import annotations

import numpy as np

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
        return np.zeros(shape, dtype=self.dtype)

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
        return np.einsum(spec, *arrays, optimize=True)

    def all_finite(self, X) -> bool:
        return bool(np.isfinite(X).all())
