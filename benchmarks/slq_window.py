"""Accuracy cost of SLQ's bounded reorthogonalization window, against dense truth.

A Hessian-like spectrum (a Marchenko-Pastur bulk near zero with a few negative
eigenvalues, and a handful of outliers two orders of magnitude above it) as a dense
matrix; SLQ (10 probes x 64 steps) with full reorthogonalization and with windows of the
last ``w`` Lanczos vectors, in float64 and float32. Reported per setting:

- ``moments``: the largest relative error, over k = 1..8, of the quadrature's moments
  ``sum_j w_j theta_j^k`` against the exact ``v^T A^k v`` of the same probes (the method's
  error; SLQ's statistical error over probes is not in it);
- ``W1``: Wasserstein-1 distance of the estimated eigenvalue CDF to the exact one,
  relative to the spectrum's width;
- ``trace``: the trace estimate's relative difference to full reorthogonalization;
- ``top``: relative error of the largest node against lambda_max;
- ``ghosts``: mean number per probe of nodes within 1e-3 relative of lambda_max (copies
  of the top outlier; 1 without ghosts);
- ``bulk``: L1 distance, over the bulk (eigenvalues below 10 % of lambda_max), of the
  density smoothed with sigma = 2 % of the bulk's width to the exact eigenvalues smoothed
  alike (the bulk holds 99.7 % of the mass; SLQ's statistical error over 10 probes is in it).

Run: ``python benchmarks/slq_window.py`` (about a minute on one core).
"""

from __future__ import annotations

import numpy as np

import specops as so
from specops.random import probes


def hessian_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bulk = np.sort(np.linalg.eigvalsh(np.cov(rng.standard_normal((n - 10, 2 * n)))))  # MP, ratio 1/2
    bulk = 0.5 * bulk - 0.05  # a few negative eigenvalues
    outliers = np.geomspace(5.0, 200.0, 10)
    lam = np.concatenate([bulk, outliers])
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    Q = Q * np.sign(np.diag(R))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, np.sort(lam)


def measure(A, lam, d, V, kmax=8):
    p = V.shape[1]
    exact = np.zeros((kmax, p))
    W = V.copy()
    for k in range(kmax):
        W = A.astype(np.float64) @ W
        exact[k] = np.einsum("np,np->p", V, W)
    est = np.stack([np.sum(d.weights * d.nodes ** (k + 1), axis=1) for k in range(kmax)])
    scale = np.abs(lam).max() ** np.arange(1, kmax + 1)[:, None]
    moments = float((np.abs(est - exact) / scale).max())
    xs = np.linspace(lam.min() - 1, lam.max() + 1, 200001)
    cdf = np.searchsorted(lam, xs, side="right") / lam.size
    w1 = float(np.trapezoid(np.abs(d.cdf(xs) - cdf), xs) / (lam.max() - lam.min()))
    top = float(abs(d.nodes.max() - lam.max()) / lam.max())
    ghosts = float(np.mean(np.sum((np.abs(d.nodes - lam.max()) < 1e-3 * lam.max()) & (d.weights > 0), axis=1)))
    inside = lam[lam < 0.1 * lam.max()]
    sigma = 0.02 * (inside.max() - inside.min())
    grid = np.linspace(inside.min() - 5 * sigma, inside.max() + 5 * sigma, 2001)
    truth = np.exp(-0.5 * ((grid[:, None] - lam[None, :]) / sigma) ** 2).sum(axis=1) / (lam.size * sigma * np.sqrt(2 * np.pi))
    bulk = float(np.trapezoid(np.abs(d.evaluate(grid, sigma) - truth), grid))
    return moments, w1, top, ghosts, bulk


def main(n=2000, p=10, steps=64):
    A64, lam = hessian_like(n)
    print(f"n={n}, {p} probes x {steps} steps; lambda in [{lam.min():.3g}, {lam.max():.3g}], "
          f"exact fraction below 0.1 lambda_max: {np.mean(lam < 0.1 * lam.max()):.4f}")
    V = probes(n, range(p), 0, distribution="rademacher", stream="slq")
    V = V / np.linalg.norm(V, axis=0)
    print(f"{'dtype':8} {'window':>6} {'moments':>9} {'W1':>9} {'trace':>9} {'top':>9} {'ghosts':>6} {'bulk L1':>8}")
    for dtype in (np.float64, np.float32):
        A = A64.astype(dtype)
        ref = None
        for w in (None, 32, 16, 8, 4, 2):
            d = so.spectral_density(A, num_probes=p, num_steps=steps, seed=0, reorth_window=w)
            assert d.settings["reorth_window"] == w
            ref = d.trace()[0] if ref is None else ref
            moments, w1, top, ghosts, bulk = measure(A64, lam, d, V)
            tr = abs(d.trace()[0] - ref) / abs(ref)
            print(f"{np.dtype(dtype).name:8} {str(w or 'full'):>6} {moments:9.1e} {w1:9.1e} {tr:9.1e} "
                  f"{top:9.1e} {ghosts:6.1f} {bulk:8.4f}")


if __name__ == "__main__":
    main()
