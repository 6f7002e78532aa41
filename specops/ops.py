"""The vector-operation protocol that every backend implements.

The algorithms of specops are written once, against this small set of coarse
operations on the backend's own arrays (NumPy, torch, JAX, TensorFlow). Vectors
never leave the device of the model: only small dense matrices (k x k projections,
Lanczos coefficients) and scalars come to the host, as float64 NumPy.

Besides these methods, algorithms rely only on what every array library spells the
same way: ``+``, ``-``, ``*`` and ``/`` by Python floats and by arrays of equal shape,
basic slicing (``X[:, a:b]``, ``x[a:b]``) and ``.shape``.

Randomness is drawn on the host from an explicit seed, column by column
(:mod:`specops.random`), so the same seed gives the same probe vectors on every
backend, device and number of MPI ranks.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from specops import random as _random

Array: TypeAlias = Any
"""A backend's native array: ``numpy.ndarray``, ``torch.Tensor``, ``jax.Array`` or ``tf.Tensor``."""


class NativeArray(Protocol):
    """What the core reads of a backend's array (the module docstring's list).

    mypy checks it where a backend names its array type (``VectorOps[torch.Tensor]``).
    """

    @property
    def shape(self) -> Any:
        """The array's shape."""

    @property
    def T(self) -> Any:  # noqa: N802 (the array libraries' name)
        """The transpose."""

    @property
    def reshape(self) -> Callable[..., Any]:
        """The array's ``reshape`` method."""

    def __getitem__(self, key: Any, /) -> Any: ...
    def __add__(self, other: Any, /) -> Any: ...
    def __sub__(self, other: Any, /) -> Any: ...
    def __mul__(self, other: Any, /) -> Any: ...
    def __truediv__(self, other: Any, /) -> Any: ...


#: The native array type of one backend's :class:`VectorOps` (``VectorOps[torch.Tensor]``); an
#: unparameterized ``VectorOps`` (the algorithms' view) takes any array.
Native = TypeVar("Native", bound=NativeArray)

#: A Gram-Schmidt pass that cuts a vector's norm below ``REPEAT`` times its norm before is
#: repeated (the Daniel-Gragg-Kaufman-Stewart criterion, 1976; ARPACK uses 0.717).
REPEAT = 2 ** -0.5
#: Rows per block of an in-place rotation (:meth:`VectorOps.rotate_prefix`) and of the
#: blocked reductions of :func:`sum_over_rows`.
ROWS = 1 << 15


