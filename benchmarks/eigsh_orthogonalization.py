"""Orthogonalization's share of ``eigsh``'s time at 10^7 parameters, before and after DGKS.

``eigsh`` (k = 5, block size 1, default basis) on a cheap synthetic float32 operator of
size n (default 10^7: a diagonal bulk plus eight well-separated outliers), run twice side
by side: with the vector operations as they were before (classical Gram-Schmidt twice
over the whole basis at every step, a row-major torch basis, the thick restart's rotation
into a second copy, inner products and norms summed by MKL in one float32 run:
:class:`Before`) and as they are now (the recurrence's last two blocks removed first,
one pass over the whole basis repeated only under the Daniel-Gragg-Kaufman-Stewart
criterion, a column-major basis, fused ``W - Q C``, the rotation in place, reductions
summed in blocks of rows in float64). Timed: ``orthogonalize`` (every Gram-Schmidt pass, the multiplicity
check's projections included), the basis' rotations and combinations
(``rotate_prefix``, ``combine_prefix``) and the products. The products of this operator
are nearly free, so the share is then projected onto a real model: one Hessian-vector
product of a ResNet-18 (11.2 M parameters, random weights, CIFAR-sized images, float32)
is timed here and substituted for each synthetic product, with the basis work rescaled
from n to the model's n (linear in n).

Run: ``python benchmarks/eigsh_orthogonalization.py [--n 10000000] [--batch 8]``
(about 10 minutes on two shared cores at n = 10^7; 2 x 1.6 GB of basis).

``--end-to-end`` instead runs ``eigsh(k=5)`` on the real ResNet-18 Hessian (batch ``--batch``)
to convergence, with the same timers: the share of orthogonalization measured, not projected.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import specops as so
from specops.backends.torch import TorchOps
from specops.zoo.torch_resnet import BasicBlock


class Before(TorchOps):
    """The vector operations as they were before this benchmark's change (for the side-by-side run)."""

    def buffer(self, shape):
        return self.zeros(shape)

    def inner(self, X, Y):
        return X.T @ Y

    def column_norms(self, X):
        return self.to_numpy(torch.linalg.vector_norm(X, dim=0))

    def subtract_combine(self, W, X, C):
        return W - self.combine(X, C)

    def orthogonalize(self, W, Q, columns=None, recent=0):
        Q = Q if columns is None else Q[:, :columns]
        if Q.shape[1] == 0:
            return W, np.zeros((0, W.shape[1]))
        C1 = self.inner(Q, W)
        W = W - self.combine(Q, C1)
        C2 = self.inner(Q, W)
        W = W - self.combine(Q, C2)
        return W, self.to_numpy(C1) + self.to_numpy(C2)

    def rotate_prefix(self, X, C):
        return self.write_block(X, 0, self.combine_prefix(X, C))


class Synthetic(so.LinearOperator):
    """A float32 torch diagonal: a bulk in [0, 0.1] and eight outliers from 1 to 20.

    Its products cost O(n); its top eigenvalues are known exactly (Lanczos from a random
    start sees a diagonal as it sees any matrix with the same spectrum).
    """

    def __init__(self, n: int, ops: TorchOps, seed: int = 0):
        super().__init__((n, n), ops)
        g = torch.Generator().manual_seed(seed)
        self.d = torch.rand(n, generator=g) * 0.1
        self.d[:8] = torch.tensor(np.geomspace(1.0, 20.0, 8), dtype=torch.float32)

    def _matmat(self, V):
        return self.d[:, None] * V


def timed(ops, name, log):
    """Time ``ops.name`` into ``log[name]``; a timed call inside another counts for the outer one only."""
    fn = getattr(ops, name)

    def wrapper(*args, **kwargs):
        if log.get("inside"):
            return fn(*args, **kwargs)
        log["inside"] = True
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            log[name] = log.get(name, 0.0) + time.perf_counter() - t
            log["inside"] = False

    setattr(ops, name, wrapper)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) for 32x32 inputs: four stages of two basic blocks, 64-512 channels."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, c = [], 64
        for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(c, width, stride), BasicBlock(width, width)]
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def resnet18_product(batch: int, repeats: int = 3) -> tuple[int, float, float]:
    """``(n, seconds per Hessian-vector product, seconds per gradient)`` of ResNet-18."""
    from specops.backends.torch import hessian

    torch.manual_seed(0)
    model = ResNet18().eval()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    H = hessian(model, nn.CrossEntropyLoss(), (x, y), check_deterministic=False)
    n = H.shape[0]
    v = torch.randn(n)
    H.matvec(v)  # warm-up (graph caches)
    t = time.perf_counter()
    for _ in range(repeats):
        H.matvec(v)
    hvp = (time.perf_counter() - t) / repeats
    loss = nn.CrossEntropyLoss()
    t = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad()
        loss(model(x), y).backward()
    return n, hvp, (time.perf_counter() - t) / repeats


BASIS = ("orthogonalize", "rotate_prefix", "combine_prefix")


