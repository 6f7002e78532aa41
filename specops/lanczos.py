"""The Lanczos process, written once, for :func:`~specops.eigsh` and :func:`~specops.spectral_density`.

:func:`~specops.eigsh` runs it as thick-restart block Lanczos, and
:func:`~specops.spectral_density` as many independent probes side by side.

Both keep their bases orthogonal by full reorthogonalization (the recurrence's last
vectors first, then classical Gram-Schmidt over the whole basis, that pass repeated only
under the DGKS criterion: :meth:`~specops.ops.VectorOps.orthogonalize`) and share one
breakdown rule: a new direction is dropped only when its norm is at
the rounding level of the products (``ROUNDING * eps * ||A||``), so no coupling larger than
rounding is ever discarded. Backend tricks (fixed shapes for XLA, buffers written in place)
live behind the vector operations (:meth:`~specops.ops.VectorOps.orthogonalize` with
``columns``, :meth:`~specops.ops.VectorOps.combine_prefix`,
:meth:`~specops.ops.VectorOps.orthogonalize_probes`).

Honesty: the eigenpairs :func:`thick_restart` returns are verified by one product of the
returned vectors (Rayleigh-Ritz on their span, residuals ``||A v - theta v||`` from that
product); when the verification contradicts Lanczos' own estimate (a lost coupling), the
process restarts from those vectors and their true residual block. Within a budget too
small to verify, the budget goes to the Krylov space and the pairs come back with the
recurrence's residuals, marked estimated and never converged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from specops._checks import Products
from specops.operator import LinearOperator
from specops.ops import Array, VectorOps

from specops.progress import show

#: The label of the product that verifies returned pairs (:class:`specops._checks.Products`):
#: the one product whose per-batch forms ``eigsh(..., data_error=True)`` uses.
VERIFY = "verify"
#: Convergence floor: residuals are judged relative to max(|lambda|, FLOOR * ||A||).
NORM_FLOOR = 1e-3
#: Residuals below ROUNDING * eps * ||A|| are at working precision and count as converged;
#: a new Lanczos direction of norm below it is a breakdown (an invariant subspace).
ROUNDING = 50.0


def order(theta: np.ndarray, which: str) -> np.ndarray:
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


def wanted(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices of the ``k`` most wanted values, in the order results report them."""
    idx = order(theta, which)[:k]
    return idx[np.argsort(theta[idx], kind="stable")] if which == "BE" else idx


def thresholds(theta: np.ndarray, tol: float, anorm: float, eps: float) -> np.ndarray:
    """Residual bound per Ritz value for convergence."""
    return np.maximum(tol * np.maximum(np.abs(theta), NORM_FLOOR * anorm), ROUNDING * eps * anorm)


def breakdown(norms: npt.ArrayLike, anorm: float, eps: float) -> np.ndarray:
    """Which new directions (by norm) are at the rounding level: an invariant subspace."""
    return np.asarray(norms) <= ROUNDING * eps * max(anorm, np.finfo(np.float64).tiny)


def basis_store(ops: VectorOps, memory: str | VectorOps) -> VectorOps:
    """The vector operations that keep a Lanczos basis: ``"device"`` (``ops``), ``"host"`` or given.

    Raises:
        ValueError: ``memory`` is neither, or vector operations of another dtype.
    """
    if isinstance(memory, VectorOps):
        if memory.dtype != ops.dtype:
            raise ValueError(f"basis_memory keeps {memory.dtype.name} vectors but the operator's are "
                             f"{ops.dtype.name}; pass vector operations of the operator's dtype")
        return memory
    if memory == "device":
        return ops
    if memory == "host":
        return ops.host()
    raise ValueError(f"unknown basis_memory {memory!r}; choose 'device', 'host' or a specops VectorOps")


