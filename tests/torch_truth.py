"""Dense Hessians of PyTorch losses, independent of specops, for the backend's tests.

The truth is PyTorch's plain double backward, one column at a time (attention on its math
kernel), checked against central differences of gradients (Richardson-extrapolated): an independent computation that
needs no second derivatives. ``torch.func.hessian`` is not used: it is ``jacfwd(jacrev)``,
whose forward derivative of layer norm's backward is wrong in torch 2.13.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def flat_loss(model, loss):
    """``theta -> loss(call)`` for the trainable parameters, where ``call(*args, **kwargs)`` runs
    the model with the parameters ``theta`` (buffers copied per call); and theta itself.
    """
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(flat):
        pieces = flat.split([s.numel() for s in shapes])
        state = {n: p.detach() for n, p in params.items()}
        state.update({n: t.view(s) for n, t, s in zip(names, pieces, shapes)})
        state.update({n: b.clone() for n, b in buffers.items()})
        return loss(lambda *args, **kwargs: torch.func.functional_call(model, state, args, kwargs))

    return f, theta


def grad_at(f, theta):
    t = theta.detach().requires_grad_(True)
    return torch.autograd.grad(f(t), t)[0]


def frozen_padding(model):
    """(n,) ones, zeros at the ``padding_idx`` rows of embeddings: PyTorch's gradient leaves
    them out, so the consistent Hessian has zero rows and columns there."""
    parts = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keep = torch.ones_like(p, dtype=torch.float64)
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, torch.nn.Embedding) and owner.padding_idx is not None and name.endswith("weight"):
            keep[owner.padding_idx] = 0
        parts.append(keep.reshape(-1))
    return torch.cat(parts)


def dense_truth(model, loss, fd_rtol=1e-6, V=None):
    """The dense Hessian (NumPy, float64) of ``loss(call)`` in the model's trainable parameters,
    or, given ``V`` (n, k), its product with ``V`` (k double backwards instead of n)."""
    f, theta = flat_loss(model, loss)
    keep = frozen_padding(model).to(theta.dtype)
    t = theta.clone().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no double backward
        (g,) = torch.autograd.grad(f(t), t, create_graph=True)
        if V is None:  # rows of the (symmetric) Hessian
            eye = torch.eye(theta.numel(), dtype=theta.dtype)
            D = torch.stack([torch.autograd.grad(g, t, eye[i], retain_graph=True)[0] for i in range(theta.numel())])
            D = keep[:, None] * D * keep[None, :]
        else:
            W = V.to(theta.dtype) * keep[:, None]
            HV = torch.stack([torch.autograd.grad(g, t, W[:, j], retain_graph=True)[0] for j in range(W.shape[1])], 1)
            HV = HV * keep[:, None]
    v = torch.randn(theta.numel(), dtype=theta.dtype) * keep
    u = v / v.norm()

    def central(h):
        return (grad_at(f, theta + h * u) - grad_at(f, theta - h * u)) / (2 * h) * v.norm() * keep

    fd = (4 * central(1e-3) - central(2e-3)) / 3  # Richardson: truncation error O(h^4)
    with sdpa_kernel([SDPBackend.MATH]):
        exact = torch.autograd.grad(g, t, v * keep, retain_graph=True)[0] * keep
    assert rel(fd, exact) < fd_rtol, "the dense truth disagrees with finite differences"
    return (D if V is None else HV).double().numpy()


def pair_loss(loss_fn, batch):
    """``loss(call)`` for ``loss_fn(model(inputs), targets)``."""
    return lambda call: loss_fn(call(batch[0]), batch[1])


def finite_difference_truth(model, loss, V, h=1e-3):
    """``H V`` by Richardson-extrapolated central differences of PyTorch's gradients: for models
    whose double backward PyTorch lacks (the error is O(h^4) where the loss is smooth)."""
    f, theta = flat_loss(model, loss)
    keep = frozen_padding(model).to(theta.dtype)
    cols = []
    for j in range(V.shape[1]):
        v = V[:, j].to(theta.dtype) * keep
        u = v / v.norm()

        def central(step):
            return (grad_at(f, theta + step * u) - grad_at(f, theta - step * u)) / (2 * step)

        cols.append((4 * central(h) - central(2 * h)) / 3 * v.norm() * keep)
    return torch.stack(cols, 1).double().numpy()
