"""The operator protocol: wrapping, algebra, restriction, SciPy interop, bad input."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl

import specops as so
from spectra import symmetric_with_spectrum


@pytest.fixture
def dense():
    A, _ = symmetric_with_spectrum(np.linspace(-1, 3, 12), seed=1)
    return A


def test_wraps_numpy_sparse_and_scipy_operators(dense):
    rng = np.random.default_rng(0)
    v, V = rng.standard_normal(12), rng.standard_normal((12, 3))
    for x in (dense, sp.csr_matrix(dense), spl.aslinearoperator(dense)):
        A = so.aslinearoperator(x)
        np.testing.assert_allclose(A @ v, dense @ v, rtol=1e-12)
        np.testing.assert_allclose(A.matmat(V), dense @ V, rtol=1e-12)
        assert A.shape == (12, 12) and A.dtype == np.float64 and A.backend == "numpy"


def test_algebra_matches_dense(dense):
    A = so.aslinearoperator(dense)
    B = so.aslinearoperator(np.diag(np.arange(12.0)))
    I = np.eye(12)
    np.testing.assert_allclose((A + B).to_dense(), dense + np.diag(np.arange(12.0)))
    np.testing.assert_allclose((A - B).to_dense(), dense - np.diag(np.arange(12.0)))
    np.testing.assert_allclose((2.5 * A).to_dense(), 2.5 * dense)
    np.testing.assert_allclose((-A).to_dense(), -dense)
    np.testing.assert_allclose(A.shift(-0.7).to_dense(), dense - 0.7 * I)
    np.testing.assert_allclose((A - 0.7 * A.identity()).to_dense(), dense - 0.7 * I)
    np.testing.assert_allclose((A @ A).to_dense(), dense @ dense, atol=1e-12)
    assert (A @ A).symmetric and not (A @ B).symmetric


def test_restriction_to_slices_and_indices(dense):
    A = so.aslinearoperator(dense)
    np.testing.assert_allclose(A.restrict(slice(2, 7)).to_dense(), dense[2:7, 2:7])
    idx = np.array([0, 1, 5, 9, 10])
    np.testing.assert_allclose(A.restrict(idx).to_dense(), dense[np.ix_(idx, idx)])
    order = [slice(8, 10), slice(0, 2)]  # selection order is kept
    sel = np.r_[8:10, 0:2]
    np.testing.assert_allclose(A.restrict(order).to_dense(), dense[np.ix_(sel, sel)])
    with pytest.raises(ValueError, match="overlap"):
        A.restrict([slice(0, 4), slice(2, 6)])
    with pytest.raises(ValueError, match="no coordinates"):
        A.restrict(slice(3, 3))


def test_to_scipy_roundtrip(dense):
    S = so.aslinearoperator(dense).to_scipy()
    vals = spl.eigsh(S, k=2, which="LA")[0]
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(dense)[-2:], rtol=1e-10)


def test_float32_matrices_keep_their_dtype():
    A = so.aslinearoperator(np.eye(4, dtype=np.float32))
    assert A.dtype == np.float32
    assert (A @ np.ones(4, dtype=np.float32)).dtype == np.float32
    with pytest.raises(TypeError, match="float32"):
        A @ np.ones(4)


def test_bad_input_is_refused_with_a_clear_message(dense):
    with pytest.raises(ValueError, match="square"):
        so.aslinearoperator(np.ones((3, 4)))
    with pytest.raises(ValueError, match="not symmetric"):
        so.aslinearoperator(np.triu(np.ones((4, 4))))
    assert not so.aslinearoperator(np.triu(np.ones((4, 4))), symmetric=False).symmetric
    with pytest.raises(ValueError, match="not symmetric"):
        so.aslinearoperator(sp.csr_matrix(np.triu(np.ones((4, 4)))))
    with pytest.raises(ValueError, match="NaN"):
        so.aslinearoperator(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(TypeError, match="cannot make"):
        so.aslinearoperator("matrix")
    A = so.aslinearoperator(dense)
    with pytest.raises(ValueError, match=r"shape \(12,\)"):
        A @ np.ones(5)
    with pytest.raises(ValueError, match=r"\(12, k\)"):
        A.matmat(np.ones((5, 2)))
    with pytest.raises(ValueError, match="shapes differ"):
        A + so.aslinearoperator(np.eye(3))


def test_check_symmetric_probes_implicit_operators(dense):
    assert so.check_symmetric(spl.aslinearoperator(dense)) < 1e-12
    skew = spl.aslinearoperator(np.triu(np.ones((6, 6))))
    with pytest.raises(ValueError, match="not symmetric"):
        so.check_symmetric(skew)


def test_non_symmetric_operator_is_refused_by_algorithms():
    A = so.aslinearoperator(np.triu(np.ones((4, 4))), symmetric=False)
    for fn in (so.eigsh, so.trace, so.diagonal, so.spectral_density):
        with pytest.raises(ValueError, match="symmetric"):
            fn(A)


class _Flagged(so.LinearOperator):
    """A dense matrix that states its definiteness, as a model operator does."""

    def __init__(self, M, flag):
        super().__init__(M.shape, so.aslinearoperator(M).ops)
        self.M, self.positive_semidefinite = M, flag

    def _matmat(self, V):
        return self.M @ V


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_algebra_keeps_definiteness_where_it_is_provable(dtype):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 12)).astype(dtype)
    G = _Flagged(X @ X.T, True)  # PSD
    H = _Flagged((X + X.T) / 2, False)  # indefinite
    assert np.linalg.eigvalsh(H.M)[0] < 0 < np.linalg.eigvalsh(H.M)[-1]
    expected = {  # (operator, flag): each True checked against the dense spectrum below
        "G + G": (G + G, True), "2 G": (2 * G, True), "0 H": (0 * H, True), "G shift 1": (G.shift(1.0), True),
        "G + 0.5 I": (G + 0.5 * G.identity(), True), "G block": (G.restrict(slice(2, 7)), True),
        "H @ H": (H @ H, True), "3 H": (3 * H, False), "-G": (-G, False), "-H": (-H, False),
        "H shift 1": (H.shift(1.0), None), "G shift -1": (G.shift(-1.0), None), "H - G": (H - G, None),
        "H + G": (H + G, None), "H block": (H.restrict([0, 1, 2]), None), "G @ H": (G @ H, None),
        "plain": (so.aslinearoperator(X @ X.T), None),
    }
    for name, (A, flag) in expected.items():
        assert A.positive_semidefinite is flag, name
        if flag:
            low = np.linalg.eigvalsh(A.to_dense())[0]
            assert low >= -1e-4 * np.abs(np.linalg.eigvalsh(G.M)).max(), name


def test_solve_auto_follows_the_flags_of_the_algebra():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((30, 30))
    G, H = _Flagged(X @ X.T, True), _Flagged((X + X.T) / 2, False)
    b = rng.standard_normal(30)
    assert np.linalg.eigvalsh(H.M)[0] < -1  # H + I is still indefinite
    # unknown definiteness (H + I) starts with CG, which switches when it meets negative curvature
    cases = [(G.shift(0.1), "cg", X @ X.T + 0.1 * np.eye(30)), (-G, "minres", -X @ X.T),
             (H.shift(1.0), "cg, then minres", (X + X.T) / 2 + np.eye(30))]
    for A, method, M in cases:
        r = so.solve(A, b, tol=1e-10)
        assert r.converged and r.settings["method_used"] == method
        np.testing.assert_allclose(r.x, np.linalg.solve(M, b), rtol=1e-6 * np.linalg.cond(M))
