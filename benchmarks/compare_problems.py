"""The problems of ``compare.py``, their targets, and the instruments every runner shares.

(a) accuracy: an MLP (64-40-10, tanh) trained briefly on digits, float64, all 1797 images as
one batch, whose dense Hessian is the truth; (b) speed: the ResNet-20 of ``specops.zoo`` on
3x32x32 digits, float32, batch norm in eval mode. The runners of each library
(``compare_peer_*.py``) stop at the same targets (``EIG_TOL``, ``TRACE_RTOL``), count products
with the same counters, and pool trace samples the same way.
"""

from __future__ import annotations

import numpy as np

#: Targets of workload (b): relative residual of the eigenvalues, relative standard error of the trace.
EIG_TOL = 1e-4
TRACE_RTOL = 0.01


class Reached(Exception):
    """Raised from a product observer when a peer's iterate meets the target."""


def mlp_problem(seed=0, hidden=40, epochs=10):
    import torch
    from torch import nn

    from specops.zoo.data import digits
    from specops.zoo.train import train

    X, y = digits(size=8, seed=seed)
    X = torch.as_tensor(X.reshape(len(X), -1), dtype=torch.float64)
    y = torch.as_tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    info = train(model, X, y, epochs=epochs, batch_size=64, lr=0.05, weight_decay=0.0, seed=seed)
    return model, X, y, info



def resnet_problem(images, seed=0):
    import torch

    from specops.zoo.data import digits
    from specops.zoo.torch_resnet import resnet

    X, y = digits(size=32, n=images, seed=seed)
    X = torch.as_tensor(X).repeat(1, 3, 1, 1)
    y = torch.as_tensor(y)
    torch.manual_seed(seed)
    model = resnet(20)
    with torch.no_grad():  # running statistics from the data, then frozen (eval mode)
        model.train()
        model(X)
    model.eval()
    return model, X, y



def eig_error(values, truth):
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if len(values) < len(truth) or not np.all(np.isfinite(values)):
        return float("inf")
    return float(np.max(np.abs(values[: len(truth)] - truth) / np.abs(truth)))



def relative_residuals(model, loss_fn, X, y, V, lams):
    """``||H v - lambda v|| / |lambda|`` per column (unit v), measured with one specops product."""
    import torch

    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y), engine="double_backward", check_deterministic=False)
    V = torch.as_tensor(np.asarray(V) if not torch.is_tensor(V) else V, dtype=torch.float32).reshape(H.shape[0], -1)
    V = V / torch.linalg.vector_norm(V, dim=0)
    lams = np.asarray(lams, dtype=np.float64)
    R = H @ V - V * torch.as_tensor(lams, dtype=V.dtype)
    return (torch.linalg.vector_norm(R, dim=0).numpy() / np.abs(lams)).tolist()



def pooled(samples):
    samples = np.asarray(samples, dtype=np.float64)
    mean = float(samples.mean())
    err = float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    return mean, err



def stop(samples, minimum=10):
    if len(samples) < minimum:
        return False
    mean, err = pooled(samples)
    return err <= TRACE_RTOL * abs(mean)



def count_matvec(op):
    """Count hessian-eigenthings products by shadowing the instance's ``matvec``."""
    orig = op.matvec

    class Counter:
        count = 0

    def matvec(v):
        Counter.count += 1
        return orig(v)

    op.matvec = matvec
    return Counter



def count_matmat(A):
    """Count curvlinops products (columns of every ``_matmat``) by shadowing the instance's method."""
    orig = A._matmat

    class Counter:
        count = 0
        limit = None

    def matmat(M):
        Counter.count += int(M[0].shape[-1])
        if Counter.limit is not None and Counter.count > Counter.limit:
            raise Reached("product cap")
        return orig(M)

    A._matmat = matmat
    return Counter

