"""Solves ``(A + sigma I) x = b``: conjugate gradients and MINRES, with preconditioners.

- CG (Hestenes & Stiefel 1952) for positive definite operators (a GGN or Fisher plus
  damping); preconditioned CG with a symmetric positive definite ``M``.
- MINRES (Paige & Saunders 1975) for indefinite ones (the Hessian); preconditioned as in
  SciPy's ``minres`` (the ``M^-1``-norm of the residual is minimized).
- ``"auto"``: MINRES when the operator says it is indefinite
  (``positive_semidefinite = False``), else CG, which switches to MINRES from its last
  iterate as soon as it meets a direction of non-positive curvature ``p^T (A + sigma I) p <= 0``
  (or curvature at the rounding level of the largest met: a singular operator).

A block ``b`` (n, k) is solved column by column, side by side: every step is one
``matmat`` of the k columns (one pass over the data for a model), each column with its own
scalars. Columns that have converged ride along unchanged until all have (their products
are counted). Convergence is ``||b - (A + sigma I) x|| <= tol ||b||`` per column, judged
by the recurrence and then verified by one product of the returned ``x``: the reported
residual is that product's. When the verification contradicts the recurrence (rounding in
float32), the method restarts from the true residual while the budget lasts.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Literal, get_args

import numpy as np
import scipy.linalg

from specops import _checks
from specops.operator import LinearOperator, OperatorLike
from specops.ops import Array, VectorOps
from specops.progress import show
from specops.results import Result

#: The Krylov solvers (``"auto"``: CG for a positive definite operator, else MINRES).
SolveMethod = Literal["auto", "cg", "minres"]
METHODS: tuple[SolveMethod, ...] = get_args(SolveMethod)
#: Restarts from the true residual after the recurrence claimed convergence.
MAX_RESTARTS = 3
#: Products per column allowed by default: ``min(10 n, DEFAULT_STEPS)`` (SciPy's is ``10 n``).
DEFAULT_STEPS = 1000
#: MINRES checks for a singular shifted operator every this many steps in which some column's
#: residual fell by less than ``STALL`` (relative).
CHECK_EVERY, STALL = 10, 0.01
#: CG counts curvature ``p^T A p / p^T p <= FLAT * eps * (the largest met)`` as non-positive.
FLAT = 10.0
#: A Ritz pair with ``|theta| + residual <= SINGULAR * eps * ||T||`` makes the operator singular.
SINGULAR = 1000.0


class IndefiniteError(ValueError):
    """CG met a direction of non-positive curvature: the operator is not positive definite."""


@dataclasses.dataclass
class SolveResult(Result):
    """The solution of ``(A + shift I) x = b``.

    Attributes:
        x: the solution, an array of the operator's backend, of ``b``'s shape (``None`` after JSON).
        residual_norm: ``||b - (A + shift I) x||`` computed from one product of the returned
            ``x`` (a float for a vector ``b``, one per column for a block).
        b_norm: ``||b||`` (likewise).
        converged: ``residual_norm <= tol * b_norm`` (a bool, or one per column).
        num_matvecs: operator-vector products used (the verification included).
        settings: method asked for and ``method_used`` (``"cg"``, ``"minres"`` or
            ``"cg, then minres"``), ``tol``, ``shift``, ``max_matvecs``, ``preconditioner``,
            ``iterations``, ``restarts``, ``negative_curvature`` (the smallest Rayleigh quotient
            ``p^T (A + shift I) p / p^T p`` CG met, when non-positive or at the rounding level), and ``singular``
            (True when MINRES found ``A + shift I`` singular to working precision and ``b`` outside
            its range), ``condition_estimate`` (a lower bound from the Krylov space).
    """

    x: Any
    residual_norm: Any
    b_norm: Any
    converged: Any
    num_matvecs: int
    settings: dict

    _NOT_SERIALIZED = ("x",)

    @property
    def relative_residual(self) -> Any:
        """``residual_norm / b_norm`` (0 for ``b = 0``)."""
        r, b = np.asarray(self.residual_norm, dtype=float), np.asarray(self.b_norm, dtype=float)
        out = np.where(b > 0, r / np.where(b > 0, b, 1.0), 0.0)
        return float(out) if out.ndim == 0 else out


class Preconditioner:
    """``M = diag(d) + U diag(s) U^T``, an approximation of ``A``; :func:`solve` adds its ``shift``.

    The diagonal ``d`` is a scalar or a host (n,) array (for example ``so.diagonal(A).estimate``);
    ``U`` (n, r) native columns and ``s`` (r,) host values make the low-rank part (for example
    the top eigenpairs from :func:`~specops.eigsh`: :meth:`from_eigenpairs`). ``M^-1`` is applied
    by the Woodbury identity: one ``(n, r)`` inner product and one combination per step.

    Args:
        diagonal: ``d``, a number or an (n,) array (host, or of the operator's backend).
        vectors: ``U``, native (n, r) (or None).
        values: ``s``, host (r,) (with ``vectors``).

    Examples:
        Deflating the top eigenpairs of a positive definite operator cuts CG's steps:

        >>> import numpy as np
        >>> import specops as so
        >>> lam = np.concatenate([np.linspace(1, 2, 195), [1e2, 3e2, 1e3, 3e3, 1e4]])
        >>> Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((200, 200)))
        >>> A, b = (Q * lam) @ Q.T, np.ones(200)
        >>> top = so.eigsh(A, k=5)
        >>> plain = so.solve(A, b, tol=1e-8)
        >>> deflated = so.solve(A, b, tol=1e-8, preconditioner=so.Preconditioner.from_eigenpairs(top, level=1.0))
        >>> plain.settings["iterations"] > deflated.settings["iterations"], bool(deflated.converged)
        (True, True)
    """

    def __init__(self, diagonal: Any = 0.0, vectors: Any = None, values: Any = None) -> None:
        self.diagonal = diagonal
        if (vectors is None) != (values is None):
            raise ValueError("pass both vectors (U) and values (s) of the low-rank part, or neither")
        self.vectors = vectors
        self.values = None if values is None else np.asarray(values, dtype=np.float64).reshape(-1)

    @classmethod
    def from_eigenpairs(cls, eig: Any, level: float = 0.0) -> Preconditioner:
        """Deflation of computed eigenpairs: ``M = level I + U diag(lambda - level) U^T``.

        ``M^-1 (A + shift I)`` maps the eigenvectors ``U`` to 1 and leaves the rest of
        the spectrum scaled by ``1 / (level + shift)``.

        Args:
            eig: an :class:`~specops.EigResult` with eigenvectors (or a pair ``(values, vectors)``).
            level: the value ``M`` takes off ``span(U)`` (before the shift), e.g. an estimate
                of the bulk of ``A``'s spectrum; ``0`` (the default) needs a positive shift.
        """
        values, vectors = (eig.eigenvalues, eig.eigenvectors) if hasattr(eig, "eigenvalues") else eig
        if vectors is None:
            raise ValueError("these eigenpairs have no eigenvectors (a result read back from JSON?); "
                             "deflation needs them")
        return cls(float(level), vectors, np.asarray(values, dtype=np.float64) - float(level))

    def describe(self) -> str:
        """A short description for a result's settings."""
        d = "scalar" if np.ndim(self.diagonal) == 0 else "diagonal"
        return d + ("" if self.vectors is None else f" + rank {len(self.values)}")  # type: ignore[arg-type]

    def bind(self, ops: VectorOps, n: int, shift: float) -> Callable[[Array], Array]:
        """``R -> M^-1 R`` for ``M`` plus ``shift I``, on native (n, k) blocks.

        Raises:
            ValueError: shapes that do not match ``n``, or ``M + shift I`` not positive definite.
        """
        diagonal = ops.to_numpy(self.diagonal) if ops.is_native(self.diagonal) else self.diagonal
        d = np.asarray(diagonal, dtype=np.float64) + shift
        if d.ndim not in (0, 1) or (d.ndim == 1 and d.shape != (n,)):
            raise ValueError(f"the preconditioner's diagonal must be a number or of shape ({n},), got {d.shape}")
        if not np.all(np.isfinite(d)) or d.min() <= 0:
            raise ValueError(f"the preconditioner's diagonal plus the shift must be positive (its smallest entry "
                             f"is {float(d.min()):.3g}); clip a diagonal estimate, e.g. np.maximum(d, floor), "
                             "or pass a positive level or shift")
        scale = 1.0 / float(d) if d.ndim == 0 else ops.from_numpy((1.0 / d)[:, None])
        if self.vectors is None:
            return lambda R: R * scale
        U = ops.asarray(self.vectors)
        s = self.values
        if len(U.shape) != 2 or U.shape[0] != n or U.shape[1] != len(s):  # type: ignore[arg-type]
            raise ValueError(f"the preconditioner's vectors must be ({n}, {len(s)}), got {tuple(U.shape)}")  # type: ignore[arg-type]
        DU = U * scale
        G = ops.to_numpy(ops.inner(U, DU))
        G = (G + G.T) / 2
        w, E = np.linalg.eigh(G)
        root = (E * np.sqrt(np.maximum(w, 0))) @ E.T
        low = float(np.linalg.eigvalsh(np.eye(len(s)) + root @ np.diag(s) @ root).min())  # type: ignore[arg-type]
        if low <= 0:
            raise ValueError("the preconditioner M = diag(d) + U diag(s) U^T plus the shift is not positive definite "
                             f"(its scaled smallest eigenvalue is {low:.3g}); raise the level or the shift")
        K = np.eye(len(s)) + np.diag(s) @ G  # type: ignore[arg-type]
        C = np.linalg.solve(K, np.diag(s))  # type: ignore[arg-type]

        def apply(R: Array) -> Array:
            return R * scale - ops.combine(DU, C @ ops.to_numpy(ops.inner(DU, R)))

        return apply


