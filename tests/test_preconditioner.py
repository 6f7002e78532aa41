"""specops.preconditioned and stability_threshold against dense NumPy and the recurrences' roots."""

import numpy as np
import pytest

import specops as so
from specops.preconditioner import stability_threshold


def _spd(n, seed):
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    return (Q * np.linspace(-1, 5, n)) @ Q.T


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_preconditioned_equals_dense_and_maps_back(dtype):
    H = _spd(30, 0).astype(dtype)
    d = np.random.default_rng(1).uniform(0.1, 3.0, 30)
    A = so.preconditioned(H, d)
    truth = H.astype(np.float64) / np.sqrt(np.outer(d, d))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(A.to_dense(), truth, atol=tol * np.abs(truth).max())
    # the eigenvalues of P^-1 H (a non-symmetric matrix) by numpy.linalg.eig
    eig = np.sort(np.linalg.eigvals(np.diag(1 / d) @ H.astype(np.float64)).real)[::-1]
    r = so.eigsh(A, k=3, tol=1e-10 if dtype == np.float64 else 1e-5)
    np.testing.assert_allclose(r.eigenvalues, eig[:3], rtol=1e-9 if dtype == np.float64 else 1e-4)
    W = A.map_back(r.eigenvectors)
    np.testing.assert_allclose(np.linalg.norm(W, axis=0), 1, rtol=1e-6)
    R = (H.astype(np.float64) @ W) / d[:, None] - W * r.eigenvalues
    assert np.abs(R).max() < (1e-8 if dtype == np.float64 else 1e-3) * eig[0]
    w = A.map_back(r.eigenvectors[:, 0])
    np.testing.assert_allclose(w, W[:, 0], rtol=1e-6)


def test_bad_preconditioners():
    H = _spd(5, 0)
    with pytest.raises(ValueError, match="positive and finite; 1 of 5"):
        so.preconditioned(H, np.array([1, 1, 0, 1, 1.0]))
    with pytest.raises(ValueError, match="5 entries but the operator acts on 4"):
        so.preconditioned(H[:4, :4], np.ones(5))
    with pytest.raises(ValueError, match="flat array"):
        so.preconditioned(H, np.ones((5, 1)))
    with pytest.raises(TypeError, match="diagonal preconditioner"):
        so.preconditioned(H, so.aslinearoperator(np.eye(5)))


def _spectral_radius(a, m, tau, nesterov):
    """The spectral radius of the linear recurrence of (theta, lr * b) with a = lr * lambda."""
    if nesterov:
        M = np.array([[1 - a * (1 + m), -m * m], [a, m]])
    else:  # theta' = theta - (1 - tau) a theta + m (theta - theta_prev)
        M = np.array([[1 + m - (1 - tau) * a, -m], [1, 0]])
    return np.abs(np.linalg.eigvals(M)).max()


@pytest.mark.parametrize("m, tau, nesterov", [(0, 0, False), (0.9, 0, False), (0.5, 0.3, False), (0.9, 0.9, False),
                                              (0.9, 0, True), (0.3, 0, True), (0.0, 0, True)])
def test_threshold_is_where_the_recurrence_turns_unstable(m, tau, nesterov):
    lr = 0.01
    thr = stability_threshold(lr, momentum=m, dampening=tau, nesterov=nesterov)
    assert _spectral_radius(0.999 * thr * lr, m, tau, nesterov) < 1
    assert _spectral_radius(1.001 * thr * lr, m, tau, nesterov) > 1
    # and nowhere below it
    for a in np.linspace(1e-3, 0.99, 50) * thr * lr:
        assert _spectral_radius(a, m, tau, nesterov) < 1


def test_threshold_arguments():
    assert stability_threshold(1e-3, momentum=0.9, dampening=0.9) == pytest.approx(38 / 1e-3)
    with pytest.raises(ValueError, match="learning rate must be positive"):
        stability_threshold(0.0)
    with pytest.raises(ValueError, match="momentum must lie"):
        stability_threshold(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="Nesterov momentum with dampening"):
        stability_threshold(0.1, momentum=0.5, dampening=0.5, nesterov=True)
