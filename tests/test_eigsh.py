"""specops.eigsh against dense eigh and ARPACK."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specops as so
from spectra import SPECTRA, symmetric_with_spectrum


def expected(lam_sorted, which, k):
    if which == "LA":
        return lam_sorted[::-1][:k]
    if which == "SA":
        return lam_sorted[:k]
    if which == "LM":
        return lam_sorted[np.argsort(-np.abs(lam_sorted), kind="stable")][:k]
    hi, lo = (k + 1) // 2, k // 2
    return np.sort(np.concatenate([lam_sorted[:lo], lam_sorted[::-1][:hi]]))


def assert_eigenpairs(A, res, lam, which, k, tol_rel=1e-8):
    anorm = np.abs(lam).max()
    want = expected(lam, which, k)
    if which == "LM":  # ties in magnitude may come in either sign: compare magnitudes
        np.testing.assert_allclose(np.abs(res.eigenvalues), np.abs(want), atol=tol_rel * max(anorm, 1e-300))
    else:
        err = np.abs(res.eigenvalues - want)
        assert np.all(err <= tol_rel * np.maximum(np.abs(want), 1e-2 * anorm) + 1e-300), (res.eigenvalues, want)
    V = np.asarray(res.eigenvectors)
    true_resid = np.linalg.norm(A @ V - V * res.eigenvalues, axis=0)
    assert np.all(true_resid <= 1e-8 * max(anorm, 1e-300) + 1e-14)
    np.testing.assert_allclose(res.residuals, true_resid, atol=1e-9 * max(anorm, 1e-300) + 1e-13)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(SPECTRA)),
    n=st.one_of(st.integers(1, 3), st.integers(4, 220)),
    k=st.integers(1, 5),
    which=st.sampled_from(["LA", "SA", "LM", "BE"]),
    seed=st.integers(0, 2**16),
)
def test_matches_dense_eigh(kind, n, k, which, seed):
    k = min(k, n)
    lam = SPECTRA[kind](np.random.default_rng(seed), n)
    A, lam = symmetric_with_spectrum(lam, seed)
    res = so.eigsh(A, k=k, which=which, tol=1e-10, seed=seed, max_matvecs=20000)
    assert res.all_converged
    assert_eigenpairs(A, res, lam, which, k)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_repeated_top_eigenvalue_found_with_multiplicity(k):
    """A triple top eigenvalue with a near second cluster: single-vector Lanczos misses copies."""
    rng = np.random.default_rng(55)
    lam = np.concatenate([[5.0, 5.0, 5.0, 4.9, 4.8], rng.uniform(-3, 4, 285)])
    A, lam = symmetric_with_spectrum(lam, 55)
    res = so.eigsh(A, k=k, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:k], rtol=1e-9)
    # single-vector Lanczos alone misses the copies; the default's check finds them
    assert res.settings["multiplicity_check"]["missed"] and res.settings["block_size"] == k
    single = so.eigsh(A, k=k, tol=1e-10, block_size=1)
    assert not np.allclose(single.eigenvalues, lam[::-1][:k], rtol=1e-9)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("seed", range(6))
def test_multiplicity_check_finds_every_copy_at_either_end(which, seed):
    """Repeated eigenvalues at the wanted end(s), next to near clusters, n = 300 and 1500 (restarts)."""
    rng = np.random.default_rng(seed)
    n = 300 if seed % 2 else 1500
    mult = 2 + seed % 2
    lam = np.concatenate([[5.0] * mult, 5 - rng.uniform(0.01, 0.2, 3), [-5.0] * mult,
                          -5 + rng.uniform(0.01, 0.2, 3), rng.uniform(-4.5, 4.5, n - 2 * mult - 6)])
    A, lam = symmetric_with_spectrum(lam, seed)
    k = 4
    res = so.eigsh(A, k=k, which=which, tol=1e-8, seed=seed)
    assert res.all_converged
    want = expected(lam, which, k)
    if which == "LM":
        np.testing.assert_allclose(np.sort(np.abs(res.eigenvalues)), np.sort(np.abs(want)), rtol=1e-7)
    else:
        np.testing.assert_allclose(np.sort(res.eigenvalues), np.sort(want), rtol=1e-7)


def test_simple_eigenvalues_cost_fewer_products_than_a_block():
    rng = np.random.default_rng(4)
    lam = np.concatenate([[6.0, 5.5, 5.2, 5.0, 4.9], rng.uniform(-3, 4.8, 1995)])
    A, lam = symmetric_with_spectrum(lam, 4)
    res = so.eigsh(A, k=5, tol=1e-8)
    block = so.eigsh(A, k=5, tol=1e-8, block_size=5)
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:5], rtol=1e-8)
    np.testing.assert_allclose(block.eigenvalues, lam[::-1][:5], rtol=1e-8)
    check = res.settings["multiplicity_check"]
    assert not check["missed"] and res.settings["block_size"] == 1
    assert res.num_matvecs < 0.75 * block.num_matvecs, (res.num_matvecs, block.num_matvecs, check)


def test_power_iteration_matches_dense():
    lam = np.concatenate([[9.0, 7.0, 6.0, -8.5], np.linspace(-3, 3, 96)])
    A, lam = symmetric_with_spectrum(lam, 3)
    for which in ("LA", "SA", "LM"):
        res = so.eigsh(A, k=2, which=which, method="power", tol=1e-9, max_matvecs=20000)
        assert res.all_converged and res.settings["method"] == "power"
        np.testing.assert_allclose(res.eigenvalues, expected(lam, which, 2), rtol=1e-7)


def test_sparse_operator_with_100k_rows_agrees_with_arpack():
    rng = np.random.default_rng(0)
    n = 100_000
    diag = np.concatenate([rng.uniform(0, 1, n - 5), [3.0, 2.5, 2.2, 2.0, 1.8]])
    rows, cols = rng.integers(0, n, 200_000), rng.integers(0, n, 200_000)
    noise = sp.csr_matrix((rng.uniform(-0.05, 0.05, 200_000), (rows, cols)), shape=(n, n))
    M = (sp.diags(diag) + noise + noise.T).tocsr()
    ref = np.sort(spl.eigsh(M, k=5, which="LA", tol=1e-12)[0])[::-1]
    res = so.eigsh(M, k=5, block_size=1, tol=1e-10)
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-8)


def test_budget_exhaustion_returns_best_estimate_unconverged():
    A, lam = symmetric_with_spectrum(np.linspace(0, 1, 400), 0)
    res = so.eigsh(A, k=3, tol=1e-12, max_matvecs=30)
    assert not res.all_converged and res.num_matvecs <= 30
    assert np.all(res.eigenvalues <= lam[-1] + 1e-12)  # Ritz values never overshoot


def test_float32_operator_converges_at_working_precision():
    A, lam = symmetric_with_spectrum(np.linspace(-1, 10, 200), 2)
    res = so.eigsh(A.astype(np.float32), k=2, tol=1e-6)
    assert res.all_converged and res.eigenvectors.dtype == np.float32
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:2], rtol=1e-5)


def test_result_round_trips_json():
    A, _ = symmetric_with_spectrum(np.arange(50.0), 0)
    res = so.eigsh(A, k=2, seed=4)
    back = so.EigResult.from_json(res.to_json())
    np.testing.assert_array_equal(back.eigenvalues, res.eigenvalues)
    np.testing.assert_array_equal(back.converged, res.converged)
    assert back.settings == res.settings and back.settings["seed"] == 4 and back.eigenvectors is None


def test_same_seed_same_result_and_seed_matters():
    A, _ = symmetric_with_spectrum(np.linspace(0, 1, 300), 0)
    a = so.eigsh(A, k=1, tol=1e-3, seed=1)
    b = so.eigsh(A, k=1, tol=1e-3, seed=1)
    c = so.eigsh(A, k=1, tol=1e-3, seed=2)
    assert a.eigenvalues[0] == b.eigenvalues[0] and a.num_matvecs == b.num_matvecs
    assert a.eigenvalues[0] != c.eigenvalues[0]


def test_bad_arguments():
    A = np.eye(5)
    with pytest.raises(ValueError, match="k must be <= n"):
        so.eigsh(A, k=6)
    with pytest.raises(ValueError, match="LA, SA, LM, BE"):
        so.eigsh(A, which="largest")
    with pytest.raises(ValueError, match="lanczos, power"):
        so.eigsh(A, method="arnoldi")
    with pytest.raises(ValueError, match="'BE'"):
        so.eigsh(A, which="BE", method="power")
    for bad in (dict(k=0), dict(tol=-1.0), dict(seed=-3), dict(max_matvecs=0), dict(max_basis=2, k=1)):
        with pytest.raises(ValueError):
            so.eigsh(A, **bad)


def test_non_finite_product_names_the_product():
    calls = []

    def matvec(X):
        calls.append(1)
        Y = np.arange(1.0, 101.0)[:, None] * X.reshape(100, -1)
        if len(calls) == 3:
            Y[0] = np.nan
        return Y

    A = spl.LinearOperator((100, 100), matvec=matvec, matmat=matvec, dtype=float)
    with pytest.raises(so.NonFiniteError, match="product 3 "):
        so.eigsh(A, k=1)


def test_multiplicity_check_within_a_tight_budget_says_what_it_knows():
    rng = np.random.default_rng(55)
    lam = np.concatenate([[5.0, 5.0, 5.0, 4.9, 4.8], rng.uniform(-3, 4, 285)])
    A, lam = symmetric_with_spectrum(lam, 55)
    first = so.eigsh(A, k=3, tol=1e-10, block_size=1).num_matvecs
    cut = so.eigsh(A, k=3, tol=1e-10, max_matvecs=first + 2)  # the check cannot finish
    assert cut.settings["multiplicity_check"]["complete"] is False and cut.num_matvecs <= first + 2
    found = so.eigsh(A, k=3, tol=1e-10, max_matvecs=first + 10)  # finds the copy, no budget to resolve it
    check = found.settings["multiplicity_check"]
    assert check["missed"] and not found.converged.any() and found.num_matvecs <= first + 10


@pytest.mark.parametrize("which", ["SA", "BE"])
def test_multiplicity_check_is_not_fooled_by_the_deflated_directions(which):
    """Past 0 from the wanted end (SA on a positive definite matrix), the check must not take
    the basis' own directions (eigenvalue 0 of the deflated operator) for a missed copy."""
    A, lam = symmetric_with_spectrum(np.linspace(1, 10, 300), 1)
    res = so.eigsh(A, k=3, which=which, tol=1e-8)
    np.testing.assert_allclose(res.eigenvalues, expected(lam, which, 3), rtol=1e-8)
    assert res.settings["multiplicity_check"] == {"products": res.settings["multiplicity_check"]["products"],
                                                  "missed": False, "complete": True}
    assert res.settings["block_size"] == 1


