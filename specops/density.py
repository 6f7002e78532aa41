"""Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``num_steps`` Lanczos steps give a tridiagonal ``T`` whose
eigenvalues ``theta_j`` (nodes) and squared first eigenvector components ``w_j``
(weights) form a Gauss quadrature of the spectral measure ``v^T delta(A - x) v``;
averaged over probes, of the density ``(1/n) sum_i delta(x - lambda_i)`` (Golub &
Meurant 1994; Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).
Probes run side by side: each Lanczos step is one ``matmat`` of the probes of a group
(all of them when their bases fit in the memory budget), and each probe's basis is kept
orthogonal (full reorthogonalization, or against a window of its last vectors).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.linalg import eigh_tridiagonal
from scipy.special import erf

from specops.checks import engine_settings
from specops import _checks
from specops.lanczos import basis_store, probe_lanczos
from specops.operator import OperatorLike
from specops.ops import VectorOps
from specops.progress import bar as progress_bar
from specops.random import Distribution, check_distribution, check_seed
from specops.results import Result

#: Default Gaussian width as a fraction of the spread of the quadrature nodes.
SIGMA_FRACTION = 0.005
#: Default number of grid points.
GRID_POINTS = 1001
#: The log-scale plot's axis spans this fraction of the density's peak to the peak.
LOG_PLOT_RANGE = 1e-8
#: A query is unresolved when the quadrature's bracket of the cdf there is wider than this
#: many resolution cells of ``1 / num_steps`` (the mass one node carries on a smooth
#: spectrum): the nodes next to it stand for a cluster of eigenvalues.
UNRESOLVED_WIDTH = 4.0


class UnresolvedQueryWarning(UserWarning):
    """A query of a spectral density falls where its quadrature cannot resolve the spectrum."""


def _stderr(per_probe: np.ndarray) -> np.ndarray:
    """Standard error of the mean over the last axis (probes); ``inf`` for one probe."""
    p = per_probe.shape[-1]
    if p < 2:
        return np.full(per_probe.shape[:-1], np.inf)
    return np.std(per_probe, axis=-1, ddof=1) / np.sqrt(p)


@dataclasses.dataclass
class SpectralFraction:
    """The fraction of eigenvalues ``<= x`` read off a spectral density, with its uncertainty.

    Attributes:
        x: the query point.
        estimate: the quadrature's fraction (mean over probes).
        stderr: its standard error over probes.
        lower: lower end of the quadrature's resolution bracket (see
            :meth:`SpectralDensity.fraction_below`).
        upper: upper end of that bracket.
        n: the operator's size.
        resolution_width: the bracket width above which the query is unresolved.
    """

    x: float
    estimate: float
    stderr: float
    lower: float
    upper: float
    n: int
    resolution_width: float

    @property
    def resolved(self) -> bool:
        """Whether the bracket is no wider than the steps' resolution (no cluster at ``x``)."""
        return self.upper - self.lower <= self.resolution_width

    def count(self) -> tuple[float, float]:
        """The number of eigenvalues ``<= x`` and its standard error (``n`` times the fraction's)."""
        return self.n * self.estimate, self.n * self.stderr

    def __str__(self) -> str:
        text = f"{self.estimate:.3f} ± {self.stderr:.3f} (bracket [{self.lower:.3f}, {self.upper:.3f}]"
        return text + (")" if self.resolved else ", unresolved: a cluster of eigenvalues at x)")



