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

import contextlib
import dataclasses
from typing import Any, Literal, NamedTuple, get_args

import numpy as np

from specops import _checks
from specops.checks import engine_settings
from specops.data_error import eigenvalue_stderr
from specops.data_error import model_operator as data_error_model
from specops.lanczos import NORM_FLOOR, ROUNDING, VERIFY, basis_store, eigenvalue_errors, thick_restart, verified
from specops.lanczos import wanted as _wanted
from specops.lanczos import thresholds as _thresholds
from specops.operator import OperatorLike
from specops.ops import Array, VectorOps
from specops.progress import bar as progress_bar
from specops.random import check_seed
from specops.results import Result
from specops.sharded import gather

#: Which eigenvalues: largest/smallest algebraic, largest magnitude, both ends.
Which = Literal["LA", "SA", "LM", "BE"]
WHICH: tuple[Which, ...] = get_args(Which)
#: The eigensolvers: Lanczos, or deflated power iteration.
EigMethod = Literal["lanczos", "power"]
METHODS: tuple[EigMethod, ...] = get_args(EigMethod)
#: What ``tol`` bounds: the residual, or the eigenvalue's error.
StopOn = Literal["residual", "eigenvalue"]
STOP_ON: tuple[StopOn, ...] = get_args(StopOn)

#: Operators up to this size grow one Lanczos basis to convergence (at most n products).
SMALL = 1000
#: The multiplicity check converges the extreme eigenpair of the complement to at most this
#: relative residual (or the caller's tol, if smaller) before it trusts it.
CHECK_TOL = 1e-2
#: A warm start skips the multiplicity check when every starting column keeps at least this
#: much of its norm in the final Krylov space (a hidden copy allows at most sqrt(1/2) = 0.71).
WARM_INSIDE = 0.9


@dataclasses.dataclass
class EigResult(Result):
    """Eigenpairs found by :func:`eigsh`.

    Attributes:
        eigenvalues: (k,) float64, ordered by ``which`` (LA: descending, SA: ascending,
            LM: descending magnitude, BE: ascending).
        eigenvectors: (n, k) array of the operator's backend (``None`` after JSON).
        residuals: (k,) norms ``||A v - lambda v||`` for unit ``v``: computed from a product
            of the returned vectors, or, where ``residuals_estimated``, Lanczos' estimate.
        converged: (k,) bool, residual (or, with ``stop_on="eigenvalue"``, estimated
            eigenvalue error) within the tolerance; never True for an estimated residual.
        num_matvecs: operator-vector products used.
        settings: the arguments that produced this result (method, k, which, tol, seed, ...).
        error_bounds: (k,) a bound on each eigenvalue's error: some eigenvalue of the
            operator lies within it (the residual, plus the rounding of the products;
            rigorous where the residual was computed).
        error_estimates: (k,) the sharper estimate ``||r||^2 / gap`` of each eigenvalue's
            error, the gap estimated from the other Ritz values (an estimate, not a bound:
            :func:`specops.lanczos.eigenvalue_errors`), at most ``error_bounds``.
        residuals_estimated: (k,) bool, residuals from the recurrence (no product was left
            in ``max_matvecs`` to verify them).
        data_stderr: (k,) each eigenvalue's standard error over data resampling
            (``eigsh(..., data_error=True)``), else None.
    """

    eigenvalues: np.ndarray
    eigenvectors: Any
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    settings: dict
    error_bounds: np.ndarray | None = None
    error_estimates: np.ndarray | None = None
    residuals_estimated: np.ndarray | None = None
    data_stderr: np.ndarray | None = None

    _NOT_SERIALIZED = ("eigenvectors",)

    @property
    def all_converged(self) -> bool:
        """Whether every returned pair met the tolerance."""
        return bool(np.all(self.converged))


@dataclasses.dataclass(frozen=True)
class _Run:
    """Pairs from one solver (Lanczos, dense, power), before they become an :class:`EigResult`."""

    values: np.ndarray
    vectors: Any
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    estimated: bool = False
    others: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    forms: Any = None  # the last product's (input block, per-batch forms), with data_error


class _LanczosRun(NamedTuple):
    """What :func:`_lanczos` returns: the pairs and the final basis (for the multiplicity check)."""

    run: _Run
    basis: Any


