"""Stochastic Lanczos quadrature against exact spectra."""

import warnings

import numpy as np
import pytest

import specops as so
from spectra import symmetric_with_spectrum


def wasserstein_to_exact(d, lam):
    lo, hi = lam.min() - 1, lam.max() + 1
    xs = np.linspace(lo, hi, 20001)
    exact = np.searchsorted(np.sort(lam), xs, side="right") / lam.size
    with warnings.catch_warnings():  # a grid through the bulk meets unresolved points
        warnings.simplefilter("ignore", so.UnresolvedQueryWarning)
        cdf = d.cdf(xs)
    return np.trapezoid(np.abs(cdf - exact), xs), np.abs(cdf - exact).max()


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_cdf_close_to_exact_eigenvalue_cdf(distribution):
    rng = np.random.default_rng(4)
    lam = np.concatenate([rng.normal(0, 0.2, 380), rng.uniform(2, 6, 15), [25.0, 30.0]])
    A, lam = symmetric_with_spectrum(lam, seed=4)
    d = so.spectral_density(A, num_probes=30, num_steps=60, seed=0, distribution=distribution)
    w1, ks = wasserstein_to_exact(d, lam)
    assert w1 <= 0.01 * (lam.max() - lam.min())
    assert ks <= 0.1
    # the quadrature's trace is unbiased: within a few standard errors of the truth
    est, err = d.trace()
    assert abs(est - lam.sum()) <= 4 * err


def test_quadrature_is_exact_when_steps_reach_n():
    lam = np.array([-2.0, -0.5, 0.0, 1.0, 1.0, 3.0])
    A, lam = symmetric_with_spectrum(lam, seed=1)
    d = so.spectral_density(A, num_probes=50, num_steps=20, seed=2)
    assert d.settings["num_steps"] == 6
    w = d.weights.sum(axis=0)
    assert np.all(d.weights >= 0)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, rtol=1e-12)
    # every node with weight is an eigenvalue
    live = d.weights > 1e-12
    dist = np.abs(d.nodes[live][:, None] - lam[None, :]).min(axis=1)
    assert dist.max() < 1e-9
    assert w.sum() == pytest.approx(50.0)
    # nodes stay inside the spectrum
    assert d.nodes.min() >= lam.min() - 1e-9 and d.nodes.max() <= lam.max() + 1e-9


def test_density_integrates_to_one_and_sigma_is_a_standard_deviation():
    d = so.spectral_density(np.diag([0.0, 10.0]), num_probes=1, num_steps=2, seed=0)
    grid = np.linspace(-20, 30, 200001)
    rho = d.evaluate(grid, sigma=0.5)
    assert rho.shape == grid.shape
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-9)
    # a single unit-weight Gaussian of std 0.5 at 0 (with weight w0): check its width
    w0 = d.weights[0][np.argmin(np.abs(d.nodes[0]))]
    mask = grid < 5
    mean = np.trapezoid(grid[mask] * rho[mask], grid[mask]) / w0
    var = np.trapezoid((grid[mask] - mean) ** 2 * rho[mask], grid[mask]) / w0
    assert np.sqrt(var) == pytest.approx(0.5, rel=1e-6)
    g = d.default_grid()
    assert np.trapezoid(d.evaluate(), g) == pytest.approx(1.0, abs=1e-6)
    assert np.array_equal(d.evaluate(), d.evaluate(g))
    pts = np.array([[0.0, 10.0], [5.0, -3.0]])  # any shape in, the same shape out
    assert d.evaluate(pts, sigma=0.5).shape == (2, 2)
    assert d.evaluate(pts, sigma=0.5)[0, 0] == pytest.approx(d.evaluate(np.array([0.0]), sigma=0.5)[0])


def test_small_and_degenerate_operators():
    d = so.spectral_density(np.array([[3.0]]), num_probes=3, num_steps=10)
    np.testing.assert_allclose(d.nodes, 3.0)
    np.testing.assert_allclose(d.weights, 1.0)
    d = so.spectral_density(np.zeros((5, 5)) + np.eye(5) * 2, num_probes=2, num_steps=4)
    assert np.allclose(d.nodes[d.weights > 0], 2.0)


def test_json_round_trip_and_plot(tmp_path):
    A, _ = symmetric_with_spectrum(np.linspace(-1, 1, 40), seed=0)
    d = so.spectral_density(A, num_probes=3, num_steps=8, seed=9)
    back = so.SpectralDensity.from_json(d.to_json())
    np.testing.assert_array_equal(back.nodes, d.nodes)
    np.testing.assert_array_equal(back.weights, d.weights)
    assert back.settings == d.settings and back.num_matvecs == 24
    import matplotlib

    matplotlib.use("Agg")
    ax = d.plot()
    ax.figure.savefig(tmp_path / "esd.png")
    assert (tmp_path / "esd.png").stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_probes"):
        so.spectral_density(np.eye(3), num_probes=0)
    with pytest.raises(ValueError, match="sigma"):
        so.spectral_density(np.eye(3)).evaluate(sigma=0)


