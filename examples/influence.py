"""Influence of training points on test predictions (Koh & Liang 2017) with specops.solve.

The influence of up-weighting a training point ``z`` on the loss at a test point is
``I(z, z_test) = -g_test^T (H + lambda I)^-1 g_z`` with ``H`` the Hessian of the mean
training loss, ``g`` loss gradients and ``lambda`` a damping that keeps the system
positive definite away from a minimum. One solve per test point (an inverse-Hessian-vector
product, "s_test") serves every training point; the test points form one block, solved side
by side (one pass over the data per step). The Hessian is never formed: the check at the
end builds it densely (``torch.func.hessian``) only because the model is small.

Run: ``python examples/influence.py``
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import specops as so
from specops.backends import torch as st


def main(verbose: bool = True, dtype: torch.dtype = torch.float64) -> dict:
    """Train a small regression network, compute influences by CG/MINRES and check them densely."""
    torch.manual_seed(0)
    n_train, n_test, d = 96, 3, 4
    X = torch.randn(n_train + n_test, d, dtype=dtype)
    y = torch.tanh(X @ torch.randn(d, 1, dtype=dtype)) + 0.1 * torch.randn(n_train + n_test, 1,
                                                                                    dtype=dtype)
    X, y, X_test, y_test = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = nn.MSELoss()
    for _ in range(300):
        optimizer.zero_grad()
        loss_fn(model(X), y).backward()
        optimizer.step()
    params = list(model.parameters())

    def flat_grad(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss_fn(model(xb), yb), params)
        return torch.cat([g.reshape(-1) for g in grads])

    # --- the influences: one block solve for the test points -------------------------------
    H = st.hessian(model, loss_fn, (X, y))
    damping = 1e-2
    G_test = torch.stack([flat_grad(X_test[j:j + 1], y_test[j:j + 1]) for j in range(n_test)], dim=1)  # (P, 3)
    s_test = so.solve(H, G_test, shift=damping, tol=1e-8 if dtype == torch.float64 else 1e-4)
    G_train = torch.stack([flat_grad(X[i:i + 1], y[i:i + 1]) for i in range(n_train)])  # (N, P)
    influence = -(G_train @ s_test.x).detach().double().numpy()  # (N, 3): up-weighting point i, test loss j
    if verbose:
        print(f"{H.shape[0]} parameters; s_test by {s_test.settings['method_used']}: {s_test.num_matvecs} "
              f"products for {n_test} test points, relative residuals "
              f"{np.array2string(s_test.relative_residual, precision=1)}, converged {s_test.converged.all()}")
        for j in range(n_test):
            top = np.argsort(-np.abs(influence[:, j]))[:3]
            print(f"test point {j}: most influential training points {top.tolist()}, "
                  f"influences {np.array2string(influence[top, j], precision=4)}")

    # --- the check: the dense Hessian by torch.func, solved by NumPy ---------------------------
    names = [name for name, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.equal(theta, H.params_vector()), "specops flattens the parameters in model order"

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces, offset = {}, 0
        for name, p in zip(names, params):
            pieces[name] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return loss_fn(torch.func.functional_call(model, pieces, (X,)), y)

    H_dense = torch.func.hessian(loss_of)(theta).double().numpy()
    lam = np.linalg.eigvalsh(H_dense)
    dense = -G_train.detach().double().numpy() @ np.linalg.solve(H_dense + damping * np.eye(len(theta)),
                                                                 G_test.detach().double().numpy())
    error = float(np.abs(influence - dense).max() / np.abs(dense).max())
    if verbose:
        print(f"Hessian eigenvalues in [{lam.min():.3g}, {lam.max():.3g}]; the largest influence differs from the "
              f"dense solve's by {error:.1e} (relative to the largest influence)")
    return dict(error=error, converged=bool(s_test.converged.all()), num_matvecs=s_test.num_matvecs,
                n=H.shape[0], lambda_min=float(lam.min()), method=s_test.settings["method_used"])


if __name__ == "__main__":
    main()
