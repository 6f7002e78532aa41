"""Diagonal estimation against the exact diagonal."""

import numpy as np
import pytest

import specops as so
from spectra import symmetric_with_spectrum


def test_unbiased_per_entry_with_honest_stderr():
    A, _ = symmetric_with_spectrum(np.linspace(-1, 3, 40), seed=2)
    res = [so.diagonal(A, max_matvecs=20, seed=s) for s in range(300)]
    est = np.array([r.estimate for r in res])
    spread = est.std(axis=0, ddof=1)
    z = (est.mean(axis=0) - np.diag(A)) / (spread / np.sqrt(len(res)))
    assert np.abs(z).max() < 4.5
    ratio = np.sqrt(np.mean(np.array([r.stderr for r in res]) ** 2, axis=0)) / spread
    assert 0.7 < np.median(ratio) < 1.3


def test_exact_for_diagonal_matrices_and_exact_method():
    D = np.diag(np.arange(1.0, 9.0))
    r = so.diagonal(D, max_matvecs=3)
    np.testing.assert_allclose(r.estimate, np.arange(1.0, 9.0))
    np.testing.assert_allclose(r.stderr, 0.0, atol=1e-15)
    A, _ = symmetric_with_spectrum(np.linspace(0, 1, 25), seed=0)
    e = so.diagonal(A, method="exact", chunk_size=7)
    np.testing.assert_allclose(e.estimate, np.diag(A), atol=1e-14)
    assert e.num_matvecs == 25


def test_json_round_trip_and_bad_method():
    r = so.diagonal(np.eye(4), max_matvecs=4)
    back = so.DiagonalResult.from_json(r.to_json())
    np.testing.assert_array_equal(back.estimate, r.estimate)
    with pytest.raises(ValueError, match="hutchinson, exact"):
        so.diagonal(np.eye(4), method="xdiag")
