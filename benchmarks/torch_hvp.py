"""Hessian-vector products and top eigenvalues of ResNet-20: specops' PyTorch engines vs PyHessian.

The setting of issue 3: a CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels,
batch norm in eval mode), float32, 128 random 3x32x32 inputs with random labels, given once
as one batch and once as 4 batches of 32.

Reported (medians over ``--repeats``; threads fixed by ``--threads``):

1. one gradient (plain ``torch.autograd.grad``), and one Hessian-vector product per engine
   as a ratio to it; also the amortized cost per column of an 8-column ``matmat``; with
   ``--native``, also the graph engines with PyTorch's own double-backward formulas (the
   state before specops rerouted convolutions and eval-mode batch norm, same process);
   PyHessian 0.1's products (``hessian_vector_product`` on its cached graph in ``data=``
   mode, ``dataloader_hv_product`` in ``dataloader=`` mode) for comparison;
2. time and products to the top-5 and top-1 eigenvalues: ``specops.eigsh`` (block Lanczos,
   ``tol`` 1e-4 relative residual, operator construction and its checks included) against
   PyHessian's ``hessian(...).eigenvalues(top_n=k)`` (power iteration with its defaults).
   Accuracy is each returned pair's relative residual ``||H v - lambda v|| / |lambda|``,
   measured afterwards with one more product (not counted).

PyHessian 0.1 is on PyPI (``pip install pyhessian==0.1 --no-deps``); its ``density()`` calls
``torch.eig``, removed from PyTorch, so ``torch.eig`` is shimmed with ``torch.linalg.eigh``.

Run: ``python benchmarks/torch_hvp.py --threads 2`` (prints a Markdown table).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch
from torch import nn

import specops
from specops.backends import torch as st
from specops.zoo.torch_resnet import resnet

ENGINES = ("cached_graph", "double_backward", "forward_over_reverse")


def shim_torch_eig():
    """PyHessian's density() calls torch.eig(T, eigenvectors=True); eigh of the symmetric T does it."""
    if not hasattr(torch, "eig"):
        def eig(a, eigenvectors=False):
            w, v = torch.linalg.eigh(a)
            return torch.stack([w, torch.zeros_like(w)], dim=1), v

        torch.eig = eig


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(device, depth=20, num_samples=128, seed=0):
    torch.manual_seed(seed)
    model = resnet(depth).to(device)
    with torch.no_grad():  # give batch norm non-trivial running statistics, then freeze them
        model(torch.randn(256, 3, 32, 32, device=device))
    model.eval()
    X = torch.randn(num_samples, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (num_samples,), device=device)
    return model, X, y


def gradient_fn(model, loss_fn, batches, params):
    total_samples = sum(len(y) for _, y in batches)
    def run():
        total = None
        for X, y in batches:
            g = torch.autograd.grad(loss_fn(model(X), y) * (len(y) / total_samples), params)
            total = g if total is None else [a + b for a, b in zip(total, g)]
        return total

    return run


def native_hessian(*args, **kwargs):
    """``st.hessian`` whose graphs use PyTorch's own double-backward formulas throughout."""
    st.TorchAdapter._cheap_double_backward = False  # the construction's checks already build graphs
    try:
        H = st.hessian(*args, **kwargs)
    finally:
        st.TorchAdapter._cheap_double_backward = True
    H.adapter._cheap_double_backward = False
    return H