def _hessian_like(n=300, seed=3):
    rng = np.random.default_rng(seed)
    lam = np.concatenate([np.abs(rng.normal(0, 0.05, n - 6)) - 0.01, np.geomspace(2.0, 60.0, 6)])
    return symmetric_with_spectrum(lam, seed=seed)


def test_probes_in_groups_give_the_same_density():
    A, _ = _hessian_like()
    full = so.spectral_density(A, num_probes=7, num_steps=40, seed=1)
    grouped = so.spectral_density(A, num_probes=7, num_steps=40, seed=1, probes_at_once=3)
    assert full.settings["probes_at_once"] == 7 and grouped.settings["probes_at_once"] == 3
    assert grouped.settings["basis_bytes"] == 40 * 300 * 3 * 8
    assert grouped.num_matvecs == full.num_matvecs == 7 * 40
    np.testing.assert_allclose(grouped.nodes, full.nodes, rtol=0, atol=1e-11)
    np.testing.assert_allclose(grouped.weights, full.weights, rtol=0, atol=1e-11)


@pytest.mark.parametrize("window", [2, 5])
def test_reorthogonalization_window_keeps_moments_and_cdf(window):
    from specops.random import probes

    A, lam = _hessian_like()
    d = so.spectral_density(A, num_probes=5, num_steps=40, seed=2, reorth_window=window)
    full = so.spectral_density(A, num_probes=5, num_steps=40, seed=2)
    assert d.settings["reorth_window"] == window and full.settings["reorth_window"] is None
    assert d.settings["basis_bytes"] == window * 300 * 5 * 8
    V = probes(300, range(5), 2, distribution="rademacher", stream="slq")
    V = V / np.linalg.norm(V, axis=0)
    W = V
    for k in range(1, 9):  # Gauss quadrature moments against the same probes' v^T A^k v
        W = A @ W
        exact = np.einsum("np,np->p", V, W)
        est = np.sum(d.weights * d.nodes**k, axis=1)
        np.testing.assert_allclose(est, exact, rtol=0, atol=1e-10 * lam.max() ** k)
    assert np.all(d.weights >= 0)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, rtol=1e-12)
    w1, _ = wasserstein_to_exact(d, lam)
    w1_full, _ = wasserstein_to_exact(full, lam)
    assert w1 <= 1.5 * w1_full + 1e-3 * (lam.max() - lam.min())
    # every step counts: before the Ritz values converge (no loss of orthogonality), the
    # 15-node quadrature is exact to degree 29
    A, lam = symmetric_with_spectrum(np.linspace(1.0, 2.0, 300), seed=5)
    d = so.spectral_density(A, num_probes=3, num_steps=15, seed=2, reorth_window=window)
    V = probes(300, range(3), 2, distribution="rademacher", stream="slq")
    V = W = V / np.linalg.norm(V, axis=0)
    for k in range(1, 30):
        W = A @ W
        np.testing.assert_allclose(np.sum(d.weights * d.nodes**k, axis=1), np.einsum("np,np->p", V, W), rtol=1e-9)


def test_memory_budget_chooses_groups_then_a_window():
    A, _ = _hessian_like()
    one = 40 * 300 * 8  # one probe's full basis
    d = so.spectral_density(A, num_probes=6, num_steps=40, memory_budget=2 * one + 1)
    assert d.settings["probes_at_once"] == 2 and d.settings["reorth_window"] is None
    assert d.settings["memory_budget"] == 2 * one + 1
    with pytest.warns(UserWarning, match="reorthogonalizing against the last 10 vectors"):
        d = so.spectral_density(A, num_probes=6, num_steps=40, memory_budget=10 * 300 * 8)
    assert d.settings["probes_at_once"] == 1 and d.settings["reorth_window"] == 10
    # the window costs no accuracy in the quadrature's moments here
    ref = so.spectral_density(A, num_probes=6, num_steps=40)
    np.testing.assert_allclose(d.trace()[0], ref.trace()[0], rtol=1e-12)
    # an explicit window at or above the steps is full reorthogonalization
    assert so.spectral_density(A, num_probes=2, num_steps=10, reorth_window=50).settings["reorth_window"] is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(reorth_window=1), "reorth_window"),
    (dict(probes_at_once=0), "probes_at_once"),
    (dict(memory_budget=-5), "memory_budget"),
])
def test_bad_memory_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        so.spectral_density(np.eye(4), num_probes=2, num_steps=3, **kwargs)


def cluster_at_zero(n=600, seed=0):
    """A Hessian-like spectrum: 44 % of the eigenvalues tiny and negative, 40 % tiny and positive."""
    rng = np.random.default_rng(seed)
    lam = np.concatenate([-np.abs(rng.normal(0, 1e-3, 264)), np.abs(rng.normal(0, 1e-3, 240)),
                          rng.uniform(0.05, 2, n - 510), [5, 10, 20, 40, 60, 80]])
    return symmetric_with_spectrum(lam, seed=1)