class _CopyCheck(NamedTuple):
    """What :func:`_complement_check` found: a missed copy, the products it took, whether it finished."""

    missed: bool
    products: int
    complete: bool


@dataclasses.dataclass
class _Plan:
    """How Lanczos starts: block size, start block, a warm start's columns, whether to check copies."""

    block: int
    start: Any
    warm: Any
    checked: bool


def eigsh(A: OperatorLike, k: int = 1, which: Which = "LA", method: EigMethod = "lanczos", tol: float = 1e-6,
          max_matvecs: int | None = None, seed: int = 0, block_size: int | None = None,
          max_basis: int | None = None, v0: Array | None = None, progress: bool | str = False,
          basis_memory: str | VectorOps = "device", stop_on: StopOn = "residual",
          data_error: bool = False) -> EigResult:
    """Extreme eigenvalues and eigenvectors of a symmetric operator.

    Args:
        A: a :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude, ``"BE"`` both ends (one more from the high end when k is odd).
        method: ``"lanczos"`` (block Lanczos) or ``"power"`` (deflated power iteration).
        tol: a pair converges when ``||A v - lambda v|| <= tol * max(|lambda|, 1e-3 ||A||)``
            (``||A||`` estimated by the largest Ritz value) or its residual is at the
            rounding level of the dtype; with ``stop_on="eigenvalue"``, when its estimated
            eigenvalue error (``error_estimates``) is.
        max_matvecs: budget of products; when it runs out the best estimates are returned
            with ``converged`` False where the tolerance was not met. Default
            ``max(1000, 100 k)``. Within the budget the Krylov space comes first: the ``k``
            products that verify the pairs are spent only when Lanczos' estimates have
            converged with that many left, else the pairs come back with the recurrence's
            residuals (``residuals_estimated``), not converged.
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
        v0: starting vector(s), (n,) or (n, j) in any array type the operator's backend
            takes (e.g. the eigenvectors of an earlier checkpoint, as SciPy's ``v0``).
            A block of ``j > 1`` columns is a *warm start*: single-vector Lanczos from the
            sum of its unit columns, and instead of the multiplicity check, a check that
            every column lies mostly (``WARM_INSIDE``) in the final Krylov space, which a
            copy of a repeated eigenvalue spanned by the columns cannot; if one does not,
            the multiplicity check runs as for a cold start (``settings["warm_start"]``
            says which). With ``block_size`` given, block Lanczos starts from the
            columns instead (``block_size >= j``; random columns fill the rest, drawn
            from ``seed``).
        progress: draw a progress bar (tqdm) of the products against ``max_matvecs``, with
            the current Ritz values and their largest residual; a string labels it.
            Silent on MPI ranks other than 0 (:mod:`specops.progress`).
        basis_memory: where the Lanczos basis (``max_basis`` vectors, most of the memory)
            is kept: ``"device"`` with the operator's vectors, ``"host"`` in host memory
            (its orthogonalization then runs on the host's cores, and one block per step
            crosses to the device and back), or any :class:`~specops.ops.VectorOps`.
            The results equal the default's to rounding.
        stop_on: ``"residual"`` (default): converge on the residuals (accurate vectors);
            ``"eigenvalue"``: on the estimated eigenvalue errors ``||r||^2 / gap``, which
            are typically far smaller than the residuals, so accurate eigenvalues take
            fewer products (docs/algorithms.md).
        data_error: also report each eigenvalue's standard error over data resampling
            (``data_stderr``), for a model-backed operator whose data is several batches:
            the delete-a-batch jackknife of the eigenvalues in the span of the returned
            vectors, from the per-batch forms ``V^T H_b V`` of the verification product
            (:mod:`specops.data_error`; docs/algorithms.md, "How much data?"). The
            verification product is then kept within ``max_matvecs`` whatever happens.

    The returned pairs are verified: one product of the ``k`` returned vectors (counted in
    ``num_matvecs``) gives their Rayleigh quotients and true residuals
    ``||A v - lambda v||``, and ``converged`` is judged from those (docs/algorithms.md);
    only when ``max_matvecs`` ends before Lanczos converged are the residuals the
    recurrence's (``residuals_estimated``, ``converged`` False).

    Returns:
        :class:`EigResult`.

    Raises:
        ValueError: bad arguments (unknown ``which``/``method``, ``k > n``, ...).
        NonFiniteError: a product returned NaN or infinity.

    Examples:
        The three largest and the two smallest eigenvalues of ``diag(1, ..., 100)``, with
        their eigenvectors (here NumPy arrays, since the operator is NumPy's):

        >>> import numpy as np
        >>> import specops as so
        >>> A = np.diag(np.arange(1.0, 101.0))
        >>> top = so.eigsh(A, k=3)
        >>> np.round(top.eigenvalues, 8), top.all_converged, top.eigenvectors.shape
        (array([100.,  99.,  98.]), True, (100, 3))
        >>> np.round(so.eigsh(A, k=2, which="SA").eigenvalues, 8)
        array([1., 2.])
    """
    A = _checks.symmetric_operator(A, "eigsh")
    model = data_error_model(A, "eigsh") if data_error else None
    A = A if model is None else model  # data given as one batch: split into sub-batches
    n = A.shape[0]
    k = _checks.positive_int("k", k)
    _checks.choice("which", which, WHICH)
    _checks.choice("method", method, METHODS)
    _checks.choice("stop_on", stop_on, STOP_ON)
    tol = _checks.positive_float("tol", tol)
    seed = check_seed(seed)
    if k > n:
        raise ValueError(f"k={k} eigenpairs requested from an operator of size {n}; k must be <= n")
    plan = _plan(A, k, which, method, block_size, v0)
    b = plan.block
    max_basis = _default_basis(n, k, b) if max_basis is None else _checks.positive_int("max_basis", max_basis)
    if max_basis < k + 2 * b:
        raise ValueError(f"max_basis={max_basis} is too small: it must be >= k + 2 * block_size = {k + 2 * b}")
    max_basis = min(max_basis, n - b)
    if max_matvecs is None:
        max_matvecs = max(1000, 100 * k)
    max_matvecs = _checks.positive_int("max_matvecs", max_matvecs)
    bar = progress_bar(progress, max_matvecs, "eigsh", comm=A)
    A = bar.track(A)
    store = basis_store(A.ops, basis_memory)
    settings = dict(k=k, which=which, method=method, tol=tol, max_matvecs=max_matvecs, seed=seed,
                    n=n, dtype=A.dtype.name, backend=A.backend, **engine_settings(A))
    if stop_on != "residual":
        settings["stop_on"] = stop_on
    if store != A.ops:
        settings["basis_memory"] = f"{store.name}:{store.device}"
    # only the verification product's forms are used: Lanczos' own products need none
    with model.recording_batches({VERIFY}) if model is not None else contextlib.nullcontext() as forms:
        if method == "power":
            if which == "BE":
                raise ValueError("method='power' supports which='LA', 'SA' or 'LM'; use method='lanczos' for 'BE'")
            if max_matvecs < 2 * k:
                raise ValueError(f"max_matvecs={max_matvecs} is too small for method='power': it needs at least "
                                 f"2 * k = {2 * k} (k products verify the result)")
            run = _power(A, k, which, tol, max_matvecs, seed, forms)
        elif max_basis < k + 2 * b:
            settings["method"] = "dense"
            run = _dense(A, k, which, tol, forms)
        else:
            settings.update(block_size=b, max_basis=max_basis)
            least = b * -(-k // b) + (k if model is not None else 0)
            if max_matvecs < least:
                raise ValueError(f"max_matvecs={max_matvecs} is too small: Lanczos needs at least {least} products "
                                 f"(block_size={b}{', and k for data_error' if model is not None else ''}) to hold "
                                 f"k={k} Ritz vectors")
            run = _lanczos_checked(A, plan, k, which, tol, max_matvecs, seed, max_basis, store, stop_on, settings,
                                   forms)
        if forms is not None and run.forms is None:
            run = dataclasses.replace(run, forms=forms.last)
    bar.close(eigenvalues=run.values, residual=float(np.max(run.residuals)))
    result = _result(A, run, settings)
    if forms is not None:
        settings["data_error"] = dict(batches=int(len(forms.weights)), samples=int(np.sum(forms.sizes)),
                                      method="delete-a-batch jackknife in span(V)")
        V, G = run.forms
        C = A.ops.to_numpy(A.ops.inner(V, run.vectors))  # the returned vectors in the product's block
        result.data_stderr = eigenvalue_stderr(np.einsum("ia,bij,jc->bac", C, G, C), forms.weights, forms.sizes,
                                               which)
    return result


def _plan(A, k, which, method, block_size, v0):
    """The block size and start of Lanczos, and whether the multiplicity check applies."""
    # LM: the complement's inner end lies in the bulk near 0, slow to settle; a block is cheaper
    start = None if v0 is None else _start_block(A, v0)
    checked = block_size is None and k > 1 and method == "lanczos" and which != "LM"
    warm = None  # a warm start's columns, checked against the final Krylov space
    if block_size is None:
        b = k if which == "LM" else 1
        if start is not None and start.shape[1] > 1 and which == "LM":
            b, checked = start.shape[1], False
        elif start is not None and start.shape[1] > 1:
            warm = start
            start = A.ops.combine(start, np.ones((start.shape[1], 1)))
    else:
        b = _checks.positive_int("block_size", block_size)
        if start is not None and start.shape[1] > b:
            raise ValueError(f"v0 has {start.shape[1]} columns, more than block_size={b}; pass at most "
                             "block_size starting vectors or a larger block_size")
    if start is not None and method != "lanczos":
        raise ValueError("v0 starts Lanczos; method='power' draws its own start vectors: use method='lanczos'")
    return _Plan(block=b, start=start, warm=warm, checked=checked)


def _lanczos_checked(A, plan, k, which, tol, max_matvecs, seed, max_basis, store, stop_on, settings, forms=None):
    """Lanczos from the plan, then the warm start's or the multiplicity check, and block Lanczos on a copy.

    With ``forms`` (per-batch forms being recorded) the verification product is reserved,
    and the run keeps its forms (the complement check's products come after it).
    """
    n = A.shape[0]
    reserve = forms is not None
    run, basis = _lanczos(A, k, which, tol, max_matvecs, seed, plan.block, max_basis, v0=plan.start, store=store,
                          stop_on=stop_on, reserve=reserve, forms=forms)
    if forms is not None:
        run = dataclasses.replace(run, forms=forms.last)
    checked = plan.checked
    if plan.warm is not None:
        inside = _inside(A, plan.warm, basis)
        checked = checked and not A.decide(bool(inside >= WARM_INSIDE))
        settings["warm_start"] = dict(columns=int(plan.warm.shape[1]), inside=inside, checked=bool(checked))
    if not (checked and run.converged.all()):
        return run
    check = _complement_check(A, run.values, basis, which, tol, max_matvecs - run.num_matvecs, seed, max_basis, store)
    del basis  # the block rerun below needs its own basis; free this one first
    settings["multiplicity_check"] = dict(products=int(check.products), missed=bool(check.missed),
                                          complete=bool(check.complete))
    spent = run.num_matvecs + check.products
    run = dataclasses.replace(run, num_matvecs=spent)
    if not check.missed:
        return run
    basis_k = min(_default_basis(n, k, k), n - k)
    if max_matvecs - spent < (2 * k if basis_k >= 3 * k else n):  # no budget for the copy
        return dataclasses.replace(run, converged=np.zeros_like(run.converged))
    # a repeated eigenvalue: block Lanczos finds every copy up to multiplicity k
    settings.update(block_size=k, max_basis=basis_k)
    if basis_k < 3 * k:
        settings["method"] = "dense"
        rerun = _dense(A, k, which, tol, forms)
    else:
        rerun, _ = _lanczos(A, k, which, tol, max_matvecs - spent, seed, k, basis_k, store=store, stop_on=stop_on,
                            reserve=reserve, forms=forms)
    return dataclasses.replace(rerun, num_matvecs=rerun.num_matvecs + spent,
                               forms=forms.last if forms is not None else None)


def _result(A, run, settings):
    """The :class:`EigResult` of a run, with its eigenvalue error bounds and estimates."""
    eps = float(np.finfo(A.ops.dtype).eps)
    values = np.asarray(run.values, dtype=np.float64)
    residuals = np.asarray(run.residuals, dtype=np.float64)
    anorm = float(np.abs(np.concatenate([values, run.others])).max())
    return EigResult(eigenvalues=values, eigenvectors=run.vectors, residuals=residuals,
                     converged=np.asarray(run.converged, dtype=bool), num_matvecs=int(run.num_matvecs),
                     settings=settings, error_bounds=residuals + ROUNDING * eps * anorm,
                     error_estimates=eigenvalue_errors(values, residuals, run.others, floor=eps * anorm),
                     residuals_estimated=np.full(len(values), bool(run.estimated)))


def _start_block(A, v0):
    """``v0`` as a native (n, j) block with unit, finite columns."""
    ops, n = A.ops, A.shape[0]
    X = ops.as_columns(ops.asarray(v0))
    if len(X.shape) != 2 or X.shape[0] != ops.local_rows(n) or X.shape[1] < 1:
        raise ValueError(f"v0 must have shape ({n},) or ({n}, j), got {tuple(X.shape)}")
    norms = ops.column_norms(X)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("v0 has a zero or non-finite column; pass nonzero finite starting vectors")
    return ops.scale_columns(X, 1.0 / norms)


def _inside(A, X, basis):
    """The smallest fraction of a column of ``X`` that lies in ``span(basis)``: ``min_j ||P x_j||``.

    A copy of a repeated eigenvalue hides from single-vector Lanczos in the complement of its
    Krylov space; columns spanning that eigenspace cannot all lie in the space: the one
    farthest from it keeps at least ``sqrt(1 - 1/m)`` outside for multiplicity ``m``, so at
    most ``sqrt(1/2)`` inside.
    """
    outside, _ = basis.orthogonalize(X)
    return float(np.sqrt(max(0.0, 1.0 - float(np.max(A.ops.column_norms(outside))) ** 2)))


def _default_basis(n, k, b):
    """``max(40, 3k + 6b)``; for ``n <= SMALL``, ``n - b``.

    Small operators grow the basis instead of restarting (at most ``n`` products, then exact).
    """
    return max(40, 3 * k + 6 * b, n - b if n <= SMALL else 0)


class _Complement:
    """``s (I - QQ^T) A (I - QQ^T) + low QQ^T``: ``s A`` on the complement of ``span(Q)``.

    ``s = -1`` turns the smallest end into the largest; ``low`` on ``span(Q)`` itself lies
    below the range searched, so that ``span(Q)`` never looks like a wanted eigenvalue.
    """

    def __init__(self, A, Q, sign, low):
        self.A, self.Q, self.sign, self.low, self.ops, self.shape = A, Q, sign, low, A.ops, A.shape

    def decide(self, value):
        return self.A.decide(value)

    def matmat(self, V):
        P, _ = self.Q.orthogonalize(V)
        return self.Q.orthogonalize(self.A.matmat(P))[0] * self.sign + (V - P) * self.low


def _complement_check(A, vals, basis, which, tol, budget, seed, max_basis, store=None):
    """Whether a wanted eigenvalue hides in the complement of single-vector Lanczos' basis.

    An eigenvector of a repeated eigenvalue that is orthogonal to the start vector's
    component in that eigenspace is orthogonal to the whole Krylov space, hence an
    eigenvector of ``A`` restricted to the complement of the basis. Lanczos on that
    restriction (per wanted end) runs until its extreme Ritz value ``mu`` either reaches the
    wanted range (missed: Ritz values are inner bounds) or it converges (to ``tol``, at most
    ``CHECK_TOL``) below that range, within its residual (nothing missed there).

    Returns:
        :class:`_CopyCheck`; ``complete`` is False when the budget ran out first.
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
        run, _ = _lanczos(_Complement(A, basis, sign, low), 1, "LA", check_tol, budget - used, seed, 1, max_basis,
                          stream="complement-check", stop=stop, store=store)
        mu, r, ok = run.values, run.residuals, run.converged
        used += run.num_matvecs
        near = mu[0] + max(r[0], check_tol * max(abs(edge), NORM_FLOOR * scale)) >= edge
        if A.decide(bool(mu[0] >= edge or (ok[0] and near))):  # reached the wanted range, or settled at its edge
            missed = True
        elif not ok[0]:
            complete = False
    return _CopyCheck(missed=missed, products=used, complete=complete)


def _dense(A, k, which, tol, forms=None):
    """Small operators: the dense matrix from n products, then ``eigh``."""
    mul = _checks.Products(A, forms)
    ops, n = A.ops, A.shape[0]
    M = gather(ops, mul(ops.identity_columns(n, 0, n), VERIFY))  # all rows on every rank if sharded
    M = (M + M.T) / 2
    theta, S = np.linalg.eigh(M)
    want = _wanted(theta, which, k)
    vecs = S[:, want]
    resid = np.linalg.norm(M @ vecs - vecs * theta[want], axis=0)
    anorm = float(np.abs(theta).max())
    ok = resid <= _thresholds(theta[want], tol, anorm, np.finfo(ops.dtype).eps)
    return _Run(values=theta[want], vectors=ops.from_numpy(vecs), residuals=resid, converged=ok,
                num_matvecs=mul.count, others=np.delete(theta, want))


def _lanczos(A, k, which, tol, max_matvecs, seed, b, max_basis, stream="lanczos", stop=None, v0=None,
             store=None, stop_on="residual", reserve=False, forms=None):
    """Thick-restart block Lanczos from ``v0`` (padded with seeded random columns to ``b``).

    Returns :class:`_LanczosRun`: the pairs as a :class:`_Run` and the final Lanczos basis.
    """
    ops, n = A.ops, A.shape[0]
    mul = _checks.Products(A, forms)
    drawn = 0

    def draw(m):
        nonlocal drawn
        X = ops.random(n, range(drawn, drawn + m), seed, distribution="normal", stream=stream)
        drawn += m
        return X

    start = draw(b) if v0 is None else v0
    if start.shape[1] < b:
        start = ops.concat([start, draw(b - start.shape[1])], axis=1)
    pairs = thick_restart(A, mul, k, which, tol, max_matvecs, start, max_basis, draw, stop=stop,
                          verify=stop is None, store=store, stop_on=stop_on, reserve=reserve)
    run = _Run(values=pairs.values, vectors=pairs.vectors, residuals=pairs.residuals, converged=pairs.converged,
               num_matvecs=mul.count, estimated=pairs.estimated, others=pairs.others)
    return _LanczosRun(run=run, basis=pairs.basis)


def _power(A, k, which, tol, max_matvecs, seed, forms=None):
    """Deflated power iteration; LA/SA by shifting the spectrum to make them dominant."""
    ops, n = A.ops, A.shape[0]
    mul = _checks.Products(A, forms)
    sign = -1.0 if which == "SA" else 1.0
    shift = 0.0
    if which != "LM":
        # the dominant eigenvalue bounds the spectrum; shifting by it makes LA (SA) dominant
        mu = _deflated_power(ops, n, lambda V: mul(V) * sign, 1, 1e-2, max_matvecs // 2, seed, "power-bound",
                             lambda: mul.count, decide=A.decide).values
        shift = 1.1 * abs(float(mu[0]))

    def apply(V):
        return mul(V) * sign + V * shift

    vecs = _deflated_power(ops, n, apply, k, tol, max_matvecs - k, seed, "power", lambda: mul.count,
                           shift=shift, decide=A.decide).vectors
    pairs = verified(ops, mul, vecs, which)  # judged from the true residuals
    anorm = max(float(np.abs(pairs.values).max()), shift / 1.1)
    ok = pairs.residuals <= _thresholds(pairs.values, tol, anorm, float(np.finfo(ops.dtype).eps))
    return _Run(values=pairs.values, vectors=pairs.vectors, residuals=pairs.residuals, converged=ok,
                num_matvecs=mul.count)


def _deflated_power(ops, n, apply, k, tol, budget, seed, stream, used, shift=0.0, decide=lambda x: x):
    """``k`` eigenpairs of ``apply`` one after another, each deflated against the ones found, as a :class:`_Run`."""
    eps = float(np.finfo(ops.dtype).eps)
    found, vals, resid, ok = None, [], [], []
    anorm = 0.0
    for i in range(k):
        v = ops.random(n, [i], seed, distribution="normal", stream=stream)
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
            if decide(bool(r <= _thresholds(np.array([theta - shift]), tol, anorm, eps)[0])):
                conv = True
                break
            v = w / max(ops.norm(w), np.finfo(np.float64).tiny)
        found = v if found is None else ops.concat([found, v], axis=1)
        vals.append(theta)
        resid.append(r)
        ok.append(conv)
    return _Run(values=np.array(vals), vectors=found, residuals=np.array(resid), converged=np.array(ok),
                num_matvecs=used())