@dataclasses.dataclass
class SpectralDensity(Result):
    """Quadrature nodes and weights of a spectral density, one row per probe.

    Attributes:
        nodes: (num_probes, num_steps) Ritz values; rows of probes whose Krylov space
            was exhausted early are padded with weight-0 nodes.
        weights: (num_probes, num_steps) non-negative weights, each row summing to 1.
        num_matvecs: operator-vector products used.
        settings: n, num_probes, num_steps, seed, probe distribution.
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_matvecs: int
    settings: dict

    def default_sigma(self) -> float:
        """``0.005 * (max node - min node)``, or ``1e-3 * max(|node|, 1)`` for a single point."""
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        if hi - lo > 0:
            return SIGMA_FRACTION * (hi - lo)
        return 1e-3 * max(abs(hi), 1.0)

    def default_grid(self, sigma: float | None = None) -> np.ndarray:
        """1001 points from 5 sigma below the smallest node to 5 sigma above the largest."""
        sigma = self.default_sigma() if sigma is None else sigma
        return np.linspace(self.nodes.min() - 5 * sigma, self.nodes.max() + 5 * sigma, GRID_POINTS)

    def evaluate(self, grid: npt.ArrayLike | None = None, sigma: float | None = None) -> np.ndarray:
        """The density smoothed by a Gaussian kernel, at the points ``grid``.

        As ``scipy.stats.gaussian_kde.evaluate``: ``np.trapezoid(esd.evaluate(g), g)`` is
        about 1 for a grid covering the spectrum.

        Args:
            grid: points to evaluate at, any shape (default :meth:`default_grid`).
            sigma: the kernel's standard deviation (default :meth:`default_sigma`).

        Returns:
            The density at ``grid``, an array of ``grid``'s shape; it integrates to 1 over
            the real line.
        """
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = self.default_grid(sigma) if grid is None else np.asarray(grid, dtype=np.float64)
        z = (grid.reshape(-1)[:, None] - self.nodes.ravel()[None, :]) / sigma
        kernel = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))
        return (kernel @ self.weights.ravel() / self.nodes.shape[0]).reshape(grid.shape)

    def cdf(self, x: npt.ArrayLike, sigma: float = 0.0, *, return_stderr: bool = False) -> Any:
        """The estimated fraction of eigenvalues ``<= x`` (and its standard error over probes).

        Each probe's quadrature has only ``num_steps`` nodes: next to a cluster of
        eigenvalues (the bulk at zero of a Hessian) the step function jumps by the mass of a
        whole cluster at once, a bias that more probes do not reduce. Where that happens at
        a point of ``x`` (the bracket of :meth:`fraction_below` wider than :data:`UNRESOLVED_WIDTH`
        resolution cells) a :class:`UnresolvedQueryWarning` says so; :meth:`fraction_below`
        gives the bracket itself.

        Args:
            x: the points, any shape.
            sigma: ``0`` for the step function of the quadrature nodes; a positive width
                for the cumulative distribution of the Gaussian-smoothed density.
            return_stderr: also return the standard error over probes (the spread of the
                probes' own quadratures divided by ``sqrt(num_probes)``; ``inf`` for one probe).

        Returns:
            The fractions, an array of ``x``'s shape; with ``return_stderr``, the pair
            ``(fractions, stderrs)``.
        """
        x = np.asarray(x, dtype=np.float64)
        if sigma != 0:
            per_probe = self._cdf_per_probe(x, sigma)
            estimate = per_probe.mean(axis=-1)
        else:
            per_probe, lower, upper = self._steps(x)
            estimate, lower, upper = per_probe.mean(axis=-1), lower.mean(axis=-1), upper.mean(axis=-1)
            wide = (upper - lower) > UNRESOLVED_WIDTH / self.nodes.shape[1]
            if np.any(wide):
                first = x[wide].ravel()[0]
                lo, hi = lower[wide].ravel()[0], upper[wide].ravel()[0]
                warnings.warn(
                    f"SpectralDensity.cdf: at x = {first:.4g} the quadrature cannot resolve the "
                    f"eigenvalues near x: the probes' nodes there carry so much mass that the "
                    f"fraction below x lies anywhere in [{lo:.3f}, {hi:.3f}] (the estimate is "
                    f"{float(np.asarray(estimate)[wide].ravel()[0]):.3f}). More num_steps narrow it; "
                    "SpectralDensity.fraction_below(x) gives the bracket and the standard error",
                    UnresolvedQueryWarning, stacklevel=2)
        if not return_stderr:
            return estimate
        return estimate, _stderr(per_probe)

    def fraction_below(self, x: float) -> SpectralFraction:
        """The fraction of eigenvalues ``<= x`` with its standard error and resolution bracket.

        The bracket comes from the Chebyshev-Markov-Stieltjes inequalities of Gauss
        quadrature (Karlin & Shapley 1953; Golub & Meurant 2010, sec. 6.3): for each
        probe's measure ``v^T 1(A <= x) v`` the true value lies between the quadrature's
        step function less the weight of the nearest node at or below ``x`` and plus the
        weight of the nearest node above ``x``. Averaged over probes it bounds, in exact
        arithmetic, the value that infinitely many Lanczos steps on the same probes would
        give; the standard error covers the probes' own randomness.

        Args:
            x: the point.

        Returns:
            A :class:`SpectralFraction`; ``.count()`` gives the number of eigenvalues.
        """
        x = float(x)
        per_probe, lower, upper = self._steps(np.asarray(x))
        return SpectralFraction(x=x, estimate=float(per_probe.mean()), stderr=float(_stderr(per_probe)),
                                lower=float(lower.mean()), upper=float(upper.mean()), n=int(self.settings["n"]),
                                resolution_width=UNRESOLVED_WIDTH / self.nodes.shape[1])

    def negative_fraction(self) -> SpectralFraction:
        """:meth:`fraction_below` at 0: the fraction of eigenvalues ``<= 0``, with its uncertainty.

        A quadrature cannot tell an eigenvalue at 0 from one at ``-1e-9``: the bracket says
        how much mass sits at the boundary.
        """
        return self.fraction_below(0.0)

    def _cdf_per_probe(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """The cdf of each probe's quadrature at ``x``: shape ``x.shape + (num_probes,)``."""
        if sigma == 0:
            return self._steps(x)[0]
        return np.stack([0.5 * (1 + erf((x[..., None] - nodes) / (sigma * np.sqrt(2)))) @ weights
                         for nodes, weights in zip(self.nodes, self.weights)], axis=-1)

    def _steps(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each probe's step cdf at ``x`` and its Chebyshev-Markov-Stieltjes bounds (:meth:`fraction_below`).

        Returns three arrays of shape ``x.shape + (num_probes,)``: the quadrature's cdf, it
        less the weight of the nearest node at or below ``x``, it plus the weight of the
        nearest node above.
        """
        cdf, lower, upper = [], [], []
        for nodes, weights in zip(self.nodes, self.weights):
            live = weights > 0  # rows of exhausted probes are padded with weight-0 nodes
            order = np.argsort(nodes[live], kind="stable")
            nodes_sorted, w = nodes[live][order], weights[live][order]
            cum = np.concatenate([[0.0], np.cumsum(w)])
            k = np.searchsorted(nodes_sorted, x, side="right")  # nodes <= x
            w_padded = np.concatenate([[0.0], w, [0.0]])
            cdf.append(cum[k])
            lower.append(np.maximum(cum[k] - w_padded[k], 0.0))
            upper.append(np.minimum(cum[k] + w_padded[k + 1], 1.0))
        return np.stack(cdf, axis=-1), np.stack(lower, axis=-1), np.stack(upper, axis=-1)

    def trace(self) -> tuple[float, float]:
        """The trace estimate ``n * mean_probes sum_j w_j theta_j`` and its standard error."""
        n = self.settings["n"]
        per_probe = n * np.sum(self.weights * self.nodes, axis=1)
        p = len(per_probe)
        err = float(np.std(per_probe, ddof=1) / np.sqrt(p)) if p > 1 else float("inf")
        return float(per_probe.mean()), err

    def plot(self, ax: Any = None, sigma: float | None = None, grid: npt.ArrayLike | None = None,
             log: bool = True) -> Any:
        """Plot the density (log scale by default); returns the matplotlib axes.

        The title states the Gaussian kernel's width ``sigma`` and the normalisation (the
        density integrates to 1 over the eigenvalue axis); on a log scale the axis starts at
        :data:`LOG_PLOT_RANGE` times the peak (the Gaussian tails below it are cut by the
        axis, not drawn as a floor).
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        sigma = self.default_sigma() if sigma is None else sigma
        grid = self.default_grid(sigma) if grid is None else np.asarray(grid, dtype=np.float64)
        density = self.evaluate(grid, sigma)
        note = f"Gaussian kernel sigma = {sigma:.3g}; the density integrates to 1"
        if log:
            peak = float(density.max())
            ax.semilogy(grid, np.maximum(density, np.finfo(float).tiny))
            if peak > 0:
                ax.set_ylim(peak * LOG_PLOT_RANGE, peak * 3)
                note += f"; axis from {LOG_PLOT_RANGE:.0e} x peak"
        else:
            ax.plot(grid, density)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (per unit eigenvalue)")
        ax.set_title(f"spectral density (SLQ, {self.nodes.shape[0]} probes x {self.nodes.shape[1]} steps)\n{note}",
                     fontsize=9)
        return ax


def spectral_density(A: OperatorLike, num_probes: int = 10, num_steps: int = 64, seed: int = 0,
                     distribution: Distribution = "rademacher", progress: bool | str = False, *,
                     probes_at_once: int | None = None, reorth_window: int | None = None,
                     memory_budget: int | None = None, basis_memory: str | VectorOps = "device") -> SpectralDensity:
    """Estimate the eigenvalue spectral density of a symmetric operator by SLQ.

    The Lanczos bases take ``probes_at_once * window * n`` numbers (``window = num_steps``
    with full reorthogonalization). By default as many probes run side by side as fit in
    ``memory_budget`` (the rest run in later groups, with the same probes and the same
    result); only when a single probe's full basis does not fit is the
    reorthogonalization window shortened to what fits, with a warning (accuracy cost:
    docs/algorithms.md).

    Args:
        A: a :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        num_probes: independent probe vectors (the estimate's variance falls as 1/num_probes).
        num_steps: Lanczos steps per probe (nodes per probe; capped at n).
        seed: seed of the probes.
        distribution: probe distribution, ``"rademacher"`` or ``"normal"``.
        progress: draw a progress bar (tqdm) of the products (all probes advance together,
            one Lanczos step per product block), ending with the estimated spectral range
            and trace; a string labels it. Silent on MPI ranks other than 0.
        probes_at_once: probes run side by side (one ``matmat`` of that many columns per
            step); default: as many as the budget allows, at most ``num_probes``.
        reorth_window: reorthogonalize each probe against only its last ``reorth_window``
            Lanczos vectors (``>= 2``) instead of all of them; default: full
            reorthogonalization when one probe's basis fits in the budget.
        memory_budget: bytes allowed for the bases; default half the free memory of the
            memory that keeps them (:meth:`~specops.ops.VectorOps.free_memory`).
        basis_memory: where the bases are kept: ``"device"`` with the operator's vectors,
            ``"host"`` in host memory (their orthogonalization then runs on the host, and
            one block of probes per step crosses to the device and back), or any
            :class:`~specops.ops.VectorOps`. The result equals the default's to rounding.

    Returns:
        :class:`SpectralDensity` (``num_probes * num_steps`` products); its ``settings``
        say the ``probes_at_once``, ``reorth_window`` (``None``: full) and ``basis_bytes``
        used.

    Raises:
        ValueError: bad arguments, or an operator marked non-symmetric.
        NonFiniteError: a product returned NaN or infinity.

    Examples:
        The spectrum of ``diag(1, ..., 100)``: 30 of its 100 eigenvalues are <= 30, and
        the quadrature's weighted nodes give the trace, 5050 (exactly: Rademacher probes
        of a diagonal matrix have no variance).

        >>> import numpy as np
        >>> import specops as so
        >>> esd = so.spectral_density(np.diag(np.arange(1.0, 101.0)), num_probes=20, num_steps=30)
        >>> print(f"{float(esd.cdf(30.5)):.2f}")
        0.30
        >>> f = esd.fraction_below(30.5)   # with its stderr and the quadrature's bracket
        >>> print(f"{f.lower:.2f} <= 0.30 <= {f.upper:.2f}, resolved: {f.resolved}")
        0.26 <= 0.30 <= 0.35, resolved: True
        >>> estimate, stderr = esd.trace()
        >>> print(f"{estimate:.6f}")
        5050.000000
    """
    A = _checks.symmetric_operator(A, "spectral_density")
    num_probes = _checks.positive_int("num_probes", num_probes)
    num_steps = _checks.positive_int("num_steps", num_steps)
    seed, distribution = check_seed(seed), check_distribution(distribution)
    ops, n = A.ops, A.shape[0]
    steps = min(num_steps, n)
    p = num_probes
    store = basis_store(ops, basis_memory)
    group, window, budget = _plan(store, n, p, steps, probes_at_once, reorth_window, memory_budget, A.decide)
    bar = progress_bar(progress, num_probes * steps, "spectral_density", comm=A)
    A = bar.track(A)
    mul = _checks.Products(A)
    alpha, beta, length = np.zeros((p, steps)), np.zeros((p, steps)), np.zeros(p, dtype=int)
    for first in range(0, p, group):
        cols = range(first, min(first + group, p))
        Z = ops.random(n, cols, seed, distribution=distribution, stream="slq")
        V = ops.scale_columns(Z, 1.0 / ops.column_norms(Z))
        del Z
        alpha[cols], beta[cols], length[cols] = probe_lanczos(A, mul, V, steps, window, store=store)
        del V
    nodes, weights = np.zeros((p, steps)), np.zeros((p, steps))
    for i in range(p):
        m = length[i]
        theta, U = eigh_tridiagonal(alpha[i, :m], beta[i, : m - 1])
        nodes[i, :m], weights[i, :m] = theta, U[0] ** 2
        nodes[i, m:] = theta[-1]
    settings = dict(n=n, num_probes=p, num_steps=steps, seed=seed, distribution=distribution, backend=A.backend,
                    **engine_settings(A),
                    probes_at_once=group, reorth_window=window,
                    basis_bytes=basis_bytes(n, group, steps if window is None else window, ops.dtype),
                    memory_budget=budget)
    if store != ops:
        settings["basis_memory"] = f"{store.name}:{store.device}"
    out = SpectralDensity(nodes=nodes, weights=weights, num_matvecs=mul.count, settings=settings)
    bar.close(range=[nodes.min(), nodes.max()], trace=out.trace()[0])
    return out


def basis_bytes(n: int, probes: int, window: int, dtype: npt.DTypeLike) -> int:
    """Bytes of SLQ's Lanczos bases: ``window`` vectors of length ``n`` for each of ``probes`` probes."""
    return int(window) * int(n) * int(probes) * np.dtype(dtype).itemsize


def _plan(ops, n, p, steps, probes_at_once, reorth_window, memory_budget, decide=lambda value: value):
    """``(probes_at_once, reorth_window or None, budget)`` for SLQ within the memory budget.

    The default budget comes from this process's free memory, which differs between ranks;
    ``decide`` (the operator's: rank 0's value on every rank) makes the plan, and with it
    the number and shape of the collective products, the same everywhere.
    """
    if probes_at_once is not None:
        probes_at_once = min(_checks.positive_int("probes_at_once", probes_at_once), p)
    if reorth_window is not None:
        reorth_window = _checks.positive_int("reorth_window (vectors kept, 2 at least)", reorth_window, minimum=2)
        reorth_window = None if reorth_window >= steps else reorth_window
    if memory_budget is None:
        budget = int(decide(int(ops.free_memory() // 2)))
    else:
        budget = _checks.positive_int("memory_budget", memory_budget)
    one = basis_bytes(n, 1, 1, ops.dtype)  # one vector
    group = probes_at_once or 1
    if reorth_window is None and group * one * steps > budget:
        reorth_window = int(max(2, budget // (group * one)))
        warnings.warn(
            f"spectral_density: the full Lanczos bases of {group} probe(s) ({steps} x {n} numbers each, "
            f"{_size(group * one * steps)}) exceed the memory budget ({_size(budget)}); "
            f"reorthogonalizing against the last {reorth_window} vectors only. Pass reorth_window= "
            "to choose, or memory_budget= to allow more memory",
            stacklevel=3,
        )
    if probes_at_once is None:
        probes_at_once = int(min(p, max(1, budget // (one * (steps if reorth_window is None else reorth_window)))))
    return probes_at_once, reorth_window, budget


def _size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"
