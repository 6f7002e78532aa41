"""Conformance: every algorithm x every backend x float32/float64 x the paths that matter,
each against dense truth, asserting the answer and its honesty (a reported residual or
standard error never understates the true error beyond rounding; converged means truly
converged)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import specops as so
from spectra import symmetric_with_spectrum

BACKENDS = ["numpy", "torch", "jax", "tensorflow", "torch-cuda"]
DTYPES = ["float32", "float64"]


def native(M, backend, dtype):
    """``M`` as a dense matrix of ``backend`` (skipped when the framework or device is missing)."""
    if backend == "numpy":
        return M.astype(dtype)
    if backend.startswith("torch"):
        torch = pytest.importorskip("torch")
        device = "cuda" if backend == "torch-cuda" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return torch.tensor(M, dtype=getattr(torch, dtype), device=device)
    if backend == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        return jnp.asarray(M, dtype=dtype)
    tf = pytest.importorskip("tensorflow")
    return tf.constant(M, dtype=getattr(tf, dtype))


def to_numpy(X):
    if hasattr(X, "detach"):
        X = X.detach().cpu()
    return np.asarray(X.numpy() if hasattr(X, "numpy") else X, dtype=np.float64)


@functools.lru_cache(maxsize=None)
def case(name):
    """(matrix, eigenvalues ascending) of each path."""
    rng = np.random.default_rng(11)
    if name == "small":
        lam = np.concatenate([[-4.0, -3.0], rng.uniform(-1, 1, 56), [3.5, 5.0]])
    elif name == "restarts":  # n >= 1500 with a spread spectrum: thick restarts happen
        lam = rng.standard_normal(1500) * 3
    elif name == "hessian-like":  # outliers over a very narrow bulk (false breakdowns)
        lam = np.concatenate([rng.normal(0, 0.004, 1496), [15.0, 35.0, 45.0, 90.0]])
    elif name == "low-rank":  # exact breakdown: an invariant subspace of dimension 6
        lam = np.concatenate([np.zeros(194), [-2.0, -1.0, 1.0, 2.0, 3.0, 4.0]])
    elif name == "repeated":
        lam = np.concatenate([rng.uniform(-1, 1, 296), [-3.0, -3.0, 4.0, 4.0]])
    else:
        raise KeyError(name)
    M, lam = symmetric_with_spectrum(lam, 3)
    return M, np.sort(lam)


def expected(lam, which, k):
    if which == "LA":
        return lam[::-1][:k]
    if which == "SA":
        return lam[:k]
    if which == "LM":
        return lam[np.argsort(-np.abs(lam), kind="stable")][:k]
    hi, lo = (k + 1) // 2, k // 2
    return np.sort(np.concatenate([lam[:lo], lam[::-1][:hi]]))


def assert_honest_eigenpairs(M, lam, res, which, k, dtype, budget_exhausted=False):
    eps = np.finfo(dtype).eps
    anorm = np.abs(lam).max()
    rounding = 20 * eps * anorm * np.sqrt(M.shape[0]) ** 0.5
    V = to_numpy(res.eigenvectors)
    true = np.linalg.norm(M @ V - V * res.eigenvalues, axis=0)
    # honest: the reported residual is the true one, within rounding
    assert np.all(true <= res.residuals + rounding), (res.residuals, true)
    # converged means truly converged (tolerance or the rounding level)
    bound = np.maximum(res.settings["tol"] * np.maximum(np.abs(res.eigenvalues), 1e-3 * anorm),
                       50 * eps * anorm) + rounding
    assert np.all(true[res.converged] <= bound[res.converged]), (true, bound, res.converged)
    # each value lies within its true residual of a true eigenvalue (Bauer-Fike)
    dist = np.abs(res.eigenvalues[:, None] - lam[None, :]).min(axis=1)
    assert np.all(dist <= true + rounding), (dist, true)
    if not budget_exhausted:
        assert res.all_converged
        want = expected(lam, which, k)
        got = res.eigenvalues
        if which == "LM":
            got, want = np.abs(got), np.abs(want)
        np.testing.assert_allclose(got, want, atol=1e3 * eps * anorm)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e3 * eps)


EIG_PATHS = [("small", "LA"), ("small", "SA"), ("small", "LM"), ("small", "BE"),
             ("restarts", "LA"), ("hessian-like", "LA"), ("low-rank", "LM"), ("repeated", "LA"), ("repeated", "SA")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path,which", EIG_PATHS, ids=[f"{p}-{w}" for p, w in EIG_PATHS])
def test_lanczos(backend, dtype, path, which):
    M, lam = case(path)
    k = 2 if path == "repeated" else 4
    res = so.eigsh(native(M, backend, dtype), k=k, which=which, tol=1e-6 if dtype == "float64" else 1e-4)
    assert_honest_eigenpairs(M, lam, res, which, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_power(backend, dtype, which):
    M, lam = case("small")
    res = so.eigsh(native(M, backend, dtype), k=2, which=which, method="power", tol=1e-5, max_matvecs=4000)
    assert_honest_eigenpairs(M, lam, res, which, 2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_budget_exhausted_is_flagged_and_honest(backend, dtype, method):
    M, lam = case("restarts")
    res = so.eigsh(native(M, backend, dtype), k=3, method=method, tol=1e-10, max_matvecs=40)
    assert res.num_matvecs <= 40 and not res.all_converged
    assert_honest_eigenpairs(M, lam, res, "LA", 3, dtype, budget_exhausted=True)


def _errors_within_stderr(estimates, stderrs, truth):
    z = np.abs(np.asarray(estimates) - truth) / np.asarray(stderrs)
    return np.mean(z <= 3.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "krylov-hutch++", "auto"])
def test_trace(backend, dtype, method):
    M, lam = case("small")
    M = M + 50 * np.eye(len(lam))  # a large mean diagonal: float32 stderr must not round to 0
    A = native(M, backend, dtype)
    truth = float(np.trace(M))
    out = [so.trace(A, method=method, max_matvecs=30, seed=s) for s in range(8)]
    err = np.array([o.stderr for o in out])
    assert np.all(err > 0) and np.all(np.isfinite(err))
    assert _errors_within_stderr([o.estimate for o in out], err, truth) >= 0.75
    rounding = 1e3 * np.finfo(dtype).eps * np.abs(M).sum()
    assert all(abs(o.estimate - truth) <= 6 * o.stderr + rounding for o in out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal(backend, dtype):
    M, lam = case("small")
    M = M + 50 * np.eye(len(lam))
    out = so.diagonal(native(M, backend, dtype), max_matvecs=60, seed=0)
    est, err = to_numpy(out.estimate), np.asarray(out.stderr, dtype=np.float64)
    assert np.all(err > 0)
    z = np.abs(est - np.diag(M)) / err
    assert np.mean(z <= 3.0) >= 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["small", "hessian-like", "low-rank"])
def test_slq(backend, dtype, path):
    M, lam = case(path)
    d = so.spectral_density(native(M, backend, dtype), num_probes=6, num_steps=40, seed=1)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, atol=1e-6)
    assert d.nodes.min() >= lam.min() - 1e-3 * np.abs(lam).max()
    assert d.nodes.max() <= lam.max() + 1e-3 * np.abs(lam).max()
    grid = d.default_grid()
    assert np.trapezoid(d.evaluate(grid), grid) == pytest.approx(1.0, abs=1e-3)
    est, err = d.trace()
    assert abs(est - lam.sum()) <= 5 * err + 1e-3 * np.abs(lam).sum()
    # the outliers are Ritz values of every probe (Lanczos finds the extremes first)
    if path == "hessian-like":
        assert np.abs(d.nodes.max(axis=1) - lam.max()).max() <= 1e-3 * lam.max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reported_restart_case(backend):
    """The case that once gave JAX wrong eigenvalues flagged converged after a thick restart
    (error 0.043, reported residual 1.9e-15, true 0.28): stale buffer columns."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((1200, 1200)))
    lam = rng.standard_normal(1200) * 3
    M = (q * lam) @ q.T
    M = (M + M.T) / 2
    res = so.eigsh(native(M, backend, "float64"), k=4)
    assert_honest_eigenpairs(M, np.sort(lam), res, "LA", 4, "float64")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_false_breakdown_case(backend):
    """Outliers 90, 45, 35, 15 over a bulk of width 0.004, float32 (n = 1300): residuals of
    about 9e-4 were reported as 1e-9 and flagged converged. Reported residuals must not
    understate the true ones, and converged must mean converged."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([[90.0, 45.0, 35.0, 15.0], rng.normal(0, 0.004, 1296)])
    M, lam = symmetric_with_spectrum(lam, 1)
    res = so.eigsh(native(M, backend, "float32"), k=4)
    assert_honest_eigenpairs(M, lam, res, "LA", 4, "float32", budget_exhausted=True)
    np.testing.assert_allclose(res.eigenvalues, [90.0, 45.0, 35.0, 15.0], rtol=1e-4)


@functools.lru_cache(maxsize=None)
def large_diagonal(n=200):
    """diag 1000 + 1e-3 noise plus a small off-diagonal: float32 sums of squares cancel."""
    rng = np.random.default_rng(5)
    E = rng.normal(0, 1e-4, (n, n))
    M = (E + E.T) / 2
    M[np.diag_indices(n)] = 1000 + rng.normal(0, 1e-3, n)
    return M


SEEDS = range(20)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "krylov-hutch++", "auto"])
def test_trace_stderr_honest_on_a_large_diagonal(backend, dtype, method):
    M = large_diagonal(1000)  # n large enough that float32 rounding of z^T A z exceeds the spread
    A = native(M, backend, dtype)
    truth = float(np.trace(M))
    out = [so.trace(A, method=method, max_matvecs=30, seed=s) for s in SEEDS]
    err = np.array([o.stderr for o in out])
    assert np.all(err > 0) and np.all(np.isfinite(err)), err
    z = np.abs(np.array([o.estimate for o in out]) - truth) / err
    assert np.mean(z <= 4.0) >= 0.85, np.sort(z)
    # |err| / stderr has median ~0.67 for an honest stderr; float32 device sums of the forms
    # gave Hutchinson 1.77 and auto 1.94 here (now 0.54), XTrace's leave-one-out spread 1.66
    # (its jackknife now 0.5-0.8)
    assert np.median(z) <= 1.4, np.sort(z)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_diagonal_stderr_honest_on_a_large_diagonal(backend, dtype):
    M = large_diagonal()
    A = native(M, backend, dtype)
    fractions = []
    for s in range(5):
        out = so.diagonal(A, max_matvecs=40, seed=s)
        est, err = to_numpy(out.estimate), np.asarray(out.stderr, dtype=np.float64)
        assert np.all(err > 0), err.min()
        fractions.append(np.mean(np.abs(est - np.diag(M)) <= 4.0 * err))
    assert min(fractions) >= 0.95, fractions
