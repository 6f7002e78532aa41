"""so.solve against dense NumPy solves: every backend, float32 and float64, CG and MINRES,
preconditioners, blocks, and honest residuals (a reported residual is ||b - (A + s I) x||
of the returned x, recomputed here in float64; converged means truly converged)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

import specops as so
from spectra import symmetric_with_spectrum
from test_conformance import case, native, to_numpy

BACKENDS = ["numpy", "torch", "jax", "tensorflow", "torch-cuda"]  # torch-cuda: skipped without a GPU
TOL = {"float32": 1e-4, "float64": 1e-9}


@functools.lru_cache(maxsize=None)
def spectrum_case(name):
    """(matrix, eigenvalues) of the solver's paths beyond the conformance suite's."""
    rng = np.random.default_rng(5)
    if name == "ill-conditioned":  # n >= 1500, condition number 1e4, positive definite
        lam = np.logspace(0, 4, 1500)
    elif name == "clustered":  # two tight clusters: CG converges in a few steps
        lam = np.concatenate([rng.normal(1.0, 1e-3, 1000), rng.normal(50.0, 1e-3, 500)])
    else:
        raise KeyError(name)
    return symmetric_with_spectrum(lam, 7)


def assert_honest(M, b, shift, r, tol, dtype):
    """The reported residual is that of the returned x; converged means the tolerance is met."""
    x, B = to_numpy(r.x), np.asarray(b, dtype=np.float64)
    true = np.linalg.norm(B - M @ x - shift * x, axis=0)
    eps = np.finfo(dtype).eps
    rounding = 30 * eps * (np.abs(M).sum(axis=0).max() * np.linalg.norm(x, axis=0) + np.linalg.norm(B, axis=0))
    np.testing.assert_array_less(np.abs(true - r.residual_norm), rounding + 1e-300)
    np.testing.assert_array_equal(r.converged, r.residual_norm <= tol * r.b_norm)
    return x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [4.5, 0.0])  # positive definite (CG), indefinite (auto: CG, then MINRES)
def test_solve_every_backend_matches_dense(backend, dtype, shift):
    M, lam = case("small")
    b = np.random.default_rng(0).standard_normal(M.shape[0])
    tol = TOL[dtype]
    r = so.solve(native(M, backend, dtype), native(b, backend, dtype), shift=shift, tol=tol)
    assert r.converged and r.num_matvecs <= r.settings["max_matvecs"]
    assert r.settings["method_used"] == ("cg" if shift > 0 else "cg, then minres")
    x = assert_honest(M, b, shift, r, tol, dtype)
    truth = np.linalg.solve(M + shift * np.eye(len(b)), b)
    cond = np.abs(lam + shift).max() / np.abs(lam + shift).min()
    assert np.linalg.norm(x - truth) <= 3 * cond * tol * np.linalg.norm(truth)


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("name", ["ill-conditioned", "clustered"])
def test_solve_large_cases_match_dense(name, method):
    M, lam = spectrum_case(name)
    b = np.random.default_rng(1).standard_normal((M.shape[0], 1))
    r = so.solve(M, b, method=method, tol=1e-7)
    assert r.converged.all() and r.x.shape == b.shape
    x = assert_honest(M, b, 0.0, r, 1e-7, "float64")
    truth = np.linalg.solve(M, b)
    assert np.linalg.norm(x - truth) <= 2 * lam.max() / lam.min() * 1e-7 * np.linalg.norm(truth)
    if name == "clustered":
        assert r.settings["iterations"] <= 10


def test_cg_refuses_an_indefinite_operator_and_auto_switches():
    M, lam = case("small")
    b = np.ones(M.shape[0])
    with pytest.raises(so.IndefiniteError, match="method='minres'"):
        so.solve(M, b, method="cg")
    r = so.solve(M, b, tol=1e-10)
    assert r.converged and r.settings["negative_curvature"] <= 0
    np.testing.assert_allclose(r.x, np.linalg.solve(M, b), rtol=1e-6)


def test_auto_starts_with_minres_when_the_operator_says_it_is_indefinite():
    M, _ = case("small")

    class Hessian(so.LinearOperator):
        positive_semidefinite = False

        def __init__(self):
            super().__init__(M.shape, so.aslinearoperator(M).ops)

        def _matmat(self, V):
            return M @ V

    r = so.solve(Hessian(), np.ones(M.shape[0]), tol=1e-10)
    assert r.converged and r.settings["method_used"] == "minres"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_block_columns_are_solved_independently(dtype):
    M, _ = case("small")
    B = np.random.default_rng(2).standard_normal((M.shape[0], 3)).astype(dtype)
    B[:, 1] = 0.0  # a zero column: x = 0 at once
    r = so.solve(M.astype(dtype), B, shift=4.5, tol=TOL[dtype])
    assert r.converged.all() and np.all(r.x[:, 1] == 0)
    for j in range(3):
        one = so.solve(M.astype(dtype), B[:, j], shift=4.5, tol=TOL[dtype])
        np.testing.assert_allclose(r.x[:, j], one.x, rtol=1e-3 if dtype == "float32" else 1e-10, atol=1e-6)
    assert_honest(M, B, 4.5, r, TOL[dtype], dtype)


def test_preconditioners_cut_the_steps_and_keep_the_solution():
    rng = np.random.default_rng(3)
    lam = np.concatenate([np.linspace(1, 2, 290), np.logspace(2, 4, 10)])
    M, _ = symmetric_with_spectrum(lam, 4)
    b, shift = rng.standard_normal(300), 0.1
    truth = np.linalg.solve(M + shift * np.eye(300), b)
    plain = so.solve(M, b, shift=shift, tol=1e-10)
    top = so.eigsh(M, k=10, tol=1e-10)
    for method in ("cg", "minres"):
        deflated = so.solve(M, b, shift=shift, tol=1e-10, method=method,
                            preconditioner=so.Preconditioner.from_eigenpairs(top, level=1.0))
        assert deflated.converged and deflated.settings["iterations"] < plain.settings["iterations"] / 2
        assert_honest(M, b, shift, deflated, 1e-10, "float64")
        assert np.linalg.norm(deflated.x - truth) <= 1e-7 * np.linalg.norm(truth)
    # a diagonal preconditioner of a badly scaled matrix (Jacobi)
    D = np.diag(np.logspace(0, 3, 300))
    S = D @ (M / lam.max() + np.eye(300)) @ D
    jacobi = so.solve(S, b, tol=1e-10, preconditioner=np.diag(S).copy())
    unscaled = so.solve(S, b, tol=1e-10)
    assert jacobi.converged and jacobi.settings["iterations"] < unscaled.settings["iterations"] / 2
    truth = np.linalg.solve(S, b)
    assert np.linalg.norm(jacobi.x - truth) <= 1e-6 * np.linalg.norm(truth)
    # an EigResult or DiagonalResult directly
    assert so.solve(M, b, shift=shift, tol=1e-10, preconditioner=top).converged
    D2 = np.diag(np.diag(S))  # Rademacher probes give a diagonal matrix's diagonal exactly
    assert so.solve(D2, b, tol=1e-8, preconditioner=so.diagonal(D2, max_matvecs=2)).settings["iterations"] == 1


def test_low_rank_plus_diagonal_preconditioner_is_the_woodbury_inverse():
    rng = np.random.default_rng(6)
    n, r = 40, 3
    d = rng.uniform(1, 2, n)
    U = np.linalg.qr(rng.standard_normal((n, r)))[0]
    s = np.array([5.0, 2.0, -0.5])
    apply = so.Preconditioner(d, U, s).bind(so.aslinearoperator(np.eye(n)).ops, n, shift=0.25)
    R = rng.standard_normal((n, 2))
    np.testing.assert_allclose(apply(R), np.linalg.solve(np.diag(d + 0.25) + U @ np.diag(s) @ U.T, R), rtol=1e-12)


def test_budget_exhausted_returns_the_work_done_unconverged():
    M, lam = spectrum_case("ill-conditioned")
    b = np.ones(M.shape[0])
    r = so.solve(M, b, tol=1e-10, max_matvecs=30)
    assert not r.converged and r.num_matvecs <= 30 and r.x is not None  # CG's residual need not fall
    assert_honest(M, b, 0.0, r, 1e-10, "float64")
    warm = so.solve(M, b, tol=1e-8, x0=r.x)  # and it can be continued
    assert warm.converged


def test_float32_tolerance_below_rounding_is_reported_unconverged():
    M, lam = spectrum_case("ill-conditioned")
    b = np.ones(M.shape[0], dtype=np.float32)
    r = so.solve(M.astype(np.float32), b, tol=1e-10, max_matvecs=400)
    assert not r.converged
    assert_honest(M, b, 0.0, r, 1e-10, "float32")


def test_singular_shift_is_reported():
    M, _ = symmetric_with_spectrum(np.concatenate([[-1.0], np.linspace(1, 2, 99)]), 2)
    with pytest.warns(RuntimeWarning, match="singular"):
        r = so.solve(M, np.ones(100), shift=1.0)
    assert not r.converged and r.settings["singular"] and r.num_matvecs < 200
    # a consistent right-hand side (in the range) is solved anyway
    w, Q = np.linalg.eigh(M)
    b = Q[:, 1:] @ np.ones(99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert so.solve(M, b, shift=1.0, tol=1e-8).converged


def test_bad_input_is_refused_with_the_fix():
    M, _ = case("small")
    n = M.shape[0]
    with pytest.raises(ValueError, match=rf"shape \({n},\) or \({n}, k\)"):
        so.solve(M, np.ones(n + 1))
    with pytest.raises(ValueError, match="shape"):
        so.solve(M, np.ones((n, 2, 2)))
    b = np.ones(n)
    b[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        so.solve(M, b)
    with pytest.raises(ValueError, match="method"):
        so.solve(M, np.ones(n), method="gmres")
    with pytest.raises(ValueError, match="x0 must have"):
        so.solve(M, np.ones((n, 2)), x0=np.ones((n, 1)))
    with pytest.raises(ValueError, match="positive"):
        so.solve(M, np.ones(n), preconditioner=-np.ones(n))
    with pytest.raises(ValueError, match="symmetric"):
        so.solve(so.aslinearoperator(np.triu(M), symmetric=False), np.ones(n))


def test_result_round_trips_through_json():
    M, _ = case("small")
    r = so.solve(M, np.ones((M.shape[0], 2)), shift=4.5)
    back = so.SolveResult.from_json(r.to_json())
    assert back.x is None and back.settings == r.settings
    np.testing.assert_array_equal(back.residual_norm, r.residual_norm)
    assert "SolveResult" in repr(r)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_preconditioners_every_backend(backend, dtype):
    M, lam = case("small")
    b = np.random.default_rng(7).standard_normal(M.shape[0])
    A = native(M, backend, dtype)
    top = so.eigsh(A, k=4, which="LM", tol=1e-6 if dtype == "float32" else 1e-10)
    d = np.abs(np.diag(M)) + 1.0
    shift, tol = 6.0, TOL[dtype]
    preconditioners = (so.Preconditioner.from_eigenpairs(top, level=1.0), native(d, backend, dtype),
                       so.Preconditioner(d, top.eigenvectors, np.ones(4)))
    for p in preconditioners:
        r = so.solve(A, native(b, backend, dtype), shift=shift, tol=tol, preconditioner=p, method="minres")
        assert r.converged
        x = assert_honest(M, b, shift, r, tol, dtype)
        truth = np.linalg.solve(M + shift * np.eye(len(b)), b)
        assert np.linalg.norm(x - truth) <= 100 * tol * np.linalg.norm(truth)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rank_deficient_operator_without_damping_is_reported_singular(dtype):
    lam = np.concatenate([np.zeros(20), np.linspace(1, 3, 80)])  # a GGN without damping
    M, _ = symmetric_with_spectrum(lam, 12)
    b = np.random.default_rng(8).standard_normal(100)
    with pytest.warns(RuntimeWarning, match="singular"):
        r = so.solve(M.astype(dtype), b.astype(dtype))
    assert not r.converged and r.settings["singular"] and r.settings["method_used"] == "cg, then minres"
    assert r.num_matvecs < 200
    damped = so.solve(M.astype(dtype), b.astype(dtype), shift=0.1, tol=TOL[dtype])
    assert damped.converged and damped.settings["method_used"] == "cg"


def test_an_optimizers_diagonal_preconditioner_is_accepted():
    """A DiagonalPreconditioner (as st.preconditioner returns) preconditions CG: the same x, fewer steps."""
    rng = np.random.default_rng(3)
    n = 300
    d = np.logspace(0, 4, n)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = np.diag(d) + 0.1 * (Q[:, :5] * np.arange(1, 6)) @ Q[:, :5].T
    b = rng.standard_normal(n)
    op = so.aslinearoperator(A)
    P = so.DiagonalPreconditioner(np.diag(A).copy(), op.ops, optimizer="Adam")
    plain = so.solve(A, b, tol=1e-10)
    pre = so.solve(A, b, tol=1e-10, preconditioner=P)
    assert pre.converged and plain.converged
    np.testing.assert_allclose(pre.x, np.linalg.solve(A, b), rtol=1e-7)
    assert pre.settings["iterations"] < plain.settings["iterations"] / 3
