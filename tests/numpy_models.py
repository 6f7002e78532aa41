"""Small NumPy models with closed-form gradients and Hessian products, for core tests.

Softmax regression: loss(W) = mean_i CE(softmax(W^T x_i), y_i) with W of shape (d, c).
Its Hessian is sum_i x_i x_i^T (x) (diag(p_i) - p_i p_i^T) / N, known in closed form, so
the model operator machinery (batching, weighting, reductions, distribution) can be
checked against a dense matrix built independently.
"""

import numpy as np


def digits(n=300, seed=0):
    """Standardized scikit-learn digits (ships with scikit-learn, no download)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(X))[:n]
    X = X[idx] / 16.0
    return X, y[idx]


class SoftmaxRegression:
    def __init__(self, d, c, reduction="mean"):
        self.d, self.c, self.reduction = d, c, reduction

    def _probs(self, theta, X):
        Z = X @ theta.reshape(self.d, self.c)
        Z = Z - Z.max(axis=1, keepdims=True)
        P = np.exp(Z)
        return P / P.sum(axis=1, keepdims=True)

    def _scale(self, X):
        return 1.0 / len(X) if self.reduction == "mean" else 1.0

    def loss(self, theta, batch):
        X, y = batch
        P = self._probs(theta, X)
        return -np.log(P[np.arange(len(y)), y]).sum() * self._scale(X)

    def grad(self, theta, batch):
        X, y = batch
        P = self._probs(theta, X)
        P[np.arange(len(y)), y] -= 1.0
        return (X.T @ P).ravel() * self._scale(X)

    def hvp(self, theta, batch, V):
        X, _ = batch
        P = self._probs(theta, X)
        out = np.empty_like(V)
        for j in range(V.shape[1]):
            U = X @ V[:, j].reshape(self.d, self.c)              # (N, c)
            G = P * U - P * (P * U).sum(axis=1, keepdims=True)    # (diag p - p p^T) u per sample
            out[:, j] = (X.T @ G).ravel() * self._scale(X)
        return out

    def dense_hessian(self, theta, X):
        """sum_i kron(x_i x_i^T, diag(p_i) - p_i p_i^T), scaled by the reduction."""
        P = self._probs(theta, X)
        H = np.zeros((self.d * self.c, self.d * self.c))
        for x, p in zip(X, P):
            H += np.kron(np.outer(x, x), np.diag(p) - np.outer(p, p))
        return H * self._scale(X)
