"""The one Lanczos (specops/lanczos.py): its bases stay orthogonal to rounding, its results match dense truth.

The orthogonalization removes the recurrence's last blocks first and repeats its pass over
the whole basis only under the DGKS criterion; these tests measure ``||Q^T Q - I||`` of
the bases on operators that stress it (clustered spectra, thick restarts, breakdowns into
invariant subspaces), on every array backend, in float32 and float64, block and
single-vector, and compare eigenvalues and residuals with ``numpy.linalg.eigh``.
"""

import importlib

import numpy as np
import pytest

import specops as so
from specops._checks import Products
from specops.backends.numpy import NumpyOps
from specops.lanczos import probe_lanczos
from specops.ops import ROWS, sum_over_rows

eigsh_module = importlib.import_module("specops.eigsh")
N = 300


def _matrix(kind, n=N, seed=0):
    """A symmetric test matrix with a known spectrum (returned ascending)."""
    rng = np.random.default_rng(seed)
    if kind == "clustered":  # a cluster at the top 1e-3 apart, a near-repeated pair, a bulk
        lam = np.concatenate([rng.uniform(0.0, 0.2, n - 8), [0.9, 0.9 + 1e-9],
                              1.0 + 1e-3 * np.arange(6)])
    elif kind == "low_rank":  # rank 6: Krylov spaces are exhausted, fresh directions replace them
        lam = np.concatenate([np.zeros(n - 6), [1.0, 2.0, 2.0, 3.0, 5.0, 8.0]])
    else:  # "outliers": a Hessian-like bulk near zero with well-separated outliers
        lam = np.concatenate([rng.normal(0.0, 0.01, n - 8), np.geomspace(1.0, 50.0, 8)])
    U, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (U * lam) @ U.T, np.sort(lam)


def _operator(M, backend, dtype):
    if backend == "numpy":
        return so.aslinearoperator(M.astype(dtype))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from specops.backends.torch import matrix_operator

        return matrix_operator(torch.as_tensor(M, dtype={np.float32: torch.float32,
                                                         np.float64: torch.float64}[dtype]))
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    from specops.backends.jax import matrix_operator

    return matrix_operator(jax.numpy.asarray(M, dtype=dtype))


def _loss(Q):
    """``||Q^T Q - I||_2`` in float64."""
    Q = np.asarray(Q, dtype=np.float64)
    return np.linalg.norm(Q.T @ Q - np.eye(Q.shape[1]), 2)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, b", [("clustered", 1), ("clustered", 3), ("low_rank", 1), ("low_rank", 2),
                                     ("outliers", 1)])
def test_thick_restart_basis_orthogonal_and_pairs_match_dense(backend, dtype, kind, b):
    M, lam = _matrix(kind)
    A = _operator(M, backend, dtype)
    eps = np.finfo(dtype).eps
    k = 4
    # a small basis: many thick restarts (and, for the low-rank matrix, breakdowns)
    run, basis = eigsh_module._lanczos(A, k, "LA", 1e-8, 3000, 0, b, 12 + 2 * b)
    vals, vecs, resid, ok = run.values, run.vectors, run.residuals, run.converged
    Q = A.ops.to_numpy(basis.X)[:, : basis.columns]
    assert basis.columns >= k + b
    assert _loss(Q) < 50 * eps
    V = A.ops.to_numpy(vecs)
    assert _loss(V) < 50 * eps
    assert ok.all()
    # Bauer-Fike: each value within its residual (and the rounding of the products) of the truth
    slack = resid + 100 * eps * lam.max()
    assert np.all(np.abs(vals[:, None] - lam[None, :]).min(axis=1) <= slack)
    assert np.all(np.abs(vals - lam[::-1][:k]) <= slack)  # and they are the top k
    true_resid = np.linalg.norm(M @ V - V * vals, axis=0)
    assert np.allclose(resid, true_resid, rtol=0.1, atol=100 * eps * lam.max())


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("window", [None, 5])
def test_probe_bases_orthogonal_and_quadrature_matches_dense(backend, dtype, window):
    M, lam = _matrix("outliers", n=200)
    A = _operator(M, backend, dtype)
    eps = np.finfo(dtype).eps
    writes = []
    store = A.ops

    class Spy(type(store)):  # the same vector operations, recording every write of the stack
        def write_block(self, buffer, start, X, axis=1):
            out = super().write_block(buffer, start, X, axis=axis)
            writes.append(out)
            return out

    spy = Spy.__new__(Spy)
    spy.__dict__.update(store.__dict__)
    steps, p = 40, 3
    Z = A.ops.random(200, range(p), 0, distribution="normal", stream="slq")
    V = A.ops.scale_columns(Z, 1.0 / A.ops.column_norms(Z))
    alpha, beta, length = probe_lanczos(A, Products(A), V, steps, window, store=spy)
    X = A.ops.to_numpy(writes[-1])
    V0 = A.ops.to_numpy(V)
    for i in range(p):
        T = np.diag(alpha[i]) + np.diag(beta[i, :-1], 1) + np.diag(beta[i, :-1], -1)
        if window is None:
            assert _loss(X[:, :, i].T) < 50 * eps
            # Gauss quadrature of v^T f(A) v: moments of the nodes/weights equal the dense ones
            theta, S = np.linalg.eigh(T)
            w = S[0] ** 2
            v = V0[:, i] / np.linalg.norm(V0[:, i])
            for power in range(1, 8):
                exact = v @ np.linalg.matrix_power(M, power) @ v
                assert abs(w @ theta**power - exact) <= 1e3 * eps * lam.max() ** power
            assert abs(theta.max() - lam.max()) < 1e3 * eps * lam.max()
        else:  # the ring holds the last `window` vectors, orthogonal among themselves
            assert _loss(X[:, :, i].T) < 50 * eps


