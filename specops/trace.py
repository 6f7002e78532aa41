"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace.

- Hutchinson (1989), Girard (1989): ``tr(A) ~ mean_j z_j^T A z_j``.
- Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace of a rank-``s`` sketch of
  ``A`` exactly, Hutchinson on the rest.
- XTrace (Epperly, Tropp & Webber 2024): every probe serves both as sketch and as
  Hutchinson probe, with a leave-one-out ("exchangeable") average.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from specops import _checks
from specops.random import check_kind, check_seed
from specops.results import Result

METHODS = ("hutchinson", "hutch++", "xtrace")
#: Probes taken before a relative-standard-error (``rtol``) stop is trusted.
MIN_PROBES_FOR_RTOL = 10


@dataclasses.dataclass
class TraceResult(Result):
    """A trace estimate.

    Attributes:
        estimate: the estimate of ``tr(A)``.
        stderr: its standard error (0 when the estimate is exact).
        num_matvecs: operator-vector products used.
        settings: method, budget, seed, probe distribution, ``rtol``.
    """

    estimate: float
    stderr: float
    num_matvecs: int
    settings: dict


def probe_chunks(A, mul, num: int, seed: int, kind: str, stream: str, chunk: int, transform=None):
    """Yield ``(Z, A Z)`` for probe columns ``0..num-1`` of one seeded stream, ``chunk`` at a time.

    ``transform`` (e.g. a projection) is applied to each probe block first. This is the
    shared probe loop of the trace and diagonal estimators.
    """
    n = A.shape[0]
    for j0 in range(0, num, chunk):
        Z = A.ops.random(n, range(j0, min(num, j0 + chunk)), seed, kind=kind, stream=stream)
        if transform is not None:
            Z = transform(Z)
        yield Z, mul(Z)


def _mean_stderr(samples: np.ndarray):
    m = len(samples)
    mean = float(np.mean(samples))
    return mean, (float(np.std(samples, ddof=1) / np.sqrt(m)) if m > 1 else float("inf"))


def _hutchinson_samples(A, mul, num, seed, kind, stream, chunk, rtol, offset=0.0, project=None):
    """Quadratic forms ``z^T A z`` (optionally of ``(I-P) A (I-P)``), stopping on ``rtol``."""
    samples = []
    for Z, AZ in probe_chunks(A, mul, num, seed, kind, stream, chunk, transform=project):
        samples.extend(A.ops.column_dots(Z, AZ))
        if rtol is not None and len(samples) >= MIN_PROBES_FOR_RTOL:
            est, err = _mean_stderr(np.array(samples))
            if err <= rtol * abs(offset + est):
                break
    return np.array(samples)


def trace(A, method: str = "hutch++", num_matvecs: int = 100, rtol: float | None = None, seed: int = 0,
          kind: str = "rademacher", chunk: int = 10) -> TraceResult:
    """Estimate the trace of a symmetric operator.

    Args:
        A: a :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        num_matvecs: the budget of products.
        rtol: stop early once ``stderr <= rtol * |estimate|`` (after at least 10 probes);
            Hutchinson and Hutch++ (its Hutchinson phase) only.
        seed: seed of the probes.
        kind: probe distribution, ``"rademacher"`` or ``"normal"``.
        chunk: probes multiplied per ``matmat`` (one pass over the data for a model).

    Returns:
        :class:`TraceResult` with the estimate and its standard error.
    """
    A = _checks.symmetric_operator(A, "trace")
    _checks.choice("method", method, METHODS)
    num_matvecs = _checks.positive_int("num_matvecs", num_matvecs)
    rtol = _checks.positive_float("rtol", rtol, allow_none=True)
    seed, kind = check_seed(seed), check_kind(kind)
    chunk = _checks.positive_int("chunk", chunk)
    settings = dict(method=method, num_matvecs=num_matvecs, rtol=rtol, seed=seed, kind=kind,
                    n=A.shape[0], backend=A.backend)
    mul = _checks.Products(A)
    if method == "hutchinson":
        est, err = _mean_stderr(_hutchinson_samples(A, mul, num_matvecs, seed, kind, "trace", chunk, rtol))
    elif method == "hutch++":
        est, err = _hutchpp(A, mul, num_matvecs, seed, kind, chunk, rtol)
    else:
        if rtol is not None:
            raise ValueError("rtol is supported by the 'hutchinson' and 'hutch++' methods; "
                             "'xtrace' uses its whole num_matvecs budget")
        est, err = _xtrace(A, mul, num_matvecs, seed, kind)
    return TraceResult(estimate=est, stderr=err, num_matvecs=mul.count, settings=settings)


def _hutchpp(A, mul, m, seed, kind, chunk, rtol):
    if m < 3:
        raise ValueError(f"hutch++ needs num_matvecs >= 3 (sketch, its product, probes), got {m}")
    ops, n = A.ops, A.shape[0]
    s = m // 3
    Q, _ = ops.qr(mul(ops.random(n, range(s), seed, kind=kind, stream="hutch++-sketch")))
    low_rank = float(np.sum(ops.column_dots(Q, mul(Q))))

    def deflate(Z):
        return Z - ops.combine(Q, ops.inner(Q, Z))

    samples = _hutchinson_samples(A, mul, m - 2 * s, seed, kind, "hutch++-probe", chunk, rtol,
                                  offset=low_rank, project=deflate)
    est, err = _mean_stderr(samples)
    return low_rank + est, err


def _xtrace(A, mul, m, seed, kind):
    """XTrace with ``s = m // 2`` probes: ``s`` products for ``Y = A Omega`` and ``s`` for ``A Q``.

    With ``Y = Q R`` and ``s_i = R^{-T} e_i / ||R^{-T} e_i||``, the basis without probe ``i``
    spans ``Q (I - s_i s_i^T)``; every leave-one-out estimate follows from the small
    matrices ``R``, ``W = Q^T Omega`` and ``H = Q^T A Q`` (derivation in docs/algorithms.md).
    """
    if m < 4:
        raise ValueError(f"xtrace needs num_matvecs >= 4 (two probes), got {m}")
    ops, n = A.ops, A.shape[0]
    s = m // 2
    Omega = ops.random(n, range(s), seed, kind=kind, stream="xtrace")
    Q, R = ops.qr(mul(Omega))
    H = ops.to_numpy(ops.inner(Q, mul(Q)))
    H = (H + H.T) / 2
    R = ops.to_numpy(R)
    d = np.abs(np.diag(R))
    if d.min() <= 1e3 * np.finfo(ops.dtype).eps * d.max():
        # rank(A) < s: span(Q) holds the range of A and tr(Q^T A Q) is exact
        return float(np.trace(H)), 0.0
    W = ops.to_numpy(ops.inner(Q, Omega))
    S = np.linalg.inv(R).T
    S /= np.linalg.norm(S, axis=0)
    c = np.sum(S * W, axis=0)                      # s_i^T w_i
    U = W - S * c                                   # w_i - c_i s_i
    ests = (np.trace(H) - np.sum(S * (H @ S), axis=0)
            - np.sum(W * R, axis=0) + 2 * c * np.sum(R * S, axis=0) + np.sum(U * (H @ U), axis=0))
    return _mean_stderr(ests)
