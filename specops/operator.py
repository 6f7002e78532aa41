"""Square linear operators known through their products, and their algebra."""

from __future__ import annotations

import numbers
from typing import Any, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from specops.ops import Array, VectorOps

T = TypeVar("T")

OperatorLike: TypeAlias = Any
"""What :func:`aslinearoperator` takes: a :class:`LinearOperator`, a NumPy array, a SciPy sparse
matrix or ``LinearOperator``, or a dense torch / JAX / TensorFlow matrix."""


class NonFiniteError(FloatingPointError):
    """A product or a loss came back with NaN or infinite entries."""


def _dtype_name(x: Any) -> str:
    dt = getattr(x, "dtype", None)
    return getattr(dt, "name", None) or str(dt).rsplit(".", 1)[-1]


class LinearOperator:
    """A square linear operator ``A`` (n x n) known through ``A @ V``.

    Subclasses implement :meth:`_matmat` on native arrays of shape (n, k); everything
    else (validation, ``matvec``, ``@``, algebra, SciPy interop) is derived here.

    Attributes:
        shape: ``(n, n)``.
        ops: the :class:`~specops.ops.VectorOps` of the operator's vectors.
        symmetric: whether the operator is known to be symmetric. Spectral
            algorithms refuse operators that are not.
        positive_semidefinite: what is known of the operator's definiteness: True when it
            is positive semi-definite by construction (a GGN, a Fisher, ``A + c I`` of one
            with ``c >= 0``), False when it is indefinite in general (a Hessian, ``-G``),
            None when nothing is known. :func:`~specops.solve` starts with MINRES on False.
            The algebra keeps what it can prove and says None otherwise.

    Examples:
        Every operator has products, algebra and SciPy interop:

        >>> import numpy as np
        >>> import specops as so
        >>> A = so.aslinearoperator(np.diag([1.0, 2.0, 3.0]))
        >>> A @ np.ones(3)
        array([1., 2., 3.])
        >>> (2 * A - A.identity()).to_dense()
        array([[1., 0., 0.],
               [0., 3., 0.],
               [0., 0., 5.]])

        A new operator implements ``_matmat`` on (n, k) blocks. The 1-D Laplacian, never
        stored, has the eigenvalues ``2 - 2 cos(pi j / (n + 1))``:

        >>> from specops.backends.numpy import NumpyOps
        >>> class Laplacian(so.LinearOperator):
        ...     def __init__(self, n):
        ...         super().__init__((n, n), NumpyOps(np.float64))
        ...     def _matmat(self, V):
        ...         W = 2 * V
        ...         W[1:] -= V[:-1]
        ...         W[:-1] -= V[1:]
        ...         return W
        >>> top = so.eigsh(Laplacian(50), k=1)
        >>> print(f"{top.eigenvalues[0]:.10f} {2 - 2 * np.cos(50 * np.pi / 51):.10f}")
        3.9962066575 3.9962066575
    """

    symmetric = True
    positive_semidefinite: bool | None = None

    def __init__(self, shape: tuple[int, ...], ops: VectorOps) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"specops operators are square; got shape {shape}")
        if shape[0] < 1:
            raise ValueError("the operator must have at least one row")
        self.shape = shape
        self.ops = ops

    # --- protocol -----------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype of the operator's vectors (float32 or float64)."""
        return self.ops.dtype

    @property
    def device(self) -> str:
        """Where the operator's vectors live (``"cpu"``, ``"cuda:0"``, ...)."""
        return self.ops.device

    @property
    def backend(self) -> str:
        """The backend of the operator's vectors (``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"``)."""
        return self.ops.name

    def _matmat(self, V: Array) -> Array:
        raise NotImplementedError

    def _check(self, x: Any, ndim: int) -> Array:
        ops = self.ops
        if ops.is_native(x) and _dtype_name(x) != ops.dtype.name:
            raise TypeError(
                f"this operator works on {ops.dtype.name} vectors, got {_dtype_name(x)}; "
                f"cast the input to {ops.dtype.name}"
            )
        x = ops.asarray(x)
        n = ops.local_rows(self.shape[0])  # a sharded vector: this rank's rows
        if len(x.shape) != ndim or x.shape[0] != n:
            want = f"({n},)" if ndim == 1 else f"({n}, k)"
            raise ValueError(f"expected an array of shape {want}, got {tuple(x.shape)}")
        return x

    def matvec(self, v: Array) -> Array:
        """``A v`` for ``v`` of shape (n,)."""
        v = self._check(v, 1)
        return self._matmat(v[:, None])[:, 0]

    def matmat(self, V: Array) -> Array:
        """``A V`` for ``V`` of shape (n, k): k products in one pass."""
        V = self._check(V, 2)
        if V.shape[1] == 0:
            return V
        return self._matmat(V)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        ndim = len(getattr(other, "shape", np.shape(other)))
        return self.matvec(other) if ndim == 1 else self.matmat(other)

    # --- algebra ------------------------------------------------------------------
    def __add__(self, other: object) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __sub__(self, other: object) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, ScaledOperator(other, -1.0))

    def __mul__(self, c: object) -> LinearOperator:
        if not isinstance(c, numbers.Real):
            return NotImplemented
        return ScaledOperator(self, float(c))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def shift(self, c: float) -> LinearOperator:
        """``A + c I``."""
        return SumOperator(self, ScaledOperator(IdentityOperator(self.shape[0], self.ops), float(c)))

    def identity(self) -> LinearOperator:
        """The identity with this operator's shape and vectors (for ``A - c * A.identity()``)."""
        return IdentityOperator(self.shape[0], self.ops)

    def restrict(self, index: slice | list[slice] | npt.ArrayLike) -> LinearOperator:
        """``P^T A P``: the operator on a subset of coordinates.

        Args:
            index: a slice, a sequence of slices, or an integer index array.

        Returns:
            The restricted operator, of size the number of selected coordinates.
        """
        return RestrictedOperator(self, index)

    # --- interop ------------------------------------------------------------------
    def to_scipy(self) -> Any:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` with the same products."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        ops = self.ops

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            vec = X.ndim == 1
            Y = ops.to_numpy(self.matmat(ops.from_numpy(X[:, None] if vec else X)))
            return Y[:, 0] if vec else Y

        return ScipyOperator(
            self.shape, matvec=mm, matmat=mm, rmatvec=mm if self.symmetric else None, dtype=np.float64
        )

    def to_dense(self, chunk_size: int = 64) -> np.ndarray:
        """The dense float64 matrix (n products, ``chunk_size`` columns a ``matmat``): for small operators, tests."""
        n = self.shape[0]
        cols = [
            self.ops.to_numpy(self.matmat(self.ops.identity_columns(n, j, min(n, j + chunk_size))))
            for j in range(0, n, chunk_size)
        ]
        return np.concatenate(cols, axis=1)

    def decide(self, value: T) -> T:
        """A host value that steers an algorithm, as every process must take it.

        The value is a convergence flag, a breakdown mask, an estimator choice, ...
        Algorithms pass every data-dependent branch through this. A single-process operator
        returns ``value``; a data-parallel one returns rank 0's (one broadcast), so ranks whose
        floating-point results differ in the last bit (other MPIs, heterogeneous nodes,
        non-deterministic GPU reductions) still take the same path and never deadlock.
        Composite operators ask the operators they are made of.
        """
        for part in (getattr(self, "A", None), getattr(self, "B", None)):
            if isinstance(part, LinearOperator):
                value = part.decide(value)
        return self.ops.decide(value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.ops}>"


def _same_space(A: LinearOperator, B: LinearOperator) -> None:
    if A.shape != B.shape:
        raise ValueError(f"operator shapes differ: {A.shape} and {B.shape}")
    if A.ops != B.ops:
        raise ValueError(f"operators live on different backends/dtypes/devices: {A.ops} and {B.ops}")


def scaled_definiteness(flag: bool | None, c: float) -> bool | None:
    """The :attr:`LinearOperator.positive_semidefinite` of ``c A`` from ``A``'s ``flag``."""
    if c == 0:
        return True
    if c > 0 or flag is None:
        return flag
    return False  # -PSD is negative semi-definite, -indefinite is indefinite


class SumOperator(LinearOperator):
    """``A + B`` for two operators on the same vectors; symmetric when both are."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        _same_space(A, B)
        super().__init__(A.shape, A.ops)
        self.A, self.B = A, B
        self.symmetric = A.symmetric and B.symmetric
        self.positive_semidefinite = True if A.positive_semidefinite and B.positive_semidefinite else None

    def _matmat(self, V: Array) -> Array:
        return self.A._matmat(V) + self.B._matmat(V)


class ScaledOperator(LinearOperator):
    """``c A`` for a real number ``c``."""

    def __init__(self, A: LinearOperator, c: float) -> None:
        super().__init__(A.shape, A.ops)
        self.A, self.c = A, float(c)
        self.symmetric = A.symmetric
        self.positive_semidefinite = scaled_definiteness(A.positive_semidefinite, self.c)

    def _matmat(self, V: Array) -> Array:
        return self.A._matmat(V) * self.c


class ProductOperator(LinearOperator):
    """``A B``; symmetric when it is ``A A`` or both factors say so via ``symmetric``."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        _same_space(A, B)
        super().__init__(A.shape, A.ops)
        self.A, self.B = A, B
        self.symmetric = A is B and A.symmetric
        self.positive_semidefinite = True if self.symmetric else None  # A A = A^T A

    def _matmat(self, V: Array) -> Array:
        return self.A._matmat(self.B._matmat(V))


class IdentityOperator(LinearOperator):
    """The n x n identity on a backend's vectors."""

    positive_semidefinite = True

    def __init__(self, n: int, ops: VectorOps) -> None:
        super().__init__((n, n), ops)

    def _matmat(self, V: Array) -> Array:
        return V


def _index_to_slices(index: Any, n: int) -> list[slice]:
    if isinstance(index, slice):
        index = [index]
    if isinstance(index, (list, tuple)) and index and all(isinstance(s, slice) for s in index):
        slices = []
        for s in index:
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError("restriction slices must have step 1")
            if stop > start:
                slices.append(slice(start, stop))
    else:
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError("restrict() takes a slice, a list of slices or a 1-D integer index array")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"restriction index out of range for an operator of size {n}")
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        slices = [slice(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks) if r.size]
    if not slices:
        raise ValueError("the restriction selects no coordinates")
    ordered = sorted(slices, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.stop:
            raise ValueError("restriction slices overlap")
    return slices


class RestrictedOperator(LinearOperator):
    """``P^T A P`` for a coordinate selection ``P`` given as slices of ``A``'s coordinates."""

    def __init__(self, A: LinearOperator, index: Any) -> None:
        n = A.shape[0]
        self.A = A
        self.slices = _index_to_slices(index, n)
        m = sum(s.stop - s.start for s in self.slices)
        super().__init__((m, m), A.ops)
        self.symmetric = A.symmetric
        # P^T A P of a PSD A is PSD; a block of an indefinite operator may be definite
        self.positive_semidefinite = True if A.positive_semidefinite else None

    def take(self, X: Array) -> Array:
        """The selected rows of ``X`` (n, k), in selection order."""
        return self.ops.concat([X[s] for s in self.slices], axis=0)

    def embed(self, V: Array) -> Array:
        """``P V``: rows of ``V`` (m, k) placed at the selected coordinates, zeros elsewhere."""
        n, k = self.A.shape[0], V.shape[1]
        offsets, off = [], 0
        for s in self.slices:
            offsets.append(off)
            off += s.stop - s.start
        pieces, pos = [], 0
        for s, o in sorted(zip(self.slices, offsets), key=lambda t: t[0].start):
            if s.start > pos:
                pieces.append(self.ops.zeros((s.start - pos, k)))
            pieces.append(V[o : o + s.stop - s.start])
            pos = s.stop
        if pos < n:
            pieces.append(self.ops.zeros((n - pos, k)))
        return self.ops.concat(pieces, axis=0)

    def _matmat(self, V: Array) -> Array:
        return self.take(self.A._matmat(self.embed(V)))


class MatrixOperator(LinearOperator):
    """A dense or sparse matrix of a backend, multiplied with the backend's ``@``."""

    def __init__(self, matrix: Any, ops: VectorOps, symmetric: bool = True) -> None:
        super().__init__(matrix.shape, ops)
        self.matrix = matrix
        self.symmetric = symmetric

    def _matmat(self, V: Array) -> Array:
        return self.matrix @ V


class ScipyOperator(LinearOperator):
    """A ``scipy.sparse.linalg.LinearOperator`` (or anything with its ``matmat``)."""

    def __init__(self, op: Any, ops: VectorOps, symmetric: bool = True) -> None:
        super().__init__(op.shape, ops)
        self.op = op
        self.symmetric = symmetric

    def _matmat(self, V: Array) -> Array:
        return np.asarray(self.op.matmat(V), dtype=self.dtype)


def check_dense_symmetric(M: np.ndarray, what: str) -> None:
    """Raise if the dense matrix ``M`` is not symmetric to rounding.

    Args:
        M: a square float64 matrix.
        what: how the error message names it (``"matrix"``, ``"Hessian"``).

    Raises:
        ValueError: ``max |M - M^T|`` exceeds ``1e-10 max |M| sqrt(n)``.
    """
    scale = max(float(np.abs(M).max()), np.finfo(np.float64).tiny)
    asym = float(np.abs(M - M.T).max())
    if asym > 1e-10 * scale * max(1, M.shape[0]) ** 0.5:
        raise ValueError(
            f"the {what} is not symmetric (max |A - A^T| = {asym:.3g}, max |A| = {scale:.3g}); "
            "symmetrize it with (A + A.T) / 2, or pass symmetric=False to wrap it anyway"
        )


def aslinearoperator(x: OperatorLike, *, symmetric: bool | None = None,
                     dtype: npt.DTypeLike | None = None) -> LinearOperator:
    """Wrap ``x`` as a :class:`LinearOperator`.

    Args:
        x: a specops operator (returned as is), a NumPy array, a SciPy sparse matrix,
            a ``scipy.sparse.linalg.LinearOperator``, or a dense torch / JAX /
            TensorFlow matrix (whose products stay in that framework and device).
        symmetric: ``None`` checks dense and sparse matrices for symmetry and raises if
            they are not; ``True`` trusts the caller; ``False`` wraps a non-symmetric
            operator (spectral algorithms will refuse it).
        dtype: NumPy, SciPy: the dtype of the vectors (default: float64, or float32 for
            float32 input).

    Returns:
        The operator; its vectors are arrays of ``x``'s framework (NumPy for NumPy and SciPy).

    Raises:
        TypeError: for an unsupported type.
        ValueError: for a non-square or (with ``symmetric=None``) non-symmetric matrix.

    Examples:
        >>> import numpy as np
        >>> import scipy.sparse as sp
        >>> import specops as so
        >>> A = so.aslinearoperator(sp.diags([1.0, 2.0, 3.0]))
        >>> A.shape, A.backend, A.dtype.name
        ((3, 3), 'numpy', 'float64')
        >>> A @ np.array([1.0, 1.0, 1.0])
        array([1., 2., 3.])
        >>> so.aslinearoperator(np.array([[1.0, 2.0], [0.0, 1.0]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: the matrix is not symmetric (max |A - A^T| = 2, max |A| = 2); ...
    """
    if isinstance(x, LinearOperator):
        return x
    module = type(x).__module__.split(".")[0]
    if module in ("torch", "jax", "jaxlib", "tensorflow", "keras"):
        import importlib

        name = {"jaxlib": "jax", "keras": "tensorflow"}.get(module, module)
        backend = importlib.import_module(f"specops.backends.{name}")
        return backend.matrix_operator(x, symmetric=symmetric)

    import scipy.sparse as sp
    from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

    from specops.backends.numpy import NumpyOps

    def pick_dtype(d: npt.DTypeLike) -> npt.DTypeLike:
        if dtype is not None:
            return dtype
        return np.float32 if np.dtype(d) == np.float32 else np.float64

    shape = getattr(x, "shape", None)
    if shape is not None and (len(shape) != 2 or shape[0] != shape[1]):
        raise ValueError(f"specops operators are square; got shape {tuple(shape)}")
    if isinstance(x, ScipyLinearOperator):
        return ScipyOperator(x, NumpyOps(pick_dtype(x.dtype)), symmetric=symmetric is not False)
    if sp.issparse(x):
        ops = NumpyOps(pick_dtype(x.dtype))
        M = sp.csr_matrix(x, dtype=ops.dtype)
        if symmetric is None:
            asym = abs(M - M.T).max() if M.nnz else 0.0
            scale = abs(M).max() if M.nnz else 0.0
            if asym > 1e-10 * max(scale, np.finfo(float).tiny) * M.shape[0] ** 0.5:
                raise ValueError(
                    f"the sparse matrix is not symmetric (max |A - A^T| = {asym:.3g}); "
                    "symmetrize it or pass symmetric=False"
                )
        return MatrixOperator(M, ops, symmetric=symmetric is not False)
    if isinstance(x, (np.ndarray, list, tuple)) or (np.isscalar(x) and not isinstance(x, (str, bytes))):
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TypeError(f"expected a real numeric matrix, got dtype {arr.dtype}")
        ops = NumpyOps(pick_dtype(arr.dtype))
        M = np.asarray(arr, dtype=ops.dtype)
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"specops operators are square; got shape {M.shape}")
        if not np.isfinite(M).all():
            raise ValueError("the matrix has NaN or infinite entries")
        if symmetric is None:
            check_dense_symmetric(np.asarray(M, dtype=np.float64), "matrix")
        return MatrixOperator(M, ops, symmetric=symmetric is not False)
    raise TypeError(
        f"cannot make a specops operator from {type(x).__name__}; pass a NumPy array, a SciPy "
        "sparse matrix or LinearOperator, a torch/JAX/TensorFlow matrix, or a specops operator"
    )


def check_symmetric(A: OperatorLike, *, num_probes: int = 2, rtol: float = 1e-6, seed: int = 0) -> float:
    """Probe ``A`` for symmetry: ``|x^T A y - y^T A x|`` relative to ``|x| |A y|``.

    Returns:
        The largest relative asymmetry seen.

    Raises:
        ValueError: if it exceeds ``rtol`` (the operator is not symmetric).
    """
    A = aslinearoperator(A, symmetric=False)
    ops, n = A.ops, A.shape[0]
    X = ops.random(n, range(num_probes), seed, distribution="normal", stream="symmetry-x")
    Y = ops.random(n, range(num_probes), seed, distribution="normal", stream="symmetry-y")
    AX, AY = A.matmat(X), A.matmat(Y)
    xAy = np.diag(ops.to_numpy(ops.inner(X, AY)))
    yAx = np.diag(ops.to_numpy(ops.inner(Y, AX)))
    scale = ops.column_norms(X) * np.maximum(ops.column_norms(AY), ops.column_norms(AX))
    worst = float(np.max(np.abs(xAy - yAx) / np.maximum(scale, np.finfo(float).tiny)))
    if worst > rtol:
        raise ValueError(
            f"the operator is not symmetric: x^T A y and y^T A x differ by {worst:.3g} "
            f"(relative; tolerance {rtol:g}). specops' spectral algorithms need a symmetric operator"
        )
    return worst