def test_dgks_repeats_the_full_pass_rarely():
    M, lam = _matrix("outliers", n=600)
    A = so.aslinearoperator(M)
    passes = {"full": 0, "window": 0}

    class Counting(NumpyOps):
        def project(self, W, Q, start, stop):
            passes["full" if start == 0 else "window"] += 1
            return super().project(W, Q, start, stop)

    A.ops = Counting(np.float64)
    run, _ = eigsh_module._lanczos(A, 3, "LA", 1e-10, 3000, 0, 1, 20)
    vals, ok, count = run.values, run.converged, run.num_matvecs
    assert ok.all() and np.allclose(vals, lam[::-1][:3], rtol=1e-10)
    steps = count - 3  # the products less the verification's
    # once per step (plus the restarts' and repairs' few); classical Gram-Schmidt twice made 2 per step
    assert steps <= passes["full"] <= 1.35 * steps
    assert passes["window"] >= steps - 2 * (count // 10) - 2


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_rotate_prefix_equals_the_product(backend):
    A = _operator(np.eye(4), backend, np.float64)
    ops = A.ops
    rng = np.random.default_rng(1)
    n = ROWS + 37  # more than one block of rows
    X0, C = rng.normal(size=(n, 6)), rng.normal(size=(4, 3))
    X = ops.write_block(ops.buffer((n, 6)), 0, ops.from_numpy(X0))
    out = ops.to_numpy(ops.rotate_prefix(X, C))
    assert np.allclose(out[:, :3], X0[:, :4] @ C, atol=1e-12)
    assert np.array_equal(out[:, 3:], X0[:, 3:])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float32_reductions_accurate_at_large_n(backend):
    """Inner products and norms of float32 vectors of 3 * 10^5 entries to ~1e-6 relative.

    Summed in one float32 run (torch's MKL ``vector_norm`` and ``X.T @ Y``), a sum of
    squares of 10^7 entries is 1-2 % off; blocks of rows keep it at rounding.
    """
    rng = np.random.default_rng(2)
    n = 300_000
    X64 = rng.normal(size=(n, 2)) + 3.0  # positive-biased: long sums of one sign
    X32 = X64.astype(np.float32)
    exact_gram = X32.astype(np.float64).T @ X32.astype(np.float64)
    ops = _operator(np.eye(2), backend, np.float32).ops
    X = ops.from_numpy(X32)
    gram = ops.to_numpy(ops.inner(X, X))
    assert np.abs(gram - exact_gram).max() <= 2e-6 * np.abs(exact_gram).max()
    norms = ops.column_norms(X)
    assert np.allclose(norms, np.sqrt(np.diag(exact_gram)), rtol=1e-6)
    assert sum_over_rows(lambda x: x.sum(axis=0), X64).shape == (2,)


# --- the basis in other memory than the operator's vectors -------------------------------
def _same_results(A, store, k=4, **kw):
    """eigsh and spectral_density with the basis kept by ``store`` against the default."""
    ops = A.ops
    for fn, args in ((so.eigsh, dict(k=k, max_basis=14, **kw)),
                     (so.spectral_density, dict(num_probes=3, num_steps=25))):
        default, moved = fn(A, **args), fn(A, basis_memory=store, **args)
        assert moved.num_matvecs == default.num_matvecs
        if fn is so.eigsh:
            assert np.allclose(moved.eigenvalues, default.eigenvalues, rtol=1e-10, atol=0)
            assert np.allclose(moved.residuals, default.residuals, rtol=1e-3, atol=1e-12)
            assert ops.is_native(moved.eigenvectors)  # results come back as the operator's arrays
            overlap = ops.to_numpy(moved.eigenvectors).T @ ops.to_numpy(default.eigenvectors)
            assert np.allclose(np.abs(np.diag(overlap)), 1.0, atol=1e-8)
        else:
            assert np.allclose(moved.nodes, default.nodes, rtol=1e-9, atol=1e-12)
            assert np.abs(moved.weights - default.weights).max() < 1e-8  # weights sum to 1 per probe
        if store != ops:
            assert moved.settings["basis_memory"].startswith(store.name)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_basis_in_numpy_host_memory_equals_the_default(backend):
    M, lam = _matrix("clustered", n=200)
    A = _operator(M, backend, np.float64)
    store = NumpyOps(np.float64)
    _same_results(A, store)
    _same_results(A, store, block_size=2)
    assert so.eigsh(A, k=3, basis_memory="host").settings.get("basis_memory") == (
        None if backend == "torch" else "numpy:cpu")  # torch on the CPU: host memory is its own


def test_basis_memory_refused_clearly():
    A = so.aslinearoperator(np.diag(np.arange(1.0, 50.0)))
    with pytest.raises(ValueError, match="basis_memory"):
        so.eigsh(A, basis_memory="disk")
    with pytest.raises(ValueError, match="dtype"):
        so.spectral_density(A, basis_memory=NumpyOps(np.float32))


def test_basis_in_host_memory_for_a_cuda_operator():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from specops.backends.torch import TorchOps, matrix_operator

    M, _ = _matrix("outliers", n=400)
    A = matrix_operator(torch.as_tensor(M, device="cuda"))
    store = TorchOps(torch.float64, "cpu")
    assert A.ops.host() == store
    _same_results(A, store)
    r = so.eigsh(A, k=3, basis_memory="host")
    assert r.settings["basis_memory"] == "torch:cpu" and r.eigenvectors.device.type == "cuda"