def as_preconditioner(p: Any) -> Preconditioner | None:
    """``p`` as a :class:`Preconditioner`: one, a diagonal estimate, eigenpairs, a number or an array."""
    if p is None or isinstance(p, Preconditioner):
        return p
    if hasattr(p, "eigenvalues"):
        return Preconditioner.from_eigenpairs(p)
    if hasattr(p, "estimate") and np.ndim(p.estimate) == 1:  # a DiagonalResult
        return Preconditioner(np.asarray(p.estimate, dtype=np.float64))
    if hasattr(p, "optimizer") and hasattr(p, "diagonal"):  # an optimizer's DiagonalPreconditioner
        return Preconditioner(p.diagonal)
    if np.isscalar(p) or isinstance(p, np.ndarray):
        return Preconditioner(np.asarray(p, dtype=np.float64))
    if len(getattr(p, "shape", ())) == 1:  # a framework's array: the diagonal, read on binding
        return Preconditioner(p)
    raise TypeError(f"cannot use a {type(p).__name__} as a preconditioner; pass a specops.Preconditioner, "
                    "a DiagonalResult (so.diagonal), an EigResult (so.eigsh: deflation), an optimizer's "
                    "DiagonalPreconditioner (st.preconditioner) or a host array")


def _safe(num: np.ndarray, den: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``num / den`` on active columns, 0 elsewhere (never NaN)."""
    ok = active & (den != 0)
    return np.where(ok, num / np.where(ok, den, 1.0), 0.0)


class _State:
    """What the solvers share: the operator's counted product, the budget, the tolerance."""

    def __init__(self, A: LinearOperator, B: Array, tol: float, budget: int,
                 precond: Callable[[Array], Array] | None) -> None:
        self.A, self.ops, self.mul = A, A.ops, _checks.Products(A)
        self.B, self.k = B, B.shape[1]
        self.bnorm = self.ops.column_norms(B)
        self.target = tol * self.bnorm
        self.budget = budget
        self.M = precond if precond is not None else (lambda R: R)
        self.iterations = self.restarts = 0
        self.negative: float | None = None
        self.cond = 1.0
        self.top = 0.0
        self.singular = False

    def room(self, products: int = 1) -> bool:
        """Whether ``products`` more steps leave room for the final verification."""
        return self.mul.count + (products + 1) * self.k <= self.budget

    def residual(self, X: Array) -> Array:
        return self.B - self.mul(X)


def _cg(s: _State, X: Array, R: Array, stop_on_negative: bool) -> tuple[Array, bool]:
    """Preconditioned CG from ``X`` with residual ``R``; returns ``(X, met_negative_curvature)``."""
    ops = s.ops
    Z = s.M(R)
    rz = ops.column_dots(R, Z)
    P = Z
    while True:
        rnorm = ops.column_norms(R)
        active = s.A.decide(rnorm > s.target)
        show(s.A, residual=float((rnorm / np.maximum(s.bnorm, np.finfo(float).tiny)).max()))
        if not active.any() or not s.room():
            return X, False
        Q = s.mul(P)
        pq, pp = ops.column_dots(P, Q), ops.column_dots(P, P)
        quotient = _safe(pq, pp, active)
        s.top = max(s.top, float(quotient.max()))
        s.cond = max(s.cond, s.top / max(float(quotient[active].min()), np.finfo(float).tiny))
        # curvature at the rounding level of the largest met counts too: A + shift I is then
        # singular to working precision (a GGN without damping), which MINRES detects and reports
        flat = FLAT * float(np.finfo(ops.dtype).eps) * s.top
        bad = s.A.decide(active & (quotient <= flat))
        if bad.any():
            s.negative = float(quotient[bad].min())
            if stop_on_negative:
                return X, True
            raise IndefiniteError(
                f"CG met a direction of non-positive curvature (or at the rounding level) p^T (A + shift I) p / "
                f"p^T p = {s.negative:.3g}: the operator is not positive definite. Use method='minres' (or 'auto'), "
                f"or a shift larger by at least {max(-s.negative, flat):.3g}")
        a = _safe(rz, pq, active)
        X = X + ops.scale_columns(P, a)
        R = R - ops.scale_columns(Q, a)
        Z = s.M(R)
        rz_new = ops.column_dots(R, Z)
        P = Z + ops.scale_columns(P, _safe(rz_new, rz, active))
        rz = rz_new
        s.iterations += 1


def _minres(s: _State, X: Array, R: Array) -> Array:
    """Preconditioned MINRES (Paige & Saunders 1975; SciPy's ``minres``) from ``X`` with residual ``R``.

    Every ``CHECK_EVERY`` steps without progress, the Ritz values of the Lanczos
    tridiagonal tell whether ``A + shift I`` is singular to working precision (then ``b``
    is not in its range and the run stops: :attr:`_State.singular`).
    """
    ops, k = s.ops, s.k
    tiny = np.finfo(float).tiny
    Y = s.M(R)
    beta1 = np.sqrt(np.maximum(ops.column_dots(R, Y), 0.0))
    bM = np.sqrt(np.maximum(ops.column_dots(s.B, s.M(s.B)), 0.0))  # ||b|| in the norm MINRES minimizes
    target = s.target / np.maximum(s.bnorm, tiny) * bM
    R1 = R2 = R
    W = W2 = ops.zeros(R.shape)
    oldb, beta, phibar = np.zeros(k), beta1, beta1
    dbar, epsln, cs, sn = np.zeros(k), np.zeros(k), -np.ones(k), np.zeros(k)
    alphas: list[np.ndarray] = []
    betas: list[np.ndarray] = []
    checked = phibar.copy()
    while True:
        active = s.A.decide(phibar > target)
        show(s.A, residual=float((phibar / np.maximum(bM, tiny)).max()))
        if not active.any() or not s.room():
            return X
        if len(alphas) % CHECK_EVERY == 0 and alphas:
            stalled = active & (phibar > (1 - STALL) * checked)
            checked = phibar.copy()
            if stalled.any() and s.A.decide(_singular(np.array(alphas), np.array(betas), stalled, s)):
                s.singular = True
                return X
        live = active & (beta > 0)
        V = ops.scale_columns(Y, _safe(np.ones(k), beta, live))
        Y = s.mul(V)
        if alphas:
            Y = Y - ops.scale_columns(R1, _safe(beta, oldb, live))
        alfa = np.where(live, ops.column_dots(V, Y), 0.0)
        Y = Y - ops.scale_columns(R2, _safe(alfa, beta, live))
        R1, R2 = R2, Y
        Y = s.M(R2)
        oldb = beta
        beta = np.where(live, np.sqrt(np.maximum(ops.column_dots(R2, Y), 0.0)), 0.0)
        alphas.append(alfa)
        betas.append(beta)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = np.maximum(np.hypot(gbar, beta), tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = np.where(live, cs * phibar, 0.0)
        phibar = np.where(live, sn * phibar, phibar)
        W1, W2 = W2, W
        denom = np.where(live, 1.0 / gamma, 0.0)
        W = ops.scale_columns(V - ops.scale_columns(W1, oldeps) - ops.scale_columns(W2, delta), denom)
        X = X + ops.scale_columns(W, phi)
        s.iterations += 1


def _singular(alphas: np.ndarray, betas: np.ndarray, columns: np.ndarray, s: _State) -> bool:
    """Whether the Lanczos tridiagonal of a column has a Ritz pair at 0 to working precision.

    A Ritz value ``theta`` with residual ``rho`` proves an eigenvalue of the (preconditioned)
    shifted operator within ``rho`` of ``theta`` (Kahan); ``|theta| + rho`` at the rounding
    level of ``||T||`` makes it singular to working precision. Raises ``s.cond`` to the
    estimate it gives.
    """
    found = False
    eps = float(np.finfo(s.ops.dtype).eps)
    for c in np.flatnonzero(columns):
        m = len(alphas)
        theta, S = scipy.linalg.eigh_tridiagonal(alphas[:, c], betas[: m - 1, c])
        rho = np.abs(betas[m - 1, c] * S[-1])
        scale = float(np.abs(theta).max())
        closest = float(np.min(np.abs(theta) + rho))
        s.cond = max(s.cond, scale / max(closest, np.finfo(float).tiny))
        found |= closest <= SINGULAR * eps * scale
    return found


def solve(A: OperatorLike, b: Any, *, shift: float = 0.0, method: SolveMethod = "auto", tol: float = 1e-6,
          max_matvecs: int | None = None, x0: Any = None, preconditioner: Any = None) -> SolveResult:
    """Solve ``(A + shift I) x = b`` by CG or MINRES.

    Args:
        A: a symmetric :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        b: the right-hand side, (n,) or a block (n, k) solved column by column side by side,
            a native array of ``A``'s backend (or a NumPy array for a NumPy operator).
        shift: ``sigma`` (damping): ``A + sigma I`` is solved.
        method: ``"auto"`` (CG, switching to MINRES from its last iterate when it meets
            non-positive curvature; MINRES from the start for an operator whose
            ``positive_semidefinite`` is False), ``"cg"`` (raises :class:`IndefiniteError` on
            non-positive curvature) or ``"minres"``.
        tol: relative residual ``||b - (A + shift I) x|| / ||b||`` to reach, per column.
        max_matvecs: budget of products, the final verification included (default
            ``k * min(10 n, 1000)``). When it runs out, the iterate is returned with
            ``converged`` False.
        x0: starting guess of ``b``'s shape (default 0; a non-zero guess costs one product).
        preconditioner: a :class:`Preconditioner` approximating ``A`` (the shift is added),
            a :class:`~specops.DiagonalResult` or an (n,) array (the diagonal), or an
            :class:`~specops.EigResult` (deflation of its eigenpairs); ``M + shift I`` must be
            positive definite.

    Returns:
        :class:`SolveResult`.

    Raises:
        ValueError: bad arguments, ``b`` of the wrong shape, or NaN / infinite entries in ``b``.
        IndefiniteError: ``method="cg"`` on an operator found not positive definite.
        NonFiniteError: a product returned NaN or infinity.

    Examples:
        >>> import numpy as np
        >>> import specops as so
        >>> A = np.diag(np.arange(1.0, 101.0))
        >>> r = so.solve(A, np.ones(100), shift=1.0, tol=1e-10)
        >>> bool(r.converged), bool(np.allclose(r.x, 1 / np.arange(2.0, 102.0)))
        (True, True)
    """
    A = _checks.symmetric_operator(A, "solve")
    _checks.choice("method", method, METHODS)
    tol = _checks.positive_float("tol", tol)
    shift = float(shift)
    if not np.isfinite(shift):
        raise ValueError(f"shift must be a finite number, got {shift!r}")
    ops, n = A.ops, A.shape[0]
    B, vector = as_block(A, b, "b")
    k = B.shape[1]
    if max_matvecs is None:
        max_matvecs = k * min(10 * n, DEFAULT_STEPS)
    budget = _checks.positive_int("max_matvecs", max_matvecs)
    if budget < k:
        raise ValueError(f"max_matvecs = {budget} leaves no room for the final product of the {k} column(s) of x")
    precond = as_preconditioner(preconditioner)
    op = A.shift(shift) if shift != 0 else A
    s = _State(op, B, tol, budget, None if precond is None else precond.bind(ops, n, shift))
    if x0 is None:
        X, R = ops.zeros(B.shape), B
    else:
        X = as_block(A, x0, "x0")[0]
        if X.shape != B.shape:
            raise ValueError(f"x0 must have b's shape {tuple(B.shape)}, got {tuple(X.shape)}")
        R = s.residual(X)
    use = "minres" if method == "minres" or (method == "auto" and getattr(A, "positive_semidefinite", None) is False) \
        else "cg"
    used = [use]
    while True:
        if use == "cg":
            X, negative = _cg(s, X, R, stop_on_negative=method == "auto")
            if negative:
                use = "minres"
                used.append(use)
                continue
        else:
            X = _minres(s, X, R)
        R = s.residual(X)  # the verification: the reported residual is this product's
        rnorm = ops.column_norms(R)
        converged = s.A.decide(rnorm <= s.target)
        if converged.all() or s.singular or s.restarts >= MAX_RESTARTS or not s.room():
            break
        s.restarts += 1
    settings = dict(method=method, method_used=", then ".join(used), tol=tol, shift=shift, max_matvecs=budget,
                    preconditioner=None if precond is None else precond.describe(), iterations=s.iterations,
                    restarts=s.restarts, columns=k, n=n, backend=A.backend, dtype=ops.dtype.name)
    if s.negative is not None:
        settings["negative_curvature"] = s.negative
    settings["condition_estimate"] = s.cond
    if s.singular and not converged.all():
        settings["singular"] = True
        warnings.warn(f"solve: A + shift I (shift = {shift:g}) is singular to working precision (an eigenvalue "
                      f"within {1 / s.cond:.2g} ||A + shift I|| of 0) and b is not in its range; the result is a least-squares "
                      "solution. Choose another shift", RuntimeWarning, stacklevel=2)
    one = (lambda a: a[0]) if vector else (lambda a: a)
    return SolveResult(x=X[:, 0] if vector else X, residual_norm=float(one(rnorm)) if vector else rnorm,
                       b_norm=float(one(s.bnorm)) if vector else s.bnorm,
                       converged=bool(one(converged)) if vector else converged,
                       num_matvecs=s.mul.count, settings=settings)


def as_block(A: LinearOperator, b: Any, name: str) -> tuple[Array, bool]:
    """``b`` (checked: shape, finite) as a native (n, k) block of ``A``'s vectors, and whether it was one vector."""
    ops, n = A.ops, A.shape[0]
    shape = tuple(getattr(b, "shape", np.shape(b)))
    if len(shape) not in (1, 2) or shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) or ({n}, k) for this {n} x {n} operator, got {shape}")
    B = A._check(b, len(shape))
    if not ops.all_finite(B):
        raise ValueError(f"{name} has NaN or infinite entries; nothing was solved")
    return ops.as_columns(B), len(shape) == 1