def as_backend(A, dtype, backend):
    """``A`` as a dense matrix of ``backend`` in ``dtype``, wrapped as an operator."""
    A = A.astype(dtype)
    if backend == "torch":
        A = pytest.importorskip("torch").from_numpy(A)
    elif backend == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)   # as the other JAX tests: float64 arrays stay float64
        A = jax.numpy.asarray(A)
    op = so.aslinearoperator(A)
    assert op.dtype == dtype and op.backend == backend, (op.dtype, op.backend)
    return op


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cdf_at_a_cluster_is_flagged_and_bracketed(dtype, backend):
    """cdf(0) beside a cluster at zero: a 0.84 against the dense 0.44, warned, the truth in the bracket."""
    A, lam = cluster_at_zero()
    truth = np.mean(lam <= 0)
    assert truth == pytest.approx(0.44)
    d = so.spectral_density(as_backend(A, dtype, backend), num_probes=8, num_steps=20, seed=0)
    with pytest.warns(so.UnresolvedQueryWarning, match=r"x = 0 .*anywhere in \[0\.000, 0\.8"):
        estimate, stderr = d.cdf(0.0, return_stderr=True)
    # the bias is the quadrature's: the probes' standard error alone does not cover it
    assert abs(estimate - truth) > 10 * stderr
    f = d.negative_fraction()
    assert not f.resolved and f.estimate == pytest.approx(float(estimate)) and f.stderr == pytest.approx(stderr)
    assert f.lower - 3 * f.stderr <= truth <= f.upper + 3 * f.stderr
    assert f.count() == pytest.approx((600 * f.estimate, 600 * f.stderr))
    assert "unresolved" in str(f)
    # more steps narrow the bracket around the truth
    d = so.spectral_density(as_backend(A, dtype, backend), num_probes=8, num_steps=80, seed=0)
    g = d.negative_fraction()
    assert g.upper - g.lower < f.upper - f.lower
    assert g.lower - 3 * g.stderr <= truth <= g.upper + 3 * g.stderr


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fraction_brackets_the_exact_cdf_where_resolved(dtype):
    rng = np.random.default_rng(4)
    lam = np.concatenate([rng.normal(0, 0.2, 380), rng.uniform(2, 6, 15), [25.0, 30.0]])
    A, lam = symmetric_with_spectrum(lam, seed=4)
    d = so.spectral_density(so.aslinearoperator(A.astype(dtype)), num_probes=30, num_steps=60, seed=0)
    for x in [-0.3, 0.3, 1.0, 4.0]:
        f = d.fraction_below(x)
        truth = np.mean(lam <= x)
        assert f.resolved, (x, f)
        assert f.lower - 3 * f.stderr <= truth <= f.upper + 3 * f.stderr, (x, truth, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, errs = d.cdf(np.array([[-0.3, 0.3], [1.0, 4.0]]), return_stderr=True)
    assert values.shape == errs.shape == (2, 2)
    smooth, smooth_err = d.cdf(np.array([0.3, 1.0]), sigma=0.05, return_stderr=True)
    assert smooth.shape == smooth_err.shape == (2,) and np.all(smooth_err > 0)


def test_cdf_stderr_is_the_spread_of_exact_probe_quadratic_forms():
    """With num_steps = n each probe's quadrature is exact: the stderr is that of Hutchinson's
    estimate of tr(1(A <= x)) / n, whose variance for Rademacher probes is 2 sum_{i != j} P_ij^2 / n^2."""
    n, p, x = 40, 400, 0.5
    A, lam = symmetric_with_spectrum(np.random.default_rng(2).uniform(-1, 2, n), seed=2)
    d = so.spectral_density(A, num_probes=p, num_steps=n, seed=3)
    w, Q = np.linalg.eigh(A)
    P = (Q[:, w <= x]) @ Q[:, w <= x].T
    variance = 2 * (np.sum(P**2) - np.sum(np.diag(P) ** 2)) / n**2
    estimate, stderr = d.cdf(x, return_stderr=True)
    assert stderr == pytest.approx(np.sqrt(variance / p), rel=0.15)
    assert abs(estimate - np.mean(lam <= x)) <= 4 * stderr
    one = so.spectral_density(A, num_probes=1, num_steps=10, seed=3)
    assert np.isinf(one.fraction_below(x).stderr)


def test_plot_states_its_width_normalisation_and_axis_range():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = so.spectral_density(np.diag(np.arange(1.0, 101.0)), num_probes=2, num_steps=10, seed=0)
    ax = d.plot(sigma=0.25)
    peak = d.evaluate(d.default_grid(0.25), 0.25).max()
    assert "sigma = 0.25" in ax.get_title() and "integrates to 1" in ax.get_title()
    assert ax.get_ylim()[0] == pytest.approx(peak * so.density.LOG_PLOT_RANGE)
    plt.close(ax.figure)