class Basis:
    """A Lanczos basis buffer kept by the vector operations ``store``; blocks come and go as arrays of ``ops``.

    ``store`` is ``ops`` itself by default (the basis lives with the operator's vectors),
    or other vector operations, e.g. ``ops.host()``: then the basis stays in host memory,
    its orthogonalizations and rotations run there, and only the blocks written, the
    blocks orthogonalized and the combinations asked for cross to ``ops``' device.

    Attributes:
        X: the buffer, an array of ``store``: (n, size) columns, or a (slots, n, p)
            stack of one basis per probe.
        columns: how far it is filled (set by its user).
    """

    def __init__(self, ops: VectorOps, store: VectorOps | None, shape: tuple[int, ...]) -> None:
        self.ops, self.store = ops, ops if store is None else store
        self.X = self.store.buffer(shape)
        self.columns = 0

    def write(self, start: int, V: Array, axis: int = 1) -> None:
        """Write the block ``V`` (of ``ops``) at ``start`` along ``axis``."""
        self.X = self.store.write_block(self.X, start, self.store.move(V, self.ops), axis=axis)

    def orthogonalize(self, W: Array, columns: int | None = None, recent: int = 0) -> tuple[Array, np.ndarray]:
        """:meth:`~specops.ops.VectorOps.orthogonalize` of ``W`` against the first ``columns`` columns."""
        columns = self.columns if columns is None else columns
        W, C = self.store.orthogonalize(self.store.move(W, self.ops), self.X, columns, recent)
        return self.ops.move(W, self.store), C

    def orthogonalize_probes(self, W: Array, steps: int, recent: tuple[int, ...] = ()) -> tuple[Array, np.ndarray]:
        """:meth:`~specops.ops.VectorOps.orthogonalize_probes` of ``W`` against the first ``steps`` slices."""
        W, C = self.store.orthogonalize_probes(self.store.move(W, self.ops), self.X, steps, recent)
        return self.ops.move(W, self.store), C

    def combine(self, C: np.ndarray) -> Array:
        """``X[:, :c] @ C`` (``c = C.shape[0]``) as an array of ``ops``."""
        return self.ops.move(self.store.combine_prefix(self.X, C), self.store)

    def rotate(self, C: np.ndarray) -> None:
        """Replace the first ``C.shape[1]`` columns by ``X[:, :C.shape[0]] @ C`` (a thick restart)."""
        self.X = self.store.rotate_prefix(self.X, C)
        self.columns = C.shape[1]


class RitzPairs(NamedTuple):
    """What :func:`thick_restart` returns: the wanted Ritz pairs and how far to trust them.

    Attributes:
        values: (k,) Ritz values, most wanted first (as :func:`wanted` orders them).
        vectors: (n, k) unit Ritz vectors, an array of the operator's backend.
        residuals: (k,) ``||A v - theta v||``: computed from a product of the vectors when
            ``estimated`` is False, else Lanczos' estimate from the recurrence.
        converged: (k,) bool; never True for an estimated pair.
        estimated: whether ``residuals`` are the recurrence's estimates (no product was left
            to verify them).
        others: the other Ritz values of the final projected matrix (the gaps of
            :func:`eigenvalue_errors`).
        basis: the final Lanczos basis (a :class:`Basis` filled to ``basis.columns``).
    """

    values: np.ndarray
    vectors: Array
    residuals: np.ndarray
    converged: np.ndarray
    estimated: bool
    others: np.ndarray
    basis: Basis


def eigenvalue_errors(values: np.ndarray, residuals: np.ndarray, others: np.ndarray,
                      floor: float = 0.0) -> np.ndarray:
    """Estimated eigenvalue errors ``min(||r||, ||r||^2 / gap)`` of unit Ritz pairs.

    For a symmetric operator some eigenvalue lies within ``||r||`` of a Ritz value (the
    rigorous bound), and within ``||r||^2 / delta`` when ``delta`` is the distance from the
    Ritz value to the rest of the spectrum (Kato-Temple). ``delta`` is estimated by the gap to
    the nearest other Ritz value (among ``values`` and ``others``) outside its cluster: Ritz
    values within ``||r_i|| + ||r_j||`` of each other may approximate one (repeated)
    eigenvalue, and are not counted as its neighbours. An estimate, not a bound: an
    unconverged neighbour may lie closer than its Ritz value.

    Args:
        values: (k,) Ritz values.
        residuals: (k,) their residual norms.
        others: further Ritz values of the same projected matrix (may be empty).
        floor: the result's least value (the rounding of the products).

    Returns:
        (k,) estimates, at most ``residuals`` and at least ``floor``.
    """
    values, residuals = np.asarray(values, dtype=np.float64), np.asarray(residuals, dtype=np.float64)
    pool = np.concatenate([values, np.asarray(others, dtype=np.float64)])
    radius = np.concatenate([residuals, np.zeros(pool.size - values.size)])
    d = np.abs(values[:, None] - pool[None, :])
    d[d <= residuals[:, None] + radius[None, :]] = np.inf  # itself, and its cluster
    gap = d.min(axis=1) if pool.size else np.full(values.size, np.inf)
    finite = np.isfinite(gap)
    sharp = np.where(finite, residuals ** 2 / np.where(finite, gap, 1.0), residuals)
    return np.maximum(np.minimum(residuals, sharp), floor)