def test_never_exceeds_the_budget_even_when_a_copy_needs_the_dense_path():
    rng = np.random.default_rng(0)
    for n, k in [(7, 2), (11, 3)]:
        lam = np.arange(1.0, n + 1)
        lam[-2] = lam[-1]
        A, _ = symmetric_with_spectrum(lam, int(rng.integers(1000)))
        for budget in range(4, 3 * n):
            assert so.eigsh(A, k=k, max_matvecs=budget).num_matvecs <= budget


def _outliers_over_narrow_bulk(n=1300, seed=1):
    """A typical Hessian spectrum: a few outliers over a very narrow bulk."""
    rng = np.random.default_rng(seed)
    lam = np.concatenate([[90.0, 45.0, 35.0, 15.0], rng.normal(0, 0.004, n - 4)])
    return symmetric_with_spectrum(lam, seed)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_float32_residuals_are_those_of_the_returned_vectors(method):
    # this spectrum once hid a coupling behind a false breakdown: residuals 1e-9 reported, 9e-4 true
    A, lam = _outliers_over_narrow_bulk()
    res = so.eigsh(A.astype(np.float32), k=4, method=method, max_matvecs=3000)
    V = np.asarray(res.eigenvectors, dtype=np.float64)
    true = np.linalg.norm(A @ V - V * res.eigenvalues, axis=0)
    eps32 = np.finfo(np.float32).eps
    assert np.all(true <= res.residuals + 10 * eps32 * lam.max()), (res.residuals, true)
    thresholds = np.maximum(1e-6 * np.abs(res.eigenvalues), 50 * eps32 * lam.max())
    assert np.all(true[res.converged] <= thresholds[res.converged] + 10 * eps32 * lam.max())
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:4], atol=100 * eps32 * lam.max())


