"""Extreme eigenpairs of a symmetric operator: block Lanczos and deflated power iteration.

Lanczos (default) is a thick-restart block Lanczos with full reorthogonalization
(Wu & Simon 2000; Golub & Underwood 1977). With a block of ``b`` columns, an eigenvalue
of multiplicity up to ``b`` appears with all its copies, and each step costs one
``matmat`` of ``b`` columns: one pass over the data for a model. By default ``b = 1``,
followed by a check of the complement of the Krylov space for missed copies, which falls
back to ``b = k`` when it finds one. The projected matrix ``T = Q^T A Q`` is kept dense
and exact from the orthogonalization coefficients, so restarts need no special structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from specops import _checks
from specops.random import check_seed
from specops.results import Result

WHICH = ("LA", "SA", "LM", "BE")
METHODS = ("lanczos", "power")

#: Convergence floor: residuals are judged relative to max(|lambda|, FLOOR * ||A||).
NORM_FLOOR = 1e-3
#: Operators up to this size grow one Lanczos basis to convergence (at most n products).
SMALL = 1000
#: Residuals below ROUNDING * eps * ||A|| are at working precision and count as converged.
ROUNDING = 50.0
#: The multiplicity check converges the extreme eigenpair of the complement to at most this
#: relative residual (or the caller's tol, if smaller) before it trusts it.
CHECK_TOL = 1e-2


@dataclasses.dataclass
class EigResult(Result):
    """Eigenpairs found by :func:`eigsh`.

    Attributes:
        eigenvalues: (k,) float64, ordered by ``which`` (LA: descending, SA: ascending,
            LM: descending magnitude, BE: ascending).
        eigenvectors: (n, k) array of the operator's backend (``None`` after JSON).
        residuals: (k,) norms ``||A v - lambda v||`` for unit ``v``.
        converged: (k,) bool, residual within the tolerance.
        num_matvecs: operator-vector products used.
        settings: the arguments that produced this result (method, k, which, tol, seed, ...).
    """

    eigenvalues: np.ndarray
    eigenvectors: Any
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    settings: dict

    _NOT_SERIALIZED = ("eigenvectors",)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """All indices of ``theta``, most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")
    up = np.argsort(-theta, kind="stable")  # BE: alternate ends, high first
    out, lo, hi = [], len(theta) - 1, 0
    while hi <= lo:
        out.append(up[hi])
        hi += 1
        if hi <= lo:
            out.append(up[lo])
            lo -= 1
    return np.array(out, dtype=int)


