"""trace_function, logdet and funm against dense eigendecompositions, np.linalg.slogdet and
scipy.linalg.funm / expm: every backend, float32 and float64; the standard errors, the
Gauss-Radau bounds and funm's error estimates checked for honesty."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.linalg

import specops as so
from spectra import symmetric_with_spectrum
from test_conformance import native, to_numpy

BACKENDS = ["numpy", "torch", "jax", "tensorflow", "torch-cuda"]  # torch-cuda: skipped without a GPU


@functools.lru_cache(maxsize=None)
def spd(name):
    """Positive definite (matrix, eigenvalues) of the conformance kinds."""
    rng = np.random.default_rng(8)
    if name == "small":
        lam = np.concatenate([rng.uniform(0.5, 2.0, 58), [3.5, 5.0]])
    elif name == "ill-conditioned":  # n >= 1500, condition number 1e4
        lam = np.logspace(0, 4, 1500)
    elif name == "clustered":
        lam = np.concatenate([rng.normal(1.0, 1e-3, 200), rng.normal(4.0, 1e-3, 100)])
    else:
        raise KeyError(name)
    return symmetric_with_spectrum(lam, 9)


@functools.lru_cache(maxsize=None)
def eigh(name):
    return np.linalg.eigh(spd(name)[0])


def dense_function(M, f, name=None):
    w, Q = np.linalg.eigh(M) if name is None else eigh(name)
    return (Q * f(w)) @ Q.T


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logdet_every_backend_matches_slogdet(backend, dtype):
    M, lam = spd("small")
    sign, truth = np.linalg.slogdet(M + 0.5 * np.eye(len(lam)))
    r = so.logdet(native(M, backend, dtype), shift=0.5, num_probes=20, num_steps=20,
                  spectrum=(lam.min(), lam.max()))
    assert r.num_matvecs == 400 and r.settings["quadrature"] == "bound"
    rounding = 50 * np.finfo(dtype).eps * abs(truth)
    assert abs(r.estimate - truth) <= 4 * r.stderr + r.quadrature_error + rounding


def test_gauss_radau_bounds_hold_the_probes_exact_average():
    M, lam = spd("ill-conditioned")
    n, p = M.shape[0], 4
    r = so.logdet(M, num_probes=p, num_steps=25, spectrum=(1.0, 1e4))
    Z = so.aslinearoperator(M).ops.random(n, range(p), 0, distribution="rademacher", stream="slq")
    exact = np.mean(np.einsum("ip,ip->p", Z, dense_function(M, np.log, "ill-conditioned") @ Z))  # what the quadrature estimates
    lower, upper = r.settings["bounds"]
    assert lower <= exact <= upper and upper - lower > 0
    assert lower - 1e-9 * abs(exact) <= r.estimate  # the Gauss rule is an upper bound for log
    assert abs(r.estimate - exact) <= r.quadrature_error


@pytest.mark.parametrize("name", ["ill-conditioned", "clustered"])
def test_stderr_is_honest_across_seeds(name):
    M, lam = spd(name)
    truth = np.sum(np.log(lam))
    z = []
    for seed in range(6):
        r = so.logdet(M, num_probes=10, num_steps=80, seed=seed, spectrum=(lam.min(), lam.max()))
        assert abs(r.estimate - truth) <= 4 * r.stderr + r.quadrature_error
        z.append((r.estimate - truth) / r.stderr)
    assert np.max(np.abs(z)) < 4 and np.sqrt(np.mean(np.square(z))) < 2


def test_unbounded_quadrature_error_is_estimated_honestly():
    M, lam = spd("ill-conditioned")
    n, p = M.shape[0], 4
    Z = so.aslinearoperator(M).ops.random(n, range(p), 0, distribution="rademacher", stream="slq")
    exact = np.mean(np.einsum("ip,ip->p", Z, dense_function(M, np.log, "ill-conditioned") @ Z))
    for steps in (20, 40, 80):
        r = so.logdet(M, num_probes=p, num_steps=steps)
        assert r.settings["quadrature"] == "estimate"
        assert abs(r.estimate - exact) <= r.quadrature_error


def test_rtol_stops_early():
    M, lam = spd("small")
    r = so.logdet(M, shift=1.0, num_probes=200, num_steps=15, rtol=0.01)
    assert r.settings["num_probes"] < 200 and r.stderr <= 0.01 * abs(r.estimate)
    assert r.num_matvecs == 15 * r.settings["num_probes"]


@pytest.mark.parametrize("f, name", [(lambda x: 1 / x, "inverse"), (np.exp, "exp"), (np.sqrt, "sqrt")])
def test_trace_function_matches_dense(f, name):
    M, lam = spd("small")
    truth = np.sum(f(lam))
    r = so.trace_function(M, f, num_probes=30, num_steps=25, spectrum=(lam.min(), lam.max()))
    assert abs(r.estimate - truth) <= 4 * r.stderr + r.quadrature_error
    exact = so.trace_function(np.diag(lam), f, num_probes=2, num_steps=60)  # Rademacher: no variance
    assert exact.estimate == pytest.approx(truth, rel=1e-10) and exact.stderr < 1e-10 * truth
    assert exact.quadrature_error <= 1e-9 * truth


def test_logdet_refuses_an_operator_that_is_not_positive_definite():
    M, lam = symmetric_with_spectrum(np.concatenate([[-0.3], np.linspace(1, 2, 59)]), 3)
    with pytest.raises(ValueError, match=r"Pass a shift larger than 0\.[0-9]+ \(at least"):
        so.logdet(M, num_steps=30)
    with pytest.raises(ValueError, match="shift larger than 0.3"):
        so.logdet(M, spectrum=(-0.3, 2.0))
    r = so.logdet(M, shift=0.5, num_probes=10, num_steps=30)  # the shift it asked for
    assert abs(r.estimate - np.sum(np.log(lam + 0.5))) < 4 * r.stderr + r.quadrature_error
    with pytest.raises(ValueError, match="not finite at the Ritz value"):
        so.trace_function(M, lambda x: 1 / (x - x), num_steps=5)


SMOOTH = {"exp": np.exp, "inverse sqrt": lambda x: x ** -0.5, "inverse": lambda x: 1 / x}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_funm_every_backend_matches_scipy(backend, dtype):
    M, lam = spd("small")
    V = np.random.default_rng(4).standard_normal((M.shape[0], 2))
    tol = 1e-4 if dtype == "float32" else 1e-10
    for name, f in SMOOTH.items():
        r = so.funm(native(M, backend, dtype), f, native(V, backend, dtype), tol=tol, num_steps=60)
        truth = (scipy.linalg.expm(M) if name == "exp" else scipy.linalg.funm(M, f)) @ V
        err = np.linalg.norm(to_numpy(r.y) - truth, axis=0)
        assert r.converged.all(), name
        rounding = 100 * np.finfo(dtype).eps * np.linalg.norm(truth, axis=0) * np.sqrt(lam.max() / lam.min())
        np.testing.assert_array_less(err, np.maximum(r.error_estimate, tol * r.y_norm) + rounding)


@pytest.mark.parametrize("name", ["ill-conditioned", "clustered"])
def test_funm_error_estimate_is_honest(name):
    M, lam = spd(name)
    v = np.random.default_rng(5).standard_normal(M.shape[0])
    top = lam.max()
    functions = dict(SMOOTH, exp=lambda x: np.exp(-5 * x / top))
    for label, f in functions.items():
        truth = dense_function(M, f, name) @ v
        for steps in (10, 40):
            r = so.funm(M, f, v, num_steps=steps, tol=1e-14)
            err = np.linalg.norm(r.y - truth)
            assert err <= r.error_estimate + 1e-12 * np.linalg.norm(truth), (label, steps)
            assert r.converged == (r.error_estimate <= 1e-14 * r.y_norm)


def test_funm_spectral_window_and_stopping_rule():
    M, lam = spd("clustered")  # a window around the upper cluster: the projector onto it
    v = np.random.default_rng(6).standard_normal(M.shape[0])
    r = so.funm(M, lambda x: (x > 2.5) * 1.0, v, tol=1e-8)
    truth = dense_function(M, lambda x: (x > 2.5) * 1.0) @ v
    assert r.converged and r.settings["steps"] < 20 and np.linalg.norm(r.y - truth) <= 1e-6 * np.linalg.norm(truth)
    r = so.funm(M, np.exp, v, tol=1e-2)
    assert r.converged and r.num_matvecs == r.settings["steps"] < 10


def test_funm_bad_input():
    M, lam = spd("small")
    n = M.shape[0]
    with pytest.raises(ValueError, match="zero column"):
        so.funm(M, np.exp, np.zeros(n))
    with pytest.raises(ValueError, match="NaN"):
        so.funm(M, np.exp, np.full(n, np.nan))
    with pytest.raises(ValueError, match="shape"):
        so.funm(M, np.exp, np.ones(n + 2))
    with pytest.raises(ValueError, match="positive definite"):
        so.funm(M, lambda x: x ** -0.5, np.ones(n), shift=-10.0, positive=True)


def test_results_round_trip_through_json():
    M, _ = spd("small")
    r = so.logdet(M, num_probes=4, num_steps=10)
    back = so.TraceFunctionResult.from_json(r.to_json())
    assert back.estimate == r.estimate and back.settings == r.settings
    f = so.funm(M, np.exp, np.ones(M.shape[0]))
    assert so.FunmResult.from_json(f.to_json()).y is None


def test_a_sequence_of_shifts_is_served_by_one_run():
    M, lam = spd("small")
    shifts = np.array([0.1, 1.0, 10.0])
    many = so.logdet(M, shift=shifts, num_probes=10, num_steps=20, spectrum=(lam.min(), lam.max()))
    assert many.num_matvecs == 200 and many.estimate.shape == (3,)
    for j, s in enumerate(shifts):
        one = so.logdet(M, shift=s, num_probes=10, num_steps=20, spectrum=(lam.min(), lam.max()))
        assert one.estimate == pytest.approx(many.estimate[j], rel=1e-10)
        assert one.stderr == pytest.approx(many.stderr[j], rel=1e-8)
        assert abs(one.estimate - np.sum(np.log(lam + s))) <= 4 * one.stderr + one.quadrature_error
    with pytest.raises(ValueError, match="shift larger than"):
        so.logdet(M, shift=[1.0, -lam.min() - 0.1], num_steps=40)


def test_spectrum_touching_the_eigenvalues_and_a_wrong_spectrum():
    lam = np.logspace(0, 3, 300)  # Ritz values converge onto the interval's ends
    M, _ = symmetric_with_spectrum(lam, 10)
    r = so.logdet(M, num_probes=10, num_steps=40, spectrum=(1.0, 1e3))
    lower, upper = r.settings["bounds"]
    assert lower <= r.estimate <= upper + 1e-9 * abs(upper)
    assert abs(r.estimate - np.sum(np.log(lam))) < 4 * r.stderr + r.quadrature_error
    with pytest.raises(ValueError, match="does not hold the eigenvalues"):
        so.logdet(M, num_probes=2, num_steps=40, spectrum=(2.0, 1e3))


def test_memory_budget_limits_the_probes_side_by_side():
    M, lam = spd("small")
    n = M.shape[0]
    full = so.logdet(M, num_probes=10, num_steps=20)
    small = so.logdet(M, num_probes=10, num_steps=20, memory_budget=3 * 20 * n * 8)
    assert small.settings["probes_at_once"] == 3 and small.settings["reorth_window"] is None
    assert small.estimate == pytest.approx(full.estimate, rel=1e-10) and small.num_matvecs == full.num_matvecs