def run(n: int, ops: TorchOps) -> dict:
    """``eigsh(k=5)`` of :class:`Synthetic` with its basis work and products timed."""
    A = Synthetic(n, ops)
    log = dict.fromkeys(BASIS + ("products",), 0.0)
    for name in BASIS:
        timed(A.ops, name, log)
    matmat = A._matmat

    def counted(V):
        t = time.perf_counter()
        out = matmat(V)
        log["products"] += time.perf_counter() - t
        return out

    A._matmat = counted
    t = time.perf_counter()
    r = so.eigsh(A, k=5)
    log["total"] = time.perf_counter() - t
    top = np.geomspace(1.0, 20.0, 8)[::-1][:5]
    V = r.eigenvectors.double()
    log.update(products_count=r.num_matvecs, converged=bool(r.converged.all()),
               error=float(np.max(np.abs(np.sort(r.eigenvalues)[::-1] - top) / top)),
               orthogonality=float(torch.linalg.matrix_norm(V.T @ V - torch.eye(5, dtype=V.dtype), 2)))
    return log


def end_to_end(batch: int, tol: float) -> None:
    """``eigsh(k=5)`` of a real ResNet-18's Hessian, its basis work and products timed."""
    from specops.backends.torch import hessian

    torch.manual_seed(0)
    model = ResNet18().eval()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    H = hessian(model, nn.CrossEntropyLoss(), (x, y))
    log = dict.fromkeys(BASIS, 0.0)
    for name in BASIS:
        timed(H.ops, name, log)
    H.matvec(torch.randn(H.shape[0]))  # the cached graph's first pass, outside the timing
    H.matvec_seconds, products_before = 0.0, H.num_matvecs
    t = time.perf_counter()
    r = so.eigsh(H, k=5, tol=tol)
    total = time.perf_counter() - t
    products = H.num_matvecs - products_before
    params = [p for p in model.parameters()]
    t = time.perf_counter()
    for _ in range(3):
        torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), params)
    grad = (time.perf_counter() - t) / 3
    other = total - H.matvec_seconds - sum(log.values())
    print(f"ResNet-18 (n = {H.shape[0]:.3g}, batch {batch} x 3 x 32 x 32, float32), eigsh(k=5, tol={tol}): "
          f"{products} products, {total:.1f} s\n{r}")
    print(f"  products {H.matvec_seconds:.1f} s ({H.matvec_seconds / products:.2f} s each, "
          f"{H.matvec_seconds / products / grad:.2f}x a gradient of {grad:.2f} s measured after), "
          f"orthogonalize {log['orthogonalize']:.1f} s = {100 * log['orthogonalize'] / total:.1f} % of eigsh, "
          f"rotate/combine {log['rotate_prefix'] + log['combine_prefix']:.1f} s, other host work {other:.1f} s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--end-to-end", action="store_true", help="eigsh on the real ResNet-18 Hessian")
    parser.add_argument("--tol", type=float, default=1e-3, help="eigsh tolerance of --end-to-end")
    args = parser.parse_args()
    if args.end_to_end:
        return end_to_end(args.batch, args.tol)
    runs = {}
    for label, ops in (("before", Before(torch.float32)), ("after", TorchOps(torch.float32))):
        runs[label] = log = run(args.n, ops)
        log["other"] = log["total"] - sum(log[name] for name in BASIS + ("products",))
        print(f"{label}: n = {args.n:.3g}, k = 5, float32: {log['products_count']} products, {log['total']:.1f} s; "
              f"max relative eigenvalue error {log['error']:.1e}, ||V^T V - I|| = {log['orthogonality']:.1e}, "
              f"converged {log['converged']}")
        print(f"  orthogonalize {log['orthogonalize']:.1f} s "
              f"({log['orthogonalize'] / log['products_count'] * 1e3:.0f} ms per product), "
              f"rotate_prefix {log['rotate_prefix']:.1f} s, combine_prefix {log['combine_prefix']:.1f} s, "
              f"synthetic products {log['products']:.1f} s, other {log['other']:.1f} s")
    b, a = runs["before"], runs["after"]
    print(f"after / before: orthogonalize {a['orthogonalize'] / b['orthogonalize']:.2f}x, "
          f"all basis work {sum(a[x] for x in BASIS) / sum(b[x] for x in BASIS):.2f}x, "
          f"eigsh {a['total'] / b['total']:.2f}x")
    n18, hvp, grad = resnet18_product(args.batch)
    scale = n18 / args.n
    print(f"ResNet-18 (n = {n18:.3g}, batch {args.batch} x 3 x 32 x 32): {hvp * 1e3:.0f} ms per product "
          f"({hvp / grad:.2f}x a gradient of {grad * 1e3:.0f} ms)")
    for label, t_prod in (("measured product", hvp), ("a product at 2.5x the gradient", 2.5 * grad)):
        for run_label, log in runs.items():
            orth = log["orthogonalize"] * scale
            rest = (log["total"] - log["orthogonalize"] - log["products"]) * scale
            projected = orth + rest + log["products_count"] * t_prod
            print(f"  {run_label}: projected eigsh on ResNet-18 with {label} ({t_prod * 1e3:.0f} ms), "
                  f"{log['products_count']} products: {projected:.0f} s, orthogonalization "
                  f"{100 * orth / projected:.1f} %, all basis work {100 * sum(log[x] for x in BASIS) * scale / projected:.1f} %")
    for run_label, log in runs.items():
        orth = log["orthogonalize"] * scale
        rest = (log["total"] - log["orthogonalize"] - log["products"]) * scale
        print(f"  {run_label}: orthogonalization stays <= 20 % while a product takes >= "
              f"{max(0.0, 4 * orth - rest) / log['products_count'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