def relative_residuals(H, V, lams):
    """``||H v - lambda v|| / |lambda|`` per column, measured with one uncounted product."""
    before = H.num_matvecs
    HV = H.matmat(V)
    H.num_matvecs = before
    R = HV - V * torch.as_tensor(np.asarray(lams), dtype=V.dtype, device=V.device)
    return (torch.linalg.vector_norm(R, dim=0).cpu().numpy() / np.abs(lams)).astype(float)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_products(model, loss_fn, settings, repeats, device, rows, columns=8, native=False):
    """Each repeat times a gradient and then every product, so each ratio compares times taken
    under the same machine load; the table gives medians of times and of per-repeat ratios."""
    params = [p for p in model.parameters() if p.requires_grad]
    for label, data, batches in settings:
        n = sum(p.numel() for p in params)
        v, V = torch.randn(n, device=device), torch.randn(n, max(columns, 1), device=device)
        candidates = {"gradient (torch.autograd.grad)": gradient_fn(model, loss_fn, batches, params)}
        for engine in ENGINES:
            H = st.hessian(model, loss_fn, data, engine=engine)
            candidates[f"specops HVP, {engine}"] = lambda H=H, v=v: H @ v
            if columns:
                candidates[f"specops matmat({columns}) per column, {engine}"] = lambda H=H, V=V: H @ V
            if native and engine != "forward_over_reverse":
                Hn = native_hessian(model, loss_fn, data, engine=engine)
                candidates[f"specops HVP, {engine}, PyTorch's double backward"] = lambda H=Hn, v=v: H @ v
        ph = pyhessian_product(model, loss_fn, batches, device)
        if ph is not None:
            candidates[f"PyHessian HVP ({'data' if len(batches) == 1 else 'dataloader'}=)"] = ph
        times = {name: [] for name in candidates}
        for _ in range(repeats + 1):  # the first round warms up (and fills the graph caches)
            for name, fn in candidates.items():
                times[name].append(timed(fn, device) / (columns if "matmat" in name else 1))
        grad = np.array(times["gradient (torch.autograd.grad)"][1:])
        for name, ts in times.items():
            ts = np.array(ts[1:])
            rows.append((label, name, float(np.median(ts)), float(np.median(ts / grad)), ""))
        model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying .grad on the model


def pyhessian_hessian(model, loss_fn, batches, device):
    from pyhessian import hessian as PyHessian

    single = len(batches) == 1
    kw = {"data": batches[0]} if single else {"dataloader": batches}
    ph = PyHessian(model, loss_fn, cuda=device.type == "cuda", **kw)
    return ph


def pyhessian_product(model, loss_fn, batches, device):
    """One PyHessian product as a thunk, or None without PyHessian."""
    try:
        from pyhessian.utils import hessian_vector_product
    except ImportError:
        return None
    ph = pyhessian_hessian(model, loss_fn, batches, device)
    v = [torch.randn_like(p) for p in ph.params]
    if len(batches) == 1:
        return lambda: hessian_vector_product(ph.gradsH, ph.params, v)
    return lambda: ph.dataloader_hv_product(v)


class CountingProducts:
    """Counts PyHessian's Hessian-vector products by wrapping its two product functions."""

    def __init__(self, ph):
        module = sys.modules[type(ph).__module__]  # pyhessian.hessian (the name is shadowed by the class)
        self.count, self.module, self.ph = 0, module, ph
        self.orig_single, self.orig_loader = module.hessian_vector_product, ph.dataloader_hv_product

    def __enter__(self):
        def single(*a, **k):
            self.count += 1
            return self.orig_single(*a, **k)

        def loader(*a, **k):
            self.count += 1
            return self.orig_loader(*a, **k)

        self.module.hessian_vector_product, self.ph.dataloader_hv_product = single, loader
        return self

    def __exit__(self, *exc):
        self.module.hessian_vector_product = self.orig_single
        del self.ph.dataloader_hv_product


def bench_eigenvalues(model, loss_fn, settings, device, rows, ks=(5, 1), tol=1e-4, skip_pyhessian=False,
                      ph_tols=(1e-3,), ph_maxiter=100):
    """specops (block Lanczos, and ``block_size=1``) against PyHessian's power iteration, once
    per PyHessian tolerance in ``ph_tols`` (its stopping rule is "the eigenvalue moved less than
    tol", so a ladder of tolerances finds the time it needs for a given residual). The note
    says whether the values returned are the top k (the largest, as specops finds them)."""
    for label, data, batches in settings:
        check = st.hessian(model, loss_fn, data)  # only to measure residuals
        for k in ks:
            top = None
            for name, kw in (("specops eigsh (default: Lanczos + multiplicity check)", {}),
                             ("specops eigsh (block_size=1)", {"block_size": 1})):
                if k == 1 and kw:
                    continue  # the same method for k = 1
                sync(device)
                t0 = time.perf_counter()
                H = st.hessian(model, loss_fn, data)
                res = specops.eigsh(H, k=k, tol=tol, seed=0, **kw)
                sync(device)
                t = time.perf_counter() - t0
                r = relative_residuals(check, res.eigenvectors, res.eigenvalues)
                top = res.eigenvalues if top is None else top
                rows.append((label, k, name, t, res.num_matvecs, res.eigenvalues, r, ""))
                del H
            if skip_pyhessian:
                continue
            for ph_tol in ph_tols:
                torch.manual_seed(0)
                sync(device)
                t0 = time.perf_counter()
                ph = pyhessian_hessian(model, loss_fn, batches, device)
                with CountingProducts(ph) as counter:
                    lams, vecs = ph.eigenvalues(top_n=k, tol=ph_tol, maxIter=ph_maxiter)
                sync(device)
                t_ph = time.perf_counter() - t0
                V = torch.stack([torch.cat([t.reshape(-1) for t in vec]) for vec in vecs], dim=1)
                r_ph = relative_residuals(check, V.to(check.adapter.ops.torch_dtype), np.array(lams))
                found = np.sort(np.asarray(lams, dtype=float))[::-1]
                wrong = [x for x in found if np.min(np.abs(top - x)) > 1e-2 * abs(top[0])]  # 1% of the scale
                note = ("values are the top k" if not wrong else
                        f"not the top {k}: {', '.join(f'{x:.4g}' for x in wrong)} is not among them")
                rows.append((label, k, f"PyHessian eigenvalues(tol={ph_tol:g}, maxIter={ph_maxiter})", t_ph,
                             counter.count, np.array(lams), r_ph, note))
                model.zero_grad(set_to_none=True)


