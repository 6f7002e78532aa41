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