def _wanted(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    idx = _order(theta, which)[:k]
    return idx[np.argsort(theta[idx], kind="stable")] if which == "BE" else idx


def _thresholds(theta, tol, anorm, eps):
    return np.maximum(tol * np.maximum(np.abs(theta), NORM_FLOOR * anorm), ROUNDING * eps * anorm)


def eigsh(A, k: int = 1, which: str = "LA", method: str = "lanczos", tol: float = 1e-6,
          max_matvecs: int | None = None, seed: int = 0, block_size: int | None = None,
          max_basis: int | None = None) -> EigResult:
    """Extreme eigenvalues and eigenvectors of a symmetric operator.

    Args:
        A: a :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude, ``"BE"`` both ends (one more from the high end when k is odd).
        method: ``"lanczos"`` (block Lanczos) or ``"power"`` (deflated power iteration).
        tol: a pair converges when ``||A v - lambda v|| <= tol * max(|lambda|, 1e-3 ||A||)``
            (``||A||`` estimated by the largest Ritz value) or its residual is at the
            rounding level of the dtype.
        max_matvecs: budget of products; when it runs out the best estimates are returned
            with ``converged`` False where the tolerance was not met. Default
            ``max(1000, 100 k)``.
        seed: seed of the random start block.
        block_size: Lanczos block size: eigenvalues of multiplicity up to the block size
            are resolved with all their copies. Default (None): single-vector Lanczos, then
            a check that the complement of its Krylov space holds no wanted eigenvalue (a
            further copy of a repeated one, which a single vector cannot see); if it does,
            block Lanczos with ``block_size=k`` is run instead (docs/algorithms.md). For
            ``which="LM"`` the default is the block of ``k``.
            ``settings["multiplicity_check"]`` gives its products, whether it found a copy,
            and ``complete`` (False when ``max_matvecs`` ran out during the check).
        max_basis: Lanczos basis size before a thick restart (default ``max(40, 3k + 6b)``,
            and ``n - b`` for ``n <= 1000``: small operators are never restarted, so they
            take at most ``n`` products). Operators too small for a basis of
            ``k + 2b`` vectors are solved densely from ``n`` products.

    Returns:
        :class:`EigResult`.

    Raises:
        ValueError: bad arguments (unknown ``which``/``method``, ``k > n``, ...).
        NonFiniteError: a product returned NaN or infinity.
    """
    A = _checks.symmetric_operator(A, "eigsh")
    n = A.shape[0]
    k = _checks.positive_int("k", k)
    _checks.choice("which", which, WHICH)
    _checks.choice("method", method, METHODS)
    tol = _checks.positive_float("tol", tol)
    seed = check_seed(seed)
    if k > n:
        raise ValueError(f"k={k} eigenpairs requested from an operator of size {n}; k must be <= n")
    # LM: the complement's inner end lies in the bulk near 0, slow to settle; a block is cheaper
    checked = block_size is None and k > 1 and method == "lanczos" and which != "LM"
    if block_size is None:
        b = k if which == "LM" else 1
    else:
        b = _checks.positive_int("block_size", block_size)
    max_basis = _default_basis(n, k, b) if max_basis is None else _checks.positive_int("max_basis", max_basis)
    if max_basis < k + 2 * b:
        raise ValueError(f"max_basis={max_basis} is too small: it must be >= k + 2 * block_size = {k + 2 * b}")
    max_basis = min(max_basis, n - b)
    if max_matvecs is None:
        max_matvecs = max(1000, 100 * k)
    max_matvecs = _checks.positive_int("max_matvecs", max_matvecs)
    settings = dict(k=k, which=which, method=method, tol=tol, max_matvecs=max_matvecs, seed=seed,
                    n=n, dtype=A.dtype.name, backend=A.backend)
    if method == "power":
        if which == "BE":
            raise ValueError("method='power' supports which='LA', 'SA' or 'LM'; use method='lanczos' for 'BE'")
        out = _power(A, k, which, tol, max_matvecs, seed)
    elif max_basis < k + 2 * b:
        settings["method"] = "dense"
        out = _dense(A, k, which, tol)
    else:
        settings.update(block_size=b, max_basis=max_basis)
        *out, basis = _lanczos(A, k, which, tol, max_matvecs, seed, b, max_basis)
        if checked and out[3].all():
            missed, used, complete = _complement_check(A, out[0], basis, which, tol, max_matvecs - out[4],
                                                       seed, max_basis)
            settings["multiplicity_check"] = dict(products=int(used), missed=bool(missed),
                                                  complete=bool(complete))
            out[4] += used
            basis_k = min(_default_basis(n, k, k), n - k)
            if missed and max_matvecs - out[4] < (2 * k if basis_k >= 3 * k else n):  # no budget for the copy
                out[3] = np.zeros_like(out[3])
            elif missed:  # a repeated eigenvalue: block Lanczos finds every copy up to multiplicity k
                spent = out[4]
                settings.update(block_size=k, max_basis=basis_k)
                if basis_k < 3 * k:
                    settings["method"] = "dense"
                    out = list(_dense(A, k, which, tol))
                else:
                    *out, _ = _lanczos(A, k, which, tol, max_matvecs - spent, seed, k, basis_k)
                out[4] += spent
    return EigResult(*out, settings=settings)


def _default_basis(n, k, b):
    """``max(40, 3k + 6b)``; for ``n <= SMALL`` the basis grows instead of restarting (at
    most ``n`` products, then exact)."""
    return max(40, 3 * k + 6 * b, n - b if n <= SMALL else 0)


class _Complement:
    """``s A`` on the orthogonal complement of ``span(Q)`` (``s = -1`` turns the smallest end
    into the largest), and ``low`` on ``span(Q)`` itself, below the range searched, so that
    ``span(Q)`` never looks like a wanted eigenvalue:
    ``s (I - QQ^T) A (I - QQ^T) + low QQ^T``."""

    def __init__(self, A, Q, sign, low):
        self.A, self.Q, self.sign, self.low, self.ops, self.shape = A, Q, sign, low, A.ops, A.shape

    def matmat(self, V):
        P, _ = self.ops.orthogonalize(V, self.Q)
        return self.ops.orthogonalize(self.A.matmat(P), self.Q)[0] * self.sign + (V - P) * self.low


def _complement_check(A, vals, basis, which, tol, budget, seed, max_basis):
    """Whether a wanted eigenvalue hides in the complement of single-vector Lanczos' basis.

    An eigenvector of a repeated eigenvalue that is orthogonal to the start vector's
    component in that eigenspace is orthogonal to the whole Krylov space, hence an
    eigenvector of ``A`` restricted to the complement of the basis. Lanczos on that
    restriction (per wanted end) runs until its extreme Ritz value ``mu`` either reaches the
    wanted range (missed: Ritz values are inner bounds) or it converges (to ``tol``, at most
    ``CHECK_TOL``) below that range, within its residual (nothing missed there).

    Returns:
        ``(missed, products, complete)``; ``complete`` is False when the budget ran out first.
    """
    vals = np.asarray(vals, dtype=np.float64)
    hi, lo = (len(vals) + 1) // 2, len(vals) // 2
    if which == "BE":
        ends = [(1.0, np.sort(vals)[::-1][:hi].min())] + ([(-1.0, -np.sort(vals)[:lo].max())] if lo else [])
    else:
        sign = 1.0 if which == "LA" else -1.0
        ends = [(sign, np.min(sign * vals))]
    scale = float(np.abs(vals).max())
    missed, used, complete = False, 0, True
    for sign, edge in ends:
        if budget - used < 1:
            complete = False
            break
        edge = float(edge)

        def stop(theta, resid, edge=edge):
            return theta[0] >= edge

        check_tol = max(tol, CHECK_TOL)
        low = edge - max(abs(edge), NORM_FLOOR * scale)
        mu, _, r, ok, count, _ = _lanczos(_Complement(A, basis, sign, low), 1, "LA", check_tol, budget - used,
                                          seed, 1, max_basis, stream="complement-check", stop=stop)
        used += count
        near = mu[0] + max(r[0], check_tol * max(abs(edge), NORM_FLOOR * scale)) >= edge
        if mu[0] >= edge or (ok[0] and near):  # reached the wanted range, or settled at its edge
            missed = True
        elif not ok[0]:
            complete = False
    return missed, used, complete


def _dense(A, k, which, tol):
    """Small operators: the dense matrix from n products, then ``eigh``."""
    mul = _checks.Products(A)
    ops, n = A.ops, A.shape[0]
    M = ops.to_numpy(mul(ops.identity_columns(n, 0, n)))
    M = (M + M.T) / 2
    theta, S = np.linalg.eigh(M)
    want = _wanted(theta, which, k)
    vecs = S[:, want]
    resid = np.linalg.norm(M @ vecs - vecs * theta[want], axis=0)
    anorm = float(np.abs(theta).max())
    ok = resid <= _thresholds(theta[want], tol, anorm, np.finfo(ops.dtype).eps)
    return theta[want], ops.from_numpy(vecs), resid, ok, mul.count


def _lanczos(A, k, which, tol, max_matvecs, seed, b, max_basis, stream="lanczos", stop=None):
    """Thick-restart block Lanczos; ``stop(theta, resid)`` of the wanted pairs may end it early.

    Returns ``(values, vectors, residuals, converged, products, basis)``.
    """
    ops, n = A.ops, A.shape[0]
    mul = _checks.Products(A)
    eps = float(np.finfo(ops.dtype).eps)
    drawn = 0

    def draw(m):
        nonlocal drawn
        X = ops.random(n, range(drawn, drawn + m), seed, kind="normal", stream=stream)
        drawn += m
        return X

    pending, _ = ops.qr(draw(b))
    buffer = ops.zeros((n, max_basis))  # the basis lives in columns 0..m-1
    T = np.zeros((0, 0))
    anorm = 0.0
    keep = min(max_basis - 2 * b, max(k, (max_basis - b) // 2))
    while True:
        W = mul(pending)
        m = T.shape[0]
        buffer = ops.write_block(buffer, m, pending)
        basis = buffer if ops.FIXED_SHAPES else buffer[:, : m + b]  # zero columns change nothing
        W, C = ops.orthogonalize(W, basis)
        C = C[: m + b]
        grown = np.zeros((m + b, m + b))
        grown[:m, :m] = T
        grown[:m, m:] = C[:m]
        grown[m:, :m] = C[:m].T
        grown[m:, m:] = (C[m:] + C[m:].T) / 2
        T = grown
        Qn, R = ops.orthonormalize(W)
        theta, S = np.linalg.eigh(T)
        anorm = max(anorm, float(np.abs(theta).max()))
        resid = np.linalg.norm(R @ S[-b:, :], axis=0)
        want = _wanted(theta, which, k)
        ok = resid[want] <= _thresholds(theta[want], tol, anorm, eps)
        if ok.all() or mul.count + b > max_matvecs or (stop is not None and stop(theta[want], resid[want])):
            break
        Qn, R = _repair_breakdown(ops, Qn, R, basis, draw, anorm, eps)
        if T.shape[0] + b > max_basis:  # thick restart with the most wanted Ritz vectors
            kept = _order(theta, which)[:keep]
            buffer = ops.write_block(buffer, 0, ops.combine(basis, _rows(S[:, kept], basis.shape[1])))
            T = np.diag(theta[kept])
        pending = Qn
    vectors = ops.combine(basis, _rows(S[:, want], basis.shape[1]))
    return theta[want], vectors, resid[want], ok, mul.count, basis


def _rows(S, rows):
    """``S`` padded with zero rows to ``rows`` (for a zero-padded basis buffer)."""
    return S if S.shape[0] == rows else np.vstack([S, np.zeros((rows - S.shape[0], S.shape[1]))])


def _repair_breakdown(ops, Qn, R, basis, draw, anorm, eps):
    """Replace directions of the new block that carry no information (an invariant
    subspace was found) by fresh random directions orthogonal to everything so far."""
    U, sigma, Vt = np.linalg.svd(R)
    dead = sigma <= np.sqrt(eps) * max(anorm, np.finfo(np.float64).tiny)
    if not dead.any():
        return Qn, R
    Qn = ops.combine(Qn, U)
    R = sigma[:, None] * Vt
    R[dead] = 0.0
    alive = [Qn[:, j : j + 1] for j in np.flatnonzero(~dead)]
    fresh = draw(int(dead.sum()))
    fresh, _ = ops.orthogonalize(fresh, ops.concat([basis, *alive], axis=1))
    fresh, _ = ops.qr(fresh)
    cols, f = [], 0
    for j in range(len(sigma)):
        if dead[j]:
            cols.append(fresh[:, f : f + 1])
            f += 1
        else:
            cols.append(Qn[:, j : j + 1])
    return ops.concat(cols, axis=1), R


def _power(A, k, which, tol, max_matvecs, seed):
    """Deflated power iteration; LA/SA by shifting the spectrum to make them dominant."""
    ops, n = A.ops, A.shape[0]
    mul = _checks.Products(A)
    sign = -1.0 if which == "SA" else 1.0
    shift = 0.0
    if which != "LM":
        # the dominant eigenvalue bounds the spectrum; shifting by it makes LA (SA) dominant
        mu = _deflated_power(ops, n, lambda V: mul(V) * sign, 1, 1e-2, max_matvecs // 2, seed, "power-bound",
                             lambda: mul.count)[0]
        shift = 1.1 * abs(float(mu[0]))

    def apply(V):
        return mul(V) * sign + V * shift

    vals, vecs, resid, ok = _deflated_power(ops, n, apply, k, tol, max_matvecs, seed, "power",
                                            lambda: mul.count, shift=shift)
    return sign * (vals - shift), vecs, resid, ok, mul.count


def _deflated_power(ops, n, apply, k, tol, budget, seed, stream, used, shift=0.0):
    eps = float(np.finfo(ops.dtype).eps)
    found, vals, resid, ok = None, [], [], []
    anorm = 0.0
    for i in range(k):
        v = ops.random(n, [i], seed, kind="normal", stream=stream)
        if found is not None:
            v, _ = ops.orthogonalize(v, found)
        v = v / ops.norm(v)
        theta, r, conv = 0.0, np.inf, False
        while used() + 1 <= budget:
            w = apply(v)
            if found is not None:
                w, _ = ops.orthogonalize(w, found)
            theta = ops.dot(v, w)
            r = ops.norm(w - v * theta)
            anorm = max(anorm, abs(theta - shift))
            if r <= _thresholds(np.array([theta - shift]), tol, anorm, eps)[0]:
                conv = True
                break
            v = w / max(ops.norm(w), np.finfo(np.float64).tiny)
        found = v if found is None else ops.concat([found, v], axis=1)
        vals.append(theta)
        resid.append(r)
        ok.append(conv)
    return np.array(vals), found, np.array(resid), np.array(ok)
