"""Functions of a symmetric operator by Lanczos: ``tr f(A)``, ``log det A`` and ``f(A) v``.

- :func:`trace_function` and :func:`logdet`: stochastic Lanczos quadrature (Golub &
  Meurant 1994; Ubaru, Chen & Saad 2017): ``z^T f(A) z ~ ||z||^2 e_1^T f(T) e_1`` for the
  Lanczos tridiagonal ``T`` of each probe ``z``, averaged over probes with a standard
  error, and the quadrature part bounded by Gauss-Radau rules when an interval holding
  the spectrum is known (Golub & Meurant 2010, ch. 6).
- :func:`funm`: ``f(A) v ~ ||v|| Q f(T) e_1`` for the Lanczos basis ``Q`` of ``v``, with an
  a-posteriori error estimate (the change of the approximation over the last ``DELAY``
  steps) and a stopping rule on it.

All three run the one Lanczos of :func:`specops.lanczos.probe_lanczos` (full
reorthogonalization, probes side by side in one ``matmat`` per step); ``f`` is a NumPy
function applied to the tridiagonal's eigenvalues (Ritz values) on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.linalg import eigh_tridiagonal

from specops import _checks
from specops.density import _plan
from specops.lanczos import Basis, probe_lanczos
from specops.operator import OperatorLike
from specops.progress import show
from specops.random import Distribution, check_distribution, check_seed
from specops.results import Result
from specops.solve import as_block
from specops.trace import MIN_PROBES_FOR_RTOL

#: Error estimates without bounds extrapolate the changes over the last two spans of
#: ``max(1, m // SPAN)`` steps as a geometric tail, times ``SAFETY`` (docs/linalg.md: on the
#: conformance operators the true error stayed below it).
SPAN, SAFETY = 4, 2.0
#: Ritz values within RITZ_ROUNDING * eps * ||T|| outside a given spectrum are rounding.
RITZ_ROUNDING = 100.0
#: The quadrature error includes the rules' change when the Ritz values move by
#: NODE_ROUNDING * eps * ||T|| (the Lanczos coefficients' rounding in the operator's precision).
NODE_ROUNDING = 10.0
#: funm's default number of steps: ``min(n, DEFAULT_STEPS)``.
DEFAULT_STEPS = 100

Function = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class TraceFunctionResult(Result):
    """An estimate of ``tr f(A + shift I)`` (or ``log det``) by stochastic Lanczos quadrature.

    Attributes:
        estimate: the estimate (for a sequence of shifts, an array: one per shift, likewise below).
        stderr: its standard error over the probes (0 when every probe's quadrature is exact
            and the probes have no variance).
        quadrature_error: the quadrature's part of the error (the average over probes of the
            distance from the Gauss rule to the farther Gauss-Radau bound) when
            ``settings["quadrature"]`` is ``"bound"``; else an estimate (below); both plus the
            working precision's part (the rules' change when the Ritz values move by
            ``10 eps ||T||``, which matters in float32).
        num_matvecs: operator-vector products used.
        settings: function, shift, num_probes (used) and asked for, num_steps, rtol, seed,
            probe distribution, spectrum, quadrature (``"bound"`` / ``"estimate"``) and
            ``bounds`` (lower, upper: the Gauss-Radau bounds of the probes' average) when bounded.

    Without bounds the quadrature error is extrapolated from the Gauss rules of the probes'
    average at ``m``, ``m - d`` and ``m - 2d`` steps (``d = m // 4``) as a geometric tail, times 2.
    """

    estimate: Any
    stderr: Any
    quadrature_error: Any
    num_matvecs: int
    settings: dict


@dataclasses.dataclass
class FunmResult(Result):
    """``f(A + shift I) v`` by Lanczos.

    Attributes:
        y: the result, an array of the operator's backend of ``v``'s shape (``None`` after JSON).
        error_estimate: an estimate of ``||y - f(A + shift I) v||`` (see :func:`funm`; 0 for a
            column whose Krylov space was exhausted, where ``y`` is exact to rounding); a float
            for a vector ``v``, one per column for a block.
        y_norm: ``||y||`` (likewise).
        converged: ``error_estimate <= tol * y_norm`` (likewise).
        num_matvecs: operator-vector products used.
        settings: function, shift, num_steps (asked for, and ``steps`` run), tol.
    """

    y: Any
    error_estimate: Any
    y_norm: Any
    converged: Any
    num_matvecs: int
    settings: dict

    _NOT_SERIALIZED = ("y",)


def _name(f: Any) -> str:
    return getattr(f, "__name__", type(f).__name__)


def _values(f: Function, theta: np.ndarray, shift: float, what: str, positive: bool) -> np.ndarray:
    """``f(theta)`` on the host, refusing non-positive Ritz values (``positive``) or non-finite values."""
    low = float(theta.min())
    if positive and low <= 0:
        raise ValueError(
            f"{what} needs A + shift I positive definite, but the Lanczos run met a Ritz value {low:.4g} of "
            f"A + shift I (shift = {shift:g}): A has an eigenvalue <= {low - shift:.4g}. Pass a shift larger "
            f"than {shift - low:.4g} (at least; the smallest eigenvalue may lie further down)")
    with np.errstate(all="ignore"):
        out = np.asarray(f(theta), dtype=np.float64)
    if out.shape != theta.shape:
        raise ValueError(f"f must map an array of Ritz values to an array of the same shape (NumPy "
                         f"elementwise), got shape {out.shape} for {theta.shape}")
    bad = ~np.isfinite(out)
    if bad.any():
        hint = (f"; A + shift I (shift = {shift:g}) has a Ritz value {low:.4g} <= 0: a shift larger than "
                f"{shift - low:.4g} makes it positive" if low <= 0 else "")
        raise ValueError(f"{what}: f = {_name(f)} is not finite at the Ritz value {float(theta[bad][0]):.6g} of "
                         f"A + shift I{hint}")
    return out


def _tail(change: npt.ArrayLike, before: npt.ArrayLike) -> np.ndarray:
    """The error left after the latest of two successive changes (``change``, then ``before`` it).

    A geometric tail ``change * q / (1 - q)`` with ``q = change / before`` (at most 0.99),
    never less than ``change`` itself, times :data:`SAFETY`.
    """
    change, before = np.abs(change), np.abs(before)
    q = np.minimum(np.where(before > 0, change / np.where(before > 0, before, 1.0), 0.0), 0.99)
    return SAFETY * change * np.maximum(1.0, q / (1 - q))


def _spans(m: int) -> tuple[int, int]:
    """Steps ``m - d`` and ``m - 2 d`` of the error estimate after ``m`` steps."""
    d = max(1, m // SPAN)
    return max(1, m - d), max(1, m - 2 * d)


def _gauss(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and (first-component) eigenvectors of the tridiagonal ``(alpha, beta[:-1])``."""
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    return eigh_tridiagonal(alpha, beta[: len(alpha) - 1])


def _radau(alpha: np.ndarray, beta: np.ndarray, node: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """The Gauss-Radau rule with ``len(alpha) - 1`` free nodes and one fixed at ``node``.

    Golub's construction: the last diagonal entry ``node + delta_{m-1}`` with
    ``(T_{m-1} - node I) delta = beta_{m-1}^2 e_{m-1}``. A Ritz value of ``T_{m-1}`` within
    ``margin`` (rounding) of ``node``, or past it, moves the node out by ``margin``, so the
    system stays definite and the rule stays a bound. Returns nodes and weights.
    """
    m = len(alpha)
    if m == 1:
        return np.array([node]), np.array([1.0])
    ritz = alpha[:1] if m == 2 else eigh_tridiagonal(alpha[: m - 1], beta[: m - 2], eigvals_only=True)
    lower = node <= ritz.min()
    node = min(node, ritz.min() - margin) if lower else max(node, ritz.max() + margin)
    T = np.diag(alpha[: m - 1]) + np.diag(beta[: m - 2], 1) + np.diag(beta[: m - 2], -1)
    rhs = np.zeros(m - 1)
    rhs[-1] = beta[m - 2] ** 2
    delta = np.linalg.solve(T - node * np.eye(m - 1), rhs)
    theta, U = eigh_tridiagonal(np.concatenate([alpha[: m - 1], [node + delta[-1]]]), beta[: m - 1])
    return theta, U[0] ** 2


def trace_function(A: OperatorLike, f: Function, *, shift: float | npt.ArrayLike = 0.0, num_probes: int = 10,
                   num_steps: int = 50, rtol: float | None = None, seed: int = 0,
                   distribution: Distribution = "rademacher",
                   spectrum: tuple[float, float] | None = None, chunk_size: int | None = 10,
                   memory_budget: int | None = None,
                   positive: bool = False) -> TraceFunctionResult:
    """Estimate ``tr f(A + shift I)`` by stochastic Lanczos quadrature.

    Args:
        A: a symmetric :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        f: a NumPy function applied elementwise to Ritz values (``np.log``, ``np.exp``,
            ``lambda x: x ** -0.5``, ...).
        shift: ``sigma``: the function of ``A + sigma I`` is taken. A sequence of shifts is
            served by one Lanczos run (the Krylov spaces of ``A + sigma I`` are those of ``A``);
            the result's numbers are then arrays, one entry per shift.
        num_probes: the most probes (each costs ``num_steps`` products).
        num_steps: Lanczos steps per probe (quadrature nodes; capped at n).
        rtol: stop once ``stderr <= rtol * |estimate|`` (checked after each group of ``chunk_size``
            probes, from 10 probes on).
        seed: seed of the probes (the ``"slq"`` stream: :func:`~specops.spectral_density`'s probes).
        distribution: probe distribution, ``"rademacher"`` or ``"normal"``.
        spectrum: an interval ``(lo, hi)`` holding the eigenvalues of ``A`` (before the shift).
            With it the quadrature error is bounded by Gauss-Radau rules, valid when the
            derivatives of ``f`` of odd order keep one sign on ``[lo + shift, hi + shift]``
            (``log``, ``exp``, ``x ** p``, ``1 / x`` on a positive interval); ``f`` must be
            defined on it. Without it, the quadrature error is estimated.
        chunk_size: the most probes run side by side (one ``matmat`` of their columns per step),
            each keeping its ``num_steps`` Lanczos vectors; fewer when their bases would not
            fit in ``memory_budget``; ``None``: as many as fit. When one probe's basis does
            not fit, it is reorthogonalized against its last vectors only, with a warning
            (as in :func:`~specops.spectral_density`).
        memory_budget: bytes allowed for the bases (default: half the free memory).
        positive: refuse non-positive Ritz values (``f`` defined for positive arguments only).

    Returns:
        :class:`TraceFunctionResult`.

    Raises:
        ValueError: bad arguments; a Ritz value where ``f`` is not finite, or (``positive``)
            not positive, with the shift that would be needed.
        NonFiniteError: a product returned NaN or infinity.

    Examples:
        ``tr A^{-1}`` of ``diag(1, ..., 100)`` is the harmonic number ``H_100 = 5.187``:

        >>> import numpy as np
        >>> import specops as so
        >>> r = so.trace_function(np.diag(np.arange(1.0, 101.0)), lambda x: 1 / x, num_steps=40)
        >>> print(f"{r.estimate:.3f} (quadrature error {r.quadrature_error:.0e})")
        5.187 (quadrature error 2e-05)
    """
    what = "logdet" if f is np.log and positive else "trace_function"
    A = _checks.symmetric_operator(A, what)
    num_probes = _checks.positive_int("num_probes", num_probes)
    num_steps = _checks.positive_int("num_steps", num_steps)
    rtol = _checks.positive_float("rtol", rtol, allow_none=True)
    seed, distribution = check_seed(seed), check_distribution(distribution)
    shifts = np.atleast_1d(np.asarray(shift, dtype=np.float64))
    if shifts.ndim != 1 or shifts.size == 0 or not np.all(np.isfinite(shifts)):
        raise ValueError(f"shift must be a finite number or a 1-D sequence of them, got {shift!r}")
    bounds = None
    if spectrum is not None:
        lo, hi = (_finite("spectrum", float(x)) for x in spectrum)
        if not lo <= hi:
            raise ValueError(f"spectrum must be an interval (lo, hi) with lo <= hi, got {spectrum!r}")
        bounds = (lo, hi)
        if positive and lo + shifts.min() <= 0:
            raise ValueError(f"{what}: the spectrum's lower end plus the shift is {lo + shifts.min():g} <= 0; "
                             f"A + shift I must be positive definite: pass a shift larger than {-lo:g}")
    ops, n = A.ops, A.shape[0]
    steps = min(num_steps, n)
    group, window, _ = _plan(ops, n, num_probes, steps, None, None, memory_budget, A.decide)
    chunk_size = group if chunk_size is None else min(group, _checks.positive_int("chunk_size", chunk_size))
    mul = _checks.Products(A)  # the Krylov space of A + s I is that of A: one run serves every shift
    samples, earlier, quad, lower, upper, rounding = [], [], [], [], [], []  # per probe, one entry per shift

    def rules(nodes: np.ndarray, weights: np.ndarray, scale: float) -> np.ndarray:
        return np.array([scale * float(weights @ _values(f, nodes + s, s, what, positive)) for s in shifts])

    for first in range(0, num_probes, chunk_size):
        cols = range(first, min(first + chunk_size, num_probes))
        Z = ops.random(n, cols, seed, distribution=distribution, stream="slq")
        norms = ops.column_norms(Z)
        alpha, beta, length = probe_lanczos(A, mul, ops.scale_columns(Z, 1.0 / norms), steps, window)
        del Z
        for i in range(len(cols)):
            m, scale = int(length[i]), float(norms[i] ** 2)

            def gauss(j: int) -> np.ndarray:
                theta, U = _gauss(alpha[i, :j], beta[i, :j])
                return rules(theta, U[0] ** 2, scale)

            ritz, U = _gauss(alpha[i, :m], beta[i, :m])
            g = rules(ritz, U[0] ** 2, scale)
            samples.append(g)
            # the working precision's part: the rules' change when the nodes move by rounding
            nudge = NODE_ROUNDING * float(np.finfo(ops.dtype).eps) * float(np.abs(ritz).max())
            rounding.append(np.abs(rules(ritz + nudge, U[0] ** 2, scale) - g))
            if bounds is not None:
                margin = RITZ_ROUNDING * float(np.finfo(ops.dtype).eps) * float(np.abs(ritz).max())
                if ritz.min() < bounds[0] - margin or ritz.max() > bounds[1] + margin:
                    raise ValueError(f"{what}: spectrum = {spectrum!r} does not hold the eigenvalues of A: the "
                                     f"Lanczos run met Ritz values in [{ritz.min():.6g}, {ritz.max():.6g}]; "
                                     "widen it (or leave it out: the quadrature error is then estimated)")
            if m < steps:  # the Krylov space was exhausted: the quadrature is exact
                earlier.append(np.array([g, g]))
                quad.append(np.zeros_like(g))
                lower.append(g)
                upper.append(g)
                continue
            earlier.append(np.array([gauss(j) for j in _spans(m)]))
            if bounds is not None:
                ends = np.array([[scale * float(w @ _values(f, t + s, s, what, positive))
                                  for t, w in (_radau(alpha[i, :m], beta[i, :m], b, margin) for b in bounds)]
                                 for s in shifts])  # (shifts, 2)
                lower.append(ends.min(axis=1))
                upper.append(ends.max(axis=1))
                quad.append(np.maximum(np.maximum(g - lower[-1], upper[-1] - g), 0.0))
        est, err = _mean_stderr(samples)
        show(A, estimate=float(est[0]), stderr=float(err[0]))
        if rtol is not None and len(samples) >= MIN_PROBES_FOR_RTOL and \
                A.decide(bool(np.all(err <= rtol * np.abs(est)))):
            break
    est, err = _mean_stderr(samples)
    one = np.ndim(shift) == 0

    def out(x: np.ndarray) -> Any:
        return float(x[0]) if one else x

    settings: dict[str, Any] = dict(function=_name(f), shift=out(shifts), num_probes=len(samples),
                                    max_probes=num_probes, num_steps=steps, rtol=rtol, seed=seed,
                                    distribution=distribution,
                                    spectrum=None if spectrum is None else [float(x) for x in spectrum],
                                    quadrature="bound" if bounds is not None else "estimate",
                                    probes_at_once=chunk_size, reorth_window=window,
                                    n=n, backend=A.backend, dtype=ops.dtype.name)
    if bounds is not None:
        settings["bounds"] = [out(np.mean(lower, axis=0)), out(np.mean(upper, axis=0))]
        quadrature = np.mean(quad, axis=0)
    elif steps < 3:
        quadrature = np.full(len(shifts), np.inf)
    else:
        g1, g2 = np.mean(earlier, axis=0)
        quadrature = _tail(est - g1, g1 - g2)
    quadrature = quadrature + np.mean(rounding, axis=0)
    return TraceFunctionResult(estimate=out(est), stderr=out(err), quadrature_error=out(quadrature),
                               num_matvecs=mul.count, settings=settings)


def logdet(A: OperatorLike, *, shift: float | npt.ArrayLike = 0.0, num_probes: int = 10, num_steps: int = 50,
           rtol: float | None = None, seed: int = 0, distribution: Distribution = "rademacher",
           spectrum: tuple[float, float] | None = None, chunk_size: int | None = 10,
           memory_budget: int | None = None) -> TraceFunctionResult:
    """Estimate ``log det (A + shift I)`` of a positive definite operator (``tr log``, by SLQ).

    Arguments as for :func:`trace_function` with ``f = log``. With ``spectrum`` (an interval
    holding the eigenvalues of ``A``; its lower end plus the shift positive) the quadrature
    error is bounded: the Gauss rule is an upper bound of each probe's ``z^T log(A) z`` and
    the Gauss-Radau rule at the lower end a lower bound.

    Raises:
        ValueError: a Ritz value of ``A + shift I`` met during the run is not positive (then
            ``A + shift I`` is not positive definite); the message names the shift it would need.

    Examples:
        >>> import numpy as np
        >>> import specops as so
        >>> lam = np.linspace(1.0, 100.0, 400)
        >>> Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((400, 400)))
        >>> r = so.logdet((Q * lam) @ Q.T, num_probes=30, spectrum=(1.0, 100.0))
        >>> print(f"{np.log(lam).sum():.0f}, estimated {r.estimate:.0f} +- {r.stderr:.0f}, "
        ...       f"quadrature error <= {r.quadrature_error:.0e}")
        1459, estimated 1466 +- 5, quadrature error <= 2e-09
    """
    return trace_function(A, np.log, shift=shift, num_probes=num_probes, num_steps=num_steps, rtol=rtol, seed=seed,
                          distribution=distribution, spectrum=spectrum, chunk_size=chunk_size,
                          memory_budget=memory_budget,
                          positive=True)


def _finite(name: str, x: Any) -> float:
    x = float(x)
    if not np.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return x


def _mean_stderr(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over probes (axis 0)."""
    s = np.asarray(samples)
    err = s.std(axis=0, ddof=1) / np.sqrt(len(s)) if len(s) > 1 else np.full(s.shape[1:], np.inf)
    return s.mean(axis=0), err


def _coefficients(f: Function, alpha: np.ndarray, beta: np.ndarray, length: np.ndarray, shift: float,
                  positive: bool, coupled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per column ``f(T) e_1`` (steps, p; zero past the column's length) and its error estimate.

    The estimate is :func:`_tail` of the changes ``||f(T_m) e_1 - f(T_{m-d}) e_1||`` and
    ``||f(T_{m-d}) e_1 - f(T_{m-2d}) e_1||`` (zero-padded). A column whose Krylov space was
    exhausted (``length`` below the steps run, or, when ``beta``'s last column holds the
    couplings to the next vectors: ``coupled``, a zero coupling) is exact: estimate 0.
    """
    p, m = alpha.shape
    C = np.zeros((m, p))
    error = np.zeros(p)
    for i in range(p):
        L = int(min(length[i], m))

        def rule(j: int) -> np.ndarray:
            theta, U = _gauss(alpha[i, :j], beta[i, :j])
            return np.concatenate([U @ (_values(f, theta, shift, "funm", positive) * U[0]), np.zeros(L - j)])

        C[:L, i] = rule(L)
        if L < m or (coupled and beta[i, L - 1] == 0):
            continue
        if L < 3:
            error[i] = np.inf
            continue
        c1, c2 = (rule(j) for j in _spans(L))
        error[i] = float(_tail(np.linalg.norm(C[:L, i] - c1), np.linalg.norm(c1 - c2)))
    return C, error


def funm(A: OperatorLike, f: Function, v: Any, *, shift: float = 0.0, num_steps: int | None = None,
         tol: float = 1e-6, positive: bool = False) -> FunmResult:
    """``f(A + shift I) v`` by Lanczos, with an error estimate and a stopping rule on it.

    ``y_m = ||v|| Q_m f(T_m) e_1`` after ``m`` steps. The error estimate extrapolates the
    changes ``||y_m - y_{m-d}||`` and ``||y_{m-d} - y_{m-2d}||`` (``d = m // 4``; computed from
    the tridiagonal alone, the basis being orthonormal) as a geometric tail, at least the
    last change, times 2; the run stops when it is at most ``tol * ||y_m||`` for every
    column. It is an estimate, not a bound: for a discontinuous ``f`` (a spectral window)
    the approximation converges slowly and unevenly, and the estimate is rough.

    Args:
        A: a symmetric :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        f: a NumPy function applied elementwise to Ritz values (``np.exp``,
            ``lambda x: x ** -0.5``, ``lambda x: 1 / x``, ``lambda x: (x > a) * 1.0``).
        v: (n,) or a block (n, k) of columns treated independently side by side (one
            ``matmat`` per step), a native array of ``A``'s backend.
        shift: ``sigma``: ``f(A + sigma I) v``.
        num_steps: the most Lanczos steps (products per column; default ``min(n, 100)``).
            The basis kept is ``num_steps`` vectors per column.
        tol: relative error estimate to stop at.
        positive: refuse non-positive Ritz values (``f`` defined for positive arguments only:
            ``x ** -0.5``, ``log``).

    Returns:
        :class:`FunmResult` (``converged`` False when ``num_steps`` ran out first).

    Raises:
        ValueError: bad arguments, ``v`` of the wrong shape, a zero or non-finite ``v``; a Ritz
            value where ``f`` is not finite (with the shift that would avoid it).

    Examples:
        ``exp(A) v`` of a diagonal matrix:

        >>> import numpy as np
        >>> import specops as so
        >>> d = np.linspace(-1.0, 1.0, 50)
        >>> r = so.funm(np.diag(d), np.exp, np.ones(50), tol=1e-10)
        >>> bool(r.converged), bool(np.allclose(r.y, np.exp(d)))
        (True, True)
    """
    A = _checks.symmetric_operator(A, "funm")
    tol = _checks.positive_float("tol", tol)
    shift = _finite("shift", shift)
    ops, n = A.ops, A.shape[0]
    steps = min(n, DEFAULT_STEPS if num_steps is None else _checks.positive_int("num_steps", num_steps))
    V, vector = as_block(A, v, "v")
    vnorm = ops.column_norms(V)
    if not np.all(vnorm > 0):
        raise ValueError("v has a zero column; f(A) 0 = 0 needs no Lanczos (drop the column)")
    op = A.shift(shift) if shift != 0 else A
    mul = _checks.Products(op)
    stopped = []

    def stop(alpha: np.ndarray, beta: np.ndarray) -> bool:
        C, error = _coefficients(f, alpha, beta, np.full(alpha.shape[0], alpha.shape[1]), shift, positive, True)
        size = np.linalg.norm(C, axis=0)
        show(op, error=float(np.max(error / np.maximum(size, np.finfo(float).tiny))))
        done = bool(np.all(error <= tol * size))
        stopped.append(done)
        return done

    keep: list[Basis] = []
    alpha, beta, length = probe_lanczos(op, mul, ops.scale_columns(V, 1.0 / vnorm), steps, stop=stop, keep=keep)
    C, change = _coefficients(f, alpha, beta, length, shift, positive, bool(stopped and stopped[-1]))
    basis, m = keep[0], alpha.shape[1]
    store = basis.store
    Y = ops.move(store.einsum("jnp,jp->np", basis.X[:m], store.from_numpy(C * vnorm)), store)
    ynorm = np.linalg.norm(C, axis=0) * vnorm
    error = change * vnorm
    converged = op.decide(error <= tol * ynorm)
    settings = dict(function=_name(f), shift=shift, num_steps=steps, steps=m, tol=tol,
                    columns=V.shape[1], n=n, backend=A.backend, dtype=ops.dtype.name)
    one = (lambda a: float(a[0])) if vector else (lambda a: a)
    return FunmResult(y=Y[:, 0] if vector else Y, error_estimate=one(error), y_norm=one(ynorm),
                      converged=bool(converged[0]) if vector else converged, num_matvecs=mul.count,
                      settings=settings)