def thick_restart(A: LinearOperator, mul: Products, k: int, which: str, tol: float, budget: int, start: Array,
                  max_basis: int, draw: Callable[[int], Array],
                  stop: Callable[[np.ndarray, np.ndarray], bool] | None = None,
                  verify: bool = True, store: VectorOps | None = None,
                  stop_on: str = "residual", reserve: bool = False) -> RitzPairs:
    """Thick-restart block Lanczos (Wu & Simon 2000) from the block ``start``.

    Args:
        A: the operator.
        mul: its counted product (:class:`specops._checks.Products`).
        k: the number of wanted pairs.
        which: which end of the spectrum (as for :func:`~specops.eigsh`).
        tol: the convergence tolerance (as for :func:`~specops.eigsh`).
        budget: products allowed in all (``mul.count`` included), the verification too.
        start: native (n, b) start block; ``b`` is the block size.
        max_basis: basis size before a thick restart.
        draw: ``draw(m)`` gives ``m`` fresh random columns (to replace dead directions).
        stop: ``stop(theta, resid)`` of the wanted pairs may end the run early (unverified).
        verify: check the returned pairs with one product of the vectors (``k`` products).
        store: the vector operations that keep the basis (default ``A.ops``; see :class:`Basis`).
        stop_on: ``"residual"``: a pair converges when its residual meets ``tol``;
            ``"eigenvalue"``: when its estimated eigenvalue error (:func:`eigenvalue_errors`) does.
        reserve: keep ``k`` products for the verification whatever happens (the caller needs
            the product of the returned vectors).

    Each step orthogonalizes the new block against the last two blocks first (the
    recurrence), then against the whole basis, that pass repeated only when it removed
    more than rounding (:meth:`~specops.ops.VectorOps.orthogonalize`); after a restart
    the kept Ritz vectors count as recent (the new block is coupled to all of them).

    The budget goes to the Krylov space first: the ``k`` products of the verification are
    spent only once Lanczos' estimates have converged with that many products left; when
    the budget ends before, the pairs come back with the recurrence's residuals, marked
    ``estimated`` and not converged.

    Returns:
        :class:`RitzPairs`.
    """
    ops, n = A.ops, A.shape[0]
    eps = float(np.finfo(ops.dtype).eps)
    pending, _ = ops.orthonormalize(start)
    basis = Basis(ops, store, (n, max_basis))  # the basis lives in columns 0..m-1
    T = np.zeros((0, 0))
    anorm = 0.0
    restarted = True  # the next block is coupled to every column so far

    def accurate(values, resid, others):
        errors = resid if stop_on == "residual" else eigenvalue_errors(values, resid, others)
        return A.decide(errors <= thresholds(values, tol, anorm, eps))

    while True:
        b = pending.shape[1]
        W = mul(pending)
        m = T.shape[0]
        basis.write(m, pending)
        basis.columns = m + b
        W, C = basis.orthogonalize(W, recent=m + b if restarted else 2 * b)
        restarted = False
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
        want = wanted(theta, which, k)
        others = np.delete(theta, want)

        def pairs(values, vectors, residuals, converged, *, estimated, others=others):
            return RitzPairs(values=values, vectors=vectors, residuals=residuals, converged=converged,
                             estimated=estimated, others=others, basis=basis)

        show(A, ritz=theta[want], residual=float(resid[want].max()))
        ok = accurate(theta[want], resid[want], others)
        spent = mul.count + b + (k if reserve else 0) > budget
        if stop is not None and A.decide(bool(stop(theta[want], resid[want]))):
            return pairs(theta[want], basis.combine(S[:, want]), resid[want], ok, estimated=True)
        if (ok.all() and (not verify or mul.count + k <= budget)) or spent:
            V = basis.combine(S[:, want])
            if not verify:
                return pairs(theta[want], V, resid[want], ok, estimated=True)
            if (not ok.all() and not reserve) or mul.count + k > budget:  # no product left to verify
                return pairs(theta[want], V, resid[want], np.zeros_like(ok), estimated=True)
            vals, V, AV, true = _rayleigh_ritz(ops, mul, V, which)
            anorm = max(anorm, float(np.abs(vals).max()))
            good = accurate(vals, true, others)
            if good.all() or mul.count + 2 * k > budget or max_basis < 3 * k:
                return pairs(vals, V, true, good, estimated=False)
            # Lanczos' residual estimate missed a coupling: restart from the verified
            # vectors, with their true residual block as the next block
            basis.write(0, V)
            basis.columns = k
            T = np.diag(vals)
            Qn, R = ops.orthonormalize(basis.orthogonalize(AV - ops.scale_columns(V, vals))[0])
            Qn, R = _repair(A, Qn, R, basis, draw, anorm, eps)
            pending, restarted = Qn, True
            continue
        Qn, R = _repair(A, Qn, R, basis, draw, anorm, eps)
        if T.shape[0] + b > max_basis:  # thick restart with the most wanted Ritz vectors
            keep = min(max_basis - 2 * b, max(k, (max_basis - b) // 2))
            kept = order(theta, which)[:keep]
            basis.rotate(S[:, kept])
            T = np.diag(theta[kept])
            restarted = True
        pending = Qn


class Verified(NamedTuple):
    """Pairs judged from a product of their vectors (:func:`verified`).

    Attributes:
        values: (k,) Rayleigh-Ritz values in the order of ``which``.
        vectors: (n, k) unit vectors, an array of the operator's backend.
        residuals: (k,) true ``||A v - theta v||``, computed from the product.
    """

    values: np.ndarray
    vectors: Array
    residuals: np.ndarray


class Tridiagonals(NamedTuple):
    """The Lanczos recurrences of :func:`probe_lanczos`, one row per probe.

    Attributes:
        alpha: (p, steps) diagonals.
        beta: (p, steps) off-diagonals (``beta[:, j]`` couples steps ``j`` and ``j + 1``).
        length: (p,) steps each probe ran before a breakdown (or ``steps``).
    """

    alpha: np.ndarray
    beta: np.ndarray
    length: np.ndarray


def _rayleigh_ritz(ops, mul, V, which):
    """Rayleigh-Ritz on ``span(V)`` from one product.

    Returns values, vectors, their product and true residual norms, in the order of ``which``.
    """
    V, _ = ops.qr(V)
    AV = mul(V, VERIFY)
    G = ops.to_numpy(ops.inner(V, AV))
    vals, U = np.linalg.eigh((G + G.T) / 2)
    idx = wanted(vals, which, len(vals))
    vals, U = vals[idx], U[:, idx]
    V, AV = ops.combine(V, U), ops.combine(AV, U)
    return vals, V, AV, ops.column_norms(AV - ops.scale_columns(V, vals))


def verified(ops: VectorOps, mul: Products, V: Array, which: str) -> Verified:
    """Values, vectors and true residuals of the pairs in ``span(V)`` (one product each)."""
    vals, V, _, true = _rayleigh_ritz(ops, mul, V, which)
    return Verified(values=vals, vectors=V, residuals=true)


def _repair(A, Qn, R, basis, draw, anorm, eps):
    """Replace directions of the new block that carry no information by fresh random ones.

    Such directions mean an invariant subspace was found; the fresh ones are orthogonal to
    everything so far.
    """
    ops = A.ops
    U, sigma, Vt = np.linalg.svd(R)
    dead = A.decide(breakdown(sigma, anorm, eps))
    if not dead.any():
        return Qn, R
    Qn = ops.combine(Qn, U)
    R = sigma[:, None] * Vt
    R[dead] = 0.0
    alive = [Qn[:, j : j + 1] for j in np.flatnonzero(~dead)]
    fresh = draw(int(dead.sum()))
    fresh, _ = basis.orthogonalize(fresh)
    if alive:
        fresh, _ = ops.orthogonalize(fresh, ops.concat(alive, axis=1))
    fresh, _ = ops.qr(fresh)
    cols, f = [], 0
    for j in range(len(sigma)):
        if dead[j]:
            cols.append(fresh[:, f : f + 1])
            f += 1
        else:
            cols.append(Qn[:, j : j + 1])
    return ops.concat(cols, axis=1), R


def probe_lanczos(A: LinearOperator, mul: Products, V: Array, steps: int, window: int | None = None,
                  store: VectorOps | None = None,
                  stop: Callable[[np.ndarray, np.ndarray], bool] | None = None,
                  keep: list[Basis] | None = None) -> Tridiagonals:
    """``steps`` Lanczos steps for every column of the unit block ``V`` independently.

    One ``matmat`` of all probes per step. Each step removes the three-term recurrence's
    terms (``v_j`` and ``v_{j-1}``), then reorthogonalizes each probe against its whole
    basis (a pass that removes only rounding, repeated only when it removed more:
    :meth:`~specops.ops.VectorOps.orthogonalize_probes`), or, with ``window``, against its
    last ``window`` vectors only (a ring buffer of ``window x n x p`` instead of
    ``steps x n x p``).

    Args:
        A: the operator.
        mul: its counted product.
        V: native (n, p) block of unit probes.
        steps: Lanczos steps per probe.
        window: vectors kept per probe for reorthogonalization (``>= 2``); ``None``
            keeps all ``steps`` (full reorthogonalization).
        store: the vector operations that keep the bases (default ``A.ops``; see :class:`Basis`).
        stop: ``stop(alpha, beta)`` of the steps so far (``beta``'s last column: the couplings
            to the next vectors) may end the run early (``funm``'s stopping rule); the arrays
            returned are then that many steps long.
        keep: a list the bases are appended to (a :class:`Basis` of ``(slots, n, p)``), for
            callers that combine the Lanczos vectors (``funm``).

    Returns:
        :class:`Tridiagonals` ``(alpha, beta, length)``: per probe the tridiagonal's diagonal (p, steps),
        off-diagonal (p, steps) and the number of steps before its Krylov space was
        exhausted (then its quadrature is exact).
    """
    ops = A.ops
    n, p = V.shape
    slots = steps if window is None else min(window, steps)
    basis = Basis(ops, store, (slots, n, p))  # slice j % slots: step j of every probe
    basis.write(0, V[None], axis=0)
    if keep is not None:
        keep.append(basis)
    alpha, beta = np.zeros((p, steps)), np.zeros((p, steps))
    length = np.full(p, steps)
    live = np.ones(p, dtype=bool)
    anorm = 0.0
    eps = float(np.finfo(ops.dtype).eps)
    for j in range(steps):
        recent = (j % slots, (j - 1) % slots) if j else (0,)  # v_j and v_{j-1}: the recurrence
        W, c = basis.orthogonalize_probes(mul(V), min(j + 1, slots), recent)
        alpha[live, j] = c[j % slots, live]
        if j == steps - 1:
            break
        b = ops.column_norms(W)
        anorm = max(anorm, float(np.abs(alpha[:, j]).max()), float(b.max()))
        ended = live & A.decide(breakdown(b, anorm, eps))
        length[ended] = j + 1
        live &= ~ended
        if not live.any():
            break
        beta[live, j] = b[live]
        if stop is not None and A.decide(bool(stop(alpha[:, : j + 1], beta[:, : j + 1]))):
            return Tridiagonals(alpha=alpha[:, : j + 1], beta=beta[:, : j + 1], length=np.minimum(length, j + 1))
        V = ops.scale_columns(W, np.where(live, 1.0 / np.where(live, b, 1.0), 0.0))
        basis.write((j + 1) % slots, V[None], axis=0)
    return Tridiagonals(alpha=alpha, beta=beta, length=length)
