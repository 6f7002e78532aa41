"""Random symmetric matrices with a prescribed spectrum, for the core tests."""

import numpy as np


def symmetric_with_spectrum(eigenvalues, seed=0):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q; returns (A, sorted eigenvalues)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    n = lam.size
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    Q = Q * np.sign(np.diag(R))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, np.sort(lam)


SPECTRA = {
    "indefinite": lambda rng, n: rng.uniform(-3, 5, n),
    "psd_decaying": lambda rng, n: 10.0 / np.arange(1, n + 1) ** 2,
    "clustered": lambda rng, n: np.concatenate([rng.normal(0, 1e-3, n - n // 3), rng.normal(4, 1e-3, n // 3)]),
    "repeated": lambda rng, n: np.concatenate([[5.0] * min(3, n), rng.uniform(-2, 4, n - min(3, n))]),
    "low_rank": lambda rng, n: np.concatenate([rng.uniform(1, 3, min(3, n)), np.zeros(n - min(3, n))]),
}
