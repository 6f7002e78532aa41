"""How results print and unpack: each summary shows the numbers with their uncertainties, checked
against dense truth and against the result's own fields; EigResult unpacks as SciPy's eigsh,
TraceResult and DiagonalResult as (estimate, stderr)."""

import re

import numpy as np
import pytest
from scipy.sparse.linalg import eigsh as scipy_eigsh

import specops as so


def matrix(n=150, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[50.0, 40.0, 30.0], rng.uniform(0.0, 2.0, n - 3)])
    return (Q * lam) @ Q.T, lam


def numbers(text):
    return [float(x) for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", text)]


def test_eig_result_prints_eigenvalues_residuals_and_convergence():
    M, lam = matrix()
    r = so.eigsh(M, k=3, tol=1e-10)
    text = repr(r)
    assert text.startswith("EigResult: 3 eigenpairs (LA, lanczos") and "3 of 3 converged" in text
    rows = [line.split() for line in text.splitlines()[2:5]]
    for i, row in enumerate(rows):
        assert int(row[0]) == i and row[3] == "yes"
        assert float(row[1]) == pytest.approx(np.sort(lam)[::-1][i], rel=1e-7)   # against the dense truth
        assert float(row[2]) == pytest.approx(r.residuals[i], rel=0.06)          # printed to 2 digits
    assert "eigenvectors: numpy array of shape (150, 3)" in text
    # a budget that runs out shows it
    short = so.eigsh(M, k=3, tol=1e-12, max_matvecs=12)
    assert "NO" in repr(short) and f"{int(short.converged.sum())} of 3 converged" in repr(short)
    # from JSON (no eigenvectors) the same numbers print
    back = so.EigResult.from_json(r.to_json())
    assert repr(back).splitlines()[:5] == text.splitlines()[:5] and "eigenvectors" not in repr(back)


def test_eig_result_unpacks_like_scipy():
    M, _ = matrix()
    r = so.eigsh(M, k=3, tol=1e-10)
    w, v = r
    assert w is r.eigenvalues and v is r.eigenvectors
    w_sp, v_sp = scipy_eigsh(M, k=3, which="LA")
    order = np.argsort(w_sp)[::-1]        # specops gives LA descending, SciPy ascending
    np.testing.assert_allclose(w, w_sp[order], rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(v * v_sp[:, order], axis=0)), 1.0, atol=1e-7)
    with pytest.raises(ValueError):
        a, b, c = r


def test_trace_and_diagonal_print_and_unpack_with_their_errors():
    M, lam = matrix()
    t = so.trace(M, method="hutchinson", max_matvecs=40, seed=3)
    est, err = t
    assert (est, err) == (t.estimate, t.stderr)
    text = repr(t)
    assert text.startswith("TraceResult: ") and "hutchinson, 40 of 40 products" in text
    shown_est, shown_err = numbers(text.split("(")[0].split(":")[1])
    assert shown_est == pytest.approx(t.estimate, rel=1e-5) and shown_err == pytest.approx(t.stderr, rel=0.06)
    assert abs(t.estimate - lam.sum()) < 5 * t.stderr           # the error it prints is honest here
    d = so.diagonal(M, max_matvecs=30, seed=0)
    e, s = d
    assert e is d.estimate and s is d.stderr
    assert repr(d).startswith("DiagonalResult: 150 entries (hutchinson, 30 products")
    assert f"{d.estimate[0]:.4g} +- {d.stderr[0]:.2g}" in repr(d)


def test_density_and_landscape_summaries():
    M, lam = matrix()
    dens = so.spectral_density(M, num_probes=4, num_steps=30, seed=0)
    text = repr(dens)
    assert text.startswith("SpectralDensity: SLQ, 4 probes x 30 steps (120 products")
    lo, hi = numbers(text.split("support")[1])[:2]
    assert lo == pytest.approx(dens.nodes.min(), rel=1e-3) and hi == pytest.approx(lam.max(), rel=1e-3)
    est, err = dens.trace()
    assert f"trace {est:.5g} +- {err:.2g}" in text

    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    H = st.hessian(model, torch.nn.MSELoss(), (torch.randn(8, 3, dtype=torch.float64),
                                               torch.randn(8, 2, dtype=torch.float64)))
    ls = so.landscape(H, "random-2d", steps=3, seed=0)
    text = repr(ls)
    assert text.startswith("Landscape: 2-D along random directions, 3 x 3 losses")
    assert f"loss at the center {ls.center_loss:.6g}" in text and f"{ls.losses.max():.6g}" in text