def test_verification_product_is_counted_and_within_the_budget():
    A, lam = symmetric_with_spectrum(np.linspace(0, 1, 50), 3)
    res = so.eigsh(A, k=2, tol=1e-10)
    # at most n Lanczos products, the multiplicity check and the k verified ones
    assert res.num_matvecs <= 50 + res.settings["multiplicity_check"]["products"] + 2
    with pytest.raises(ValueError, match="max_matvecs"):
        so.eigsh(A, k=2, max_matvecs=1)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_warm_start_from_nearby_eigenvectors_cuts_products(which):
    rng = np.random.default_rng(5)
    lam = np.concatenate([np.linspace(5, 10, 6), np.linspace(-10, -5, 6), rng.uniform(-1, 1, 1988)])
    A, _ = symmetric_with_spectrum(lam, 5)
    E = rng.standard_normal(A.shape)
    B = A + 1e-4 * (E + E.T) / 2  # the operator a little later in training
    cold = so.eigsh(B, k=5, which=which)
    prev = so.eigsh(A, k=5, which=which)
    warm = so.eigsh(B, k=5, which=which, v0=prev.eigenvectors)
    assert warm.all_converged and cold.all_converged
    np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-8, atol=1e-8)
    assert warm.num_matvecs <= 0.7 * cold.num_matvecs, (warm.num_matvecs, cold.num_matvecs)
    assert warm.settings["warm_start"]["inside"] > 0.99 and not warm.settings["warm_start"]["checked"]
    single = so.eigsh(B, k=1, which=which, v0=prev.eigenvectors[:, 0])  # one vector, as SciPy's v0
    assert single.all_converged and single.num_matvecs < so.eigsh(B, k=1, which=which).num_matvecs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_warm_start_finds_both_copies_of_a_repeated_eigenvalue(dtype):
    """A warm block spanning a double eigenvalue: one start vector sees one copy; the check finds the other."""
    rng = np.random.default_rng(11)
    lam = np.concatenate([[10.0, 10.0, 8.0, 7.0], rng.uniform(-1, 1, 1496)])
    A, _ = symmetric_with_spectrum(lam, 6)
    _, S = np.linalg.eigh(A)
    top = S[:, ::-1][:, :3]  # the two copies of 10 and the eigenvector of 8
    prev = top + 1e-3 * rng.standard_normal(top.shape)  # a little earlier in training
    res = so.eigsh(A.astype(dtype), k=3, v0=prev.astype(dtype), tol=1e-4)
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues, [10.0, 10.0, 8.0], rtol=1e-4)
    info = res.settings["warm_start"]
    if dtype == np.float64:  # exact arithmetic keeps the second copy out of the Krylov space
        assert info["checked"] and info["inside"] < 0.75, info
        assert res.settings["multiplicity_check"]["missed"]
    else:  # float32 rounding brings it in (and Lanczos finds it); or the check runs
        assert info["checked"] == (info["inside"] < 0.9), info


def test_bad_starting_vectors():
    A = np.diag(np.arange(30.0))
    with pytest.raises(ValueError, match="shape"):
        so.eigsh(A, k=2, v0=np.ones(29))
    with pytest.raises(ValueError, match="zero or non-finite"):
        so.eigsh(A, k=2, v0=np.zeros(30))
    with pytest.raises(ValueError, match="more than block_size"):
        so.eigsh(A, k=2, v0=np.ones((30, 3)), block_size=2)
    with pytest.raises(ValueError, match="power"):
        so.eigsh(A, k=2, v0=np.ones(30), method="power")