class VectorOps(abc.ABC, Generic[Native]):
    """Coarse vector operations on one backend's arrays of one dtype on one device.

    Subclasses implement the abstract methods; the rest is derived here once.

    Attributes:
        name: backend name (``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"``).
        dtype: the NumPy dtype matching the arrays' dtype (float32 or float64).
        device: a human-readable device string (``"cpu"``, ``"cuda:0"``, ...).
        in_place: whether :meth:`write_block` writes into the buffer (and into views of
            it, as basic slices are), as NumPy and torch do.
    """

    name: str = "abstract"
    in_place: bool = False

    def __init__(self, dtype: npt.DTypeLike, device: str = "cpu") -> None:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(
                f"specops works on float32 or float64 vectors, got {dtype}; "
                "cast the operator's inputs to a floating dtype"
            )
        self.dtype = dtype
        self.device = str(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dtype={self.dtype.name}, device={self.device!r})"

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.dtype == other.dtype
            and self.device == other.device
        )

    def __hash__(self) -> int:
        return hash((type(self), self.dtype, self.device))

    # --- required -----------------------------------------------------------------
    @abc.abstractmethod
    def is_native(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend."""

    @abc.abstractmethod
    def asarray(self, x: Any) -> Native:
        """``x`` (a native array, or anything NumPy accepts) as a native array.

        The array has this dtype and is on this device.
        """

    @abc.abstractmethod
    def to_numpy(self, x: Native) -> np.ndarray:
        """A host float64 NumPy copy of ``x``."""

    @abc.abstractmethod
    def zeros(self, shape: tuple[int, ...]) -> Native:
        """Native zeros of ``shape``."""

    @abc.abstractmethod
    def concat(self, arrays: Sequence[Native], axis: int) -> Native:
        """Concatenation of native arrays along ``axis``."""

    @abc.abstractmethod
    def inner(self, X: Native, Y: Native) -> Native:
        """``X^T Y`` for native ``X`` (n, a) and ``Y`` (n, b): native (a, b)."""

    @abc.abstractmethod
    def combine(self, X: Native, C: Native | np.ndarray) -> Native:
        """``X @ C`` for native ``X`` (n, a) and ``C`` (a, b), native or NumPy."""

    @abc.abstractmethod
    def column_norms(self, X: Native) -> np.ndarray:
        """Euclidean norms of the columns of native ``X`` (n, k) as host float64."""

    @abc.abstractmethod
    def qr(self, X: Native) -> tuple[Native, Native]:
        """Reduced QR of native ``X`` (n, k), k <= n: native ``Q`` (n, k), ``R`` (k, k)."""

    def orthonormalize(self, X: Native) -> tuple[Native, np.ndarray]:
        """``Q, R`` with orthonormal ``Q`` (native) and host ``R`` (k, k), ``X = Q R``."""
        if X.shape[1] == 1:
            r = self.norm(X)
            return X * (1.0 / r if r > 0 else 0.0), np.array([[r]])
        Q, R = self.qr(X)
        return Q, self.to_numpy(R)

    @abc.abstractmethod
    def all_finite(self, X: Native) -> bool:
        """Whether every entry of ``X`` is finite (one host synchronisation)."""

    # --- derived (backends may override for speed) ----------------------------------
    def einsum(self, spec: str, *arrays: Native) -> Native:
        """``einsum`` over native arrays.

        This default goes through the host; backends override it with their own
        ``einsum`` to stay on the device.
        """
        return self.asarray(np.einsum(spec, *(self.to_numpy(a) for a in arrays)))

    def from_numpy(self, a: np.ndarray) -> Native:
        """A host array as a native array of this dtype on this device."""
        return self.asarray(np.asarray(a, dtype=self.dtype))

    def write_block(self, buffer: Native, start: int, X: Native, axis: int = 1) -> Native:
        """``buffer`` with the slices ``start .. start + k - 1`` along ``axis`` replaced by ``X``.

        Here ``k = X.shape[axis]``; the other dimensions match.

        Backends with mutable arrays (NumPy, torch) override this to write in place, so a
        growing basis is not copied at every step; this default returns a new array.
        """
        k = X.shape[axis]
        head = tuple([slice(None)] * axis)
        return self.concat([buffer[head + (slice(0, start),)], X, buffer[head + (slice(start + k, None),)]],
                           axis=axis)

    def reshape(self, x: Native, shape: Sequence[int]) -> Native:
        """``x`` reshaped to ``shape`` (a view where the backend can)."""
        return x.reshape(tuple(shape))

    def transpose(self, X: Native) -> Native:
        """The transpose of a native (n, k) block."""
        return X.T

    def as_columns(self, x: Native) -> Native:
        """``x`` of shape (n,) as (n, 1); (n, k) unchanged."""
        return x[:, None] if len(x.shape) == 1 else x

    def scale_columns(self, X: Native, s: npt.ArrayLike) -> Native:
        """``X * s`` with one host scale per column."""
        return X * self.from_numpy(np.asarray(s, dtype=np.float64)[None, :])

    def column_dots(self, X: Native, Y: Native) -> np.ndarray:
        """``(X * Y).sum(axis=0)`` for native (n, k) blocks, as host float64 (k,)."""
        ones = self.from_numpy(np.ones((X.shape[0], 1)))
        return self.to_numpy(self.inner(ones, X * Y))[0]

    def host_column_dots(self, X: Native, Y: Native) -> np.ndarray:
        """``(X * Y).sum(axis=0)`` summed in float64 on the host (exact where the device sum rounds)."""
        return np.sum(self.to_numpy(X) * self.to_numpy(Y), axis=0)

    def local_rows(self, n: int) -> int:
        """The rows this process holds of a vector of ``n`` entries: ``n`` unless sharded."""
        return n

    def decide(self, value: Any) -> Any:
        """A host value as every process takes it: itself, or rank 0's where vectors are sharded."""
        return value

    def row_sums(self, X: Native) -> Native:
        """``X.sum(axis=1)`` for native ``X`` (n, k): native (n,)."""
        return self.combine(X, np.ones((X.shape[1], 1)))[:, 0]

    def dot(self, x: Native, y: Native) -> float:
        """``x . y`` for native vectors, as a host float."""
        return float(self.to_numpy(self.inner(self.as_columns(x), self.as_columns(y)))[0, 0])

    def norm(self, x: Native) -> float:
        """Euclidean norm of a native vector, as a host float."""
        return float(self.column_norms(self.as_columns(x))[0])

    def buffer(self, shape: tuple[int, ...]) -> Native:
        """Zeros for a basis buffer: ``(n, m)`` columns, or a ``(slots, n, p)`` stack of blocks.

        Backends lay a 2-D buffer out so that each column is contiguous (a block of
        columns is then read at the speed of memory, however few of them are in use),
        and those written :attr:`in_place` may leave it uninitialized: the algorithms
        read only the slices they wrote. This default is :meth:`zeros`.
        """
        return self.zeros(shape)

    def subtract_from(self, W: Native, Y: Native) -> Native:
        """``W - Y`` for a temporary ``Y`` that may be overwritten (it is, :attr:`in_place`).

        So a Gram-Schmidt pass holds two blocks, not three.
        """
        if not self.in_place:
            return W - Y
        Y *= -1.0
        Y += W
        return Y

    def subtract_combine(self, W: Native, X: Native, C: Native | np.ndarray) -> Native:
        """``W - X @ C`` (backends fuse it into one matrix product where they can)."""
        return self.subtract_from(W, self.combine(X, C))

    def project(self, W: Native, Q: Native, start: int, stop: int) -> tuple[Native, np.ndarray]:
        """One Gram-Schmidt pass: ``W - Q_s Q_s^T W`` with ``Q_s`` the columns ``start..stop-1`` of ``Q``.

        Returns:
            ``(W', C)`` with the host coefficients ``C = Q_s^T W`` (stop - start, b).
        """
        Qs = Q[:, start:stop]
        C = self.inner(Qs, W)
        return self.subtract_combine(W, Qs, C), self.to_numpy(C)

    def orthogonalize(self, W: Native, Q: Native | None, columns: int | None = None,
                      recent: int = 0) -> tuple[Native, np.ndarray]:
        """Remove the span of the orthonormal columns of ``Q`` from ``W``.

        Classical Gram-Schmidt with the Daniel-Gragg-Kaufman-Stewart criterion: a pass
        over all columns, repeated only for a block whose norm it cut by more than
        ``REPEAT`` in some column ("twice is enough": Giraud, Langou & Rozlozník 2005).
        The result is orthogonal to ``Q`` to working precision either way: the rounding
        of a pass is relative to the norm it started from, which the criterion bounds
        by ``1 / REPEAT`` times the norm it leaves. With ``recent``, the last ``recent``
        columns (a Lanczos recurrence's large coefficients, which would trip the
        criterion every step) are removed first, so that the pass over all columns
        usually removes only rounding and is not repeated.

        Args:
            W: native (n, b) block.
            Q: native (n, a) orthonormal columns.
            columns: use only the first ``columns`` columns of ``Q`` (a basis buffer
                filled that far; the rest may hold anything). Default: all of them.
            recent: remove the columns ``columns - recent .. columns - 1`` first.

        Returns:
            ``(W', C)``: the orthogonalized block and the host coefficients ``Q^T W``
            (columns, b) that were removed.
        """
        columns = (0 if Q is None else Q.shape[1]) if columns is None else int(columns)
        C = np.zeros((columns, W.shape[1]))
        if Q is None or columns == 0:
            return W, C
        start = columns - recent
        if 0 < recent < columns:
            W, C[start:] = self.project(W, Q, start, columns)
        before = self.column_norms(W)
        W, C1 = self.project(W, Q, 0, columns)
        C += C1
        if np.any(self.column_norms(W) < REPEAT * before):
            W, C1 = self.project(W, Q, 0, columns)
            C += C1
        return W, C

    def combine_prefix(self, X: Native, C: np.ndarray) -> Native:
        """``X[:, :c] @ C`` for a basis buffer ``X`` (n, a) filled to ``c = C.shape[0] <= a`` columns.

        The columns past ``c`` may hold anything.
        """
        return self.combine(X[:, : C.shape[0]], C)

    def rotate_prefix(self, X: Native, C: np.ndarray) -> Native:
        """``X`` with its first ``C.shape[1]`` columns replaced by ``X[:, :C.shape[0]] @ C``.

        A thick restart's rotation of the basis onto its Ritz vectors: on backends
        whose arrays are written :attr:`in_place`, a block of ``ROWS`` rows at a
        time, so no second copy of the kept vectors is made; on the others a new array.
        """
        if not self.in_place:
            return self.write_block(X, 0, self.combine_prefix(X, C))
        for r in range(0, X.shape[0], ROWS):
            rows = X[r : r + ROWS]  # a view: writing it writes X
            self.write_block(rows, 0, self.combine_prefix(rows, C))
        return X

    def project_probes(self, W: Native, X: Native, start: int, stop: int) -> tuple[Native, np.ndarray]:
        """One batched Gram-Schmidt pass per probe ``p`` against ``X[start:stop, :, p]``.

        Returns:
            ``(W', C)`` with host coefficients ``C`` (stop - start, p).
        """
        B = X[start:stop]
        c = self.einsum("jnp,np->jp", B, W)
        return self.subtract_from(W, self.einsum("jnp,jp->np", B, c)), self.to_numpy(c)

    def orthogonalize_probes(self, W: Native, X: Native, steps: int,
                             recent: Sequence[int] = ()) -> tuple[Native, np.ndarray]:
        """Per probe ``p``, remove from ``W[:, p]`` the span of the vectors ``X[:steps, :, p]``.

        ``X`` is a stack of independent orthonormal Lanczos bases, one per probe. As in
        :meth:`orthogonalize`, the ``recent`` slices (a recurrence's large coefficients)
        are removed first, then a pass over all ``steps``, repeated if it cut some probe's
        norm by more than ``REPEAT``.

        Args:
            W: native (n, p) block, one column per probe.
            X: native (steps or more, n, p) stack of bases.
            steps: use the first ``steps`` vectors of each basis.
            recent: indices (< ``steps``) of slices to remove first.

        Returns:
            ``(W', C)`` with host coefficients ``C`` (steps, p).
        """
        C = np.zeros((steps, W.shape[1]))
        if len(recent) < steps:
            for i in recent:
                W, c = self.project_probes(W, X, i, i + 1)
                C[i] += c[0]
        before = self.column_norms(W)
        W, c = self.project_probes(W, X, 0, steps)
        C += c
        if np.any(self.column_norms(W) < REPEAT * before):
            W, c = self.project_probes(W, X, 0, steps)
            C += c
        return W, C

    def to_host(self, X: Native) -> np.ndarray:
        """``X`` as a host NumPy array of this dtype (no copy where the backend shares memory)."""
        return np.asarray(self.to_numpy(X), dtype=self.dtype)

    def move(self, X: Native, source: VectorOps) -> Native:
        """``X``, an array of the vector operations ``source``, as an array of these.

        The identity when ``source`` is these operations; otherwise a copy into this
        backend's memory (e.g. a block between a GPU and host memory).
        """
        if source == self:
            return X
        return self.asarray(X if self.is_native(X) else source.to_host(X))

    def host(self) -> VectorOps:
        """Vector operations of this dtype in host memory (for a basis kept off the device).

        NumPy by default; backends whose host arrays are their own (torch CPU tensors)
        return those.
        """
        from specops.backends.numpy import NumpyOps

        return NumpyOps(self.dtype)

    def free_memory(self) -> int:
        """Bytes free for new arrays on this device (an estimate, for choosing buffer sizes).

        Host memory (``MemAvailable``) by default; a backend whose arrays live on an
        accelerator overrides it with the device's free memory.
        """
        return host_free_memory()

    def random(self, n: int, columns: Iterable[int], seed: int, distribution: _random.Distribution = "rademacher",
               stream: str = "") -> Native:
        """Seeded random columns (n, len(columns)), the same on every backend.

        Column ``j`` depends only on ``(seed, stream, j)``, so drawing columns in
        chunks gives the same matrix as drawing them at once.
        """
        return self.from_numpy(_random.probes(n, columns, seed, distribution=distribution, stream=stream))

    def identity_columns(self, n: int, start: int, stop: int) -> Native:
        """Columns ``start..stop-1`` of the n x n identity."""
        E = np.zeros((n, stop - start), dtype=self.dtype)
        E[np.arange(start, stop), np.arange(stop - start)] = 1.0
        return self.from_numpy(E)


def sum_over_rows(fn: Callable[..., Any], *arrays: Array, rows: int = ROWS) -> Any:
    """``sum_b fn(*blocks_b)`` over blocks of ``rows`` rows of the ``arrays`` (n, ...).

    For reductions over the n entries (inner products, norms) in backends whose BLAS
    adds them one by one in the arrays' precision: in float32 at n = 10^7 that loses
    1-2 % on a sum of squares (torch's MKL ``X.T @ X``, ``vector_norm``), enough to break
    a basis' orthonormality. Blocks keep each float32 sum short and ``fn`` returns its
    partial sums in float64.
    """
    total = None
    for r in range(0, arrays[0].shape[0], rows):
        part = fn(*(a[r : r + rows] for a in arrays))
        total = part if total is None else total + part
    return fn(*arrays) if total is None else total  # no rows (a rank whose shards are empty): fn's zeros


def host_free_memory() -> int:
    """Bytes of host memory available (``MemAvailable`` of ``/proc/meminfo``, else physical / 4)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30
