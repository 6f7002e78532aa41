"""Stochastic diagonal estimation (Bekas, Kokiopoulou & Saad 2007).

``diag(A) ~ mean_j z_j * (A z_j)`` with Rademacher probes: for each entry an unbiased
estimate whose variance is the sum of squares of the off-diagonal entries of its row.
"""

from __future__ import annotations

from typing import Literal, get_args
import dataclasses

import numpy as np

from specops import _checks
from specops.operator import OperatorLike
from specops.random import Distribution, check_distribution, check_seed
from specops.results import Result
from specops.trace import probe_chunks

#: The diagonal estimators.
DiagonalMethod = Literal["hutchinson", "exact"]
METHODS: tuple[DiagonalMethod, ...] = get_args(DiagonalMethod)


@dataclasses.dataclass
class DiagonalResult(Result):
    """A diagonal estimate.

    Attributes:
        estimate: (n,) float64 estimate of ``diag(A)``.
        stderr: (n,) float64 standard error of each entry (zeros when exact).
        num_matvecs: operator-vector products used.
        settings: method, budget, seed, probe distribution.
    """

    estimate: np.ndarray
    stderr: np.ndarray
    num_matvecs: int
    settings: dict


def diagonal(A: OperatorLike, method: DiagonalMethod = "hutchinson", max_matvecs: int = 100, seed: int = 0,
             distribution: Distribution = "rademacher", chunk_size: int = 10) -> DiagonalResult:
    """Estimate the diagonal of a symmetric operator.

    Args:
        A: a :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        method: ``"hutchinson"`` (stochastic) or ``"exact"`` (``n`` products with unit
            vectors; for small operators and checks).
        max_matvecs: number of probes for ``"hutchinson"``.
        seed: seed of the probes.
        distribution: probe distribution, ``"rademacher"`` (best: exact for diagonal ``A``) or ``"normal"``.
        chunk_size: probes multiplied per ``matmat``.

    Returns:
        :class:`DiagonalResult`.

    Raises:
        ValueError: bad arguments, or an operator marked non-symmetric.
        NonFiniteError: a product returned NaN or infinity.

    Examples:
        The diagonal of a tridiagonal matrix, exactly (``n`` products) and estimated
        (each entry within a few standard errors of the truth, 2):

        >>> import numpy as np
        >>> import specops as so
        >>> B = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
        >>> so.diagonal(B, method="exact").estimate
        array([2., 2., 2.])
        >>> d = so.diagonal(B, max_matvecs=1000, seed=0)
        >>> bool(np.all(np.abs(d.estimate - 2.0) < 4 * d.stderr))
        True
    """
    A = _checks.symmetric_operator(A, "diagonal")
    _checks.choice("method", method, METHODS)
    max_matvecs = _checks.positive_int("max_matvecs", max_matvecs)
    seed, distribution = check_seed(seed), check_distribution(distribution)
    chunk_size = _checks.positive_int("chunk_size", chunk_size)
    ops, n = A.ops, A.shape[0]
    mul = _checks.Products(A)
    settings = dict(method=method, max_matvecs=max_matvecs, seed=seed, distribution=distribution, n=n, backend=A.backend)
    if method == "exact":
        parts = [ops.row_sums(E * mul(E)) for E in
                 (ops.identity_columns(n, j, min(n, j + chunk_size)) for j in range(0, n, chunk_size))]
        est = ops.to_numpy(sum(parts[1:], parts[0]))
        return DiagonalResult(est, np.zeros(est.shape[0]), mul.count, settings)
    # per-probe values z * Az on the host in float64, merged chunk by chunk (Chan et al.'s
    # update of mean and sum of squared deviations): sum(x^2)/m - mean^2 in float32 cancels
    # to 0 (or garbage) when the diagonal is large beside its spread
    # arrays of the host rows of a vector (a rank's entries where vectors are sharded)
    m, mean, m2 = 0, np.zeros(()), np.zeros(())
    for Z, AZ in probe_chunks(A, mul, max_matvecs, seed, distribution, "diagonal", chunk_size):
        P = ops.to_numpy(Z * AZ)
        k = P.shape[1]
        chunk_mean = P.mean(axis=1)
        delta = chunk_mean - mean
        m2 = m2 + np.sum((P - chunk_mean[:, None]) ** 2, axis=1) + delta**2 * (m * k / (m + k))
        mean = mean + delta * (k / (m + k))
        m += k
    stderr = np.sqrt(m2 / (m - 1) / m) if m > 1 else np.full(mean.shape, np.inf)
    return DiagonalResult(mean, stderr, m, settings)