class Printer:
    """Collects table rows and prints each as a Markdown row as soon as it is measured."""

    def __init__(self, fmt):
        self.fmt, self.rows = fmt, []

    def append(self, row):
        self.rows.append(row)
        print(self.fmt(*row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-products", action="store_true")
    parser.add_argument("--skip-eigenvalues", action="store_true")
    parser.add_argument("--skip-pyhessian", action="store_true")
    parser.add_argument("--pyhessian-tols", type=float, nargs="+", default=[1e-3],
                        help="PyHessian eigenvalue tolerances to run (default its own, 1e-3)")
    parser.add_argument("--pyhessian-maxiter", type=int, default=100, help="PyHessian maxIter (default 100, its own)")
    parser.add_argument("--native", action="store_true",
                        help="also time the graph engines with PyTorch's own double-backward formulas")
    parser.add_argument("--matmat-columns", type=int, default=8, help="columns of the matmat timing (0: skip)")
    parser.add_argument("--depth", type=int, default=20, help="ResNet depth (default 20)")
    parser.add_argument("--num-samples", type=int, default=128, help="inputs (default 128), also as 4 batches")
    parser.add_argument("--top", type=int, nargs="+", default=[5, 1], help="numbers of eigenvalues (default 5 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shim_torch_eig()
    device = torch.device(args.device)
    model, X, y = setup(device, args.depth, args.num_samples)
    n, q = args.num_samples, args.num_samples // 4
    loss_fn = nn.CrossEntropyLoss()
    settings = [
        (f"1 x {n}", (X, y), [(X, y)]),
        (f"4 x {q}", [(X[i:i + q], y[i:i + q]) for i in range(0, n, q)],
         [(X[i:i + q], y[i:i + q]) for i in range(0, n, q)]),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# ResNet-{args.depth}, {n} x 3x32x32, float32, batch norm eval; torch {torch.__version__}, "
          f"device {device} ({name}), {args.threads} threads, medians of {args.repeats}\n")
    if not args.skip_products:
        print("| data | product | seconds (median) | x gradient (median of per-round ratios) | note |\n"
              "|---|---|---:|---:|---|", flush=True)
        bench_products(model, loss_fn, settings, args.repeats, device, Printer(
            lambda label, what, t, ratio, note: f"| {label} | {what} | {t:.4f} | {ratio:.2f} | {note} |"),
            columns=args.matmat_columns, native=args.native)
        print()
    if not args.skip_eigenvalues:
        print("| data | k | method | seconds | products | eigenvalues | max rel. residual | note |\n"
              "|---|---:|---|---:|---:|---|---:|---|", flush=True)
        bench_eigenvalues(model, loss_fn, settings, device, Printer(
            lambda label, k, what, t, m, lams, r, note:
            f"| {label} | {k} | {what} | {t:.2f} | {m} | {', '.join(f'{x:.4g}' for x in lams)} | {max(r):.1e} "
            f"| {note} |"),
            ks=args.top, skip_pyhessian=args.skip_pyhessian, ph_tols=args.pyhessian_tols,
            ph_maxiter=args.pyhessian_maxiter)

if __name__ == "__main__":
    main()
