"""Stochastic Lanczos quadrature against exact spectra."""

import numpy as np
import pytest

import specops as so
from spectra import symmetric_with_spectrum


def wasserstein_to_exact(d, lam):
    lo, hi = lam.min() - 1, lam.max() + 1
    xs = np.linspace(lo, hi, 20001)
    exact = np.searchsorted(np.sort(lam), xs, side="right") / lam.size
    return np.trapezoid(np.abs(d.cdf(xs) - exact), xs), np.abs(d.cdf(xs) - exact).max()


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_cdf_close_to_exact_eigenvalue_cdf(kind):
    rng = np.random.default_rng(4)
    lam = np.concatenate([rng.normal(0, 0.2, 380), rng.uniform(2, 6, 15), [25.0, 30.0]])
    A, lam = symmetric_with_spectrum(lam, seed=4)
    d = so.spectral_density(A, num_probes=30, num_steps=60, seed=0, kind=kind)
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
    V = probes(300, range(5), 2, kind="rademacher", stream="slq")
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
    V = probes(300, range(3), 2, kind="rademacher", stream="slq")
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
