"""Cost of Gauss-Newton and Fisher products against a gradient, a Hessian product and curvlinops.

Workloads (issue 15), float32, threads fixed by ``--threads``:

- ``resnet``: the ResNet-20 of ``specops.zoo`` (batch norm in eval mode, running statistics
  from one pass over random inputs), ``--batch`` random 3x32x32 images with random labels;
- ``mlp``: an MLP 64-128-128-10 (tanh) on scikit-learn's digits (``--batch`` images).

Per product, timed side by side in one process (each repeat times every candidate once, in
turn, so the ratios compare times taken under the same machine load; the table gives
medians of times and of the per-repeat ratios to the gradient):

- a gradient (plain ``torch.autograd.grad`` of the batch loss),
- specops' Hessian product (``engine="auto"``: the cached graph),
- specops' GGN, empirical-Fisher and Monte-Carlo Fisher products (one column, and per column
  of an 8-column ``matmat``),
- curvlinops' ``GGNLinearOperator``, ``EFLinearOperator`` and ``FisherMCLinearOperator``
  products on the same model, loss and data (when curvlinops is installed:
  ``pip install curvlinops-for-pytorch==3.0.1`` with torch pinned).

Peak memory is the growth of the process's peak resident set (``VmHWM``) during one
product. Agreement: the relative difference of specops' and curvlinops' products with the
same vector (GGN and empirical Fisher; the Monte-Carlo Fishers sample differently).

Run: ``python benchmarks/curvature.py --threads 2`` (prints a Markdown table; a few minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, peak_rss_kib, reset_peak_rss, version  # noqa: E402

from specops.backends import torch as st  # noqa: E402


def setup(workload: str, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    if workload == "resnet":
        from specops.zoo.torch_resnet import resnet

        model = resnet(20)
        with torch.no_grad():
            model(torch.randn(256, 3, 32, 32))
        model.eval()
        X, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    else:
        from specops.zoo.data import digits

        Xd, yd = digits()
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
        X, y = torch.as_tensor(Xd[:batch], dtype=torch.float32).reshape(batch, -1), torch.as_tensor(yd[:batch], dtype=torch.long)
    return model, X, y


def candidates(model, loss_fn, X, y, columns):
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(1)
    v, V = torch.randn(n, generator=g), torch.randn(n, columns, generator=g)
    data = (X, y)
    H = st.hessian(model, loss_fn, data)
    G = st.ggn(model, loss_fn, data)
    EF = st.fisher(model, loss_fn, data)
    MC = st.fisher(model, loss_fn, data, estimator="mc", seed=0)
    out = {
        "gradient (torch.autograd.grad)": lambda: torch.autograd.grad(loss_fn(model(X), y), params),
        f"specops Hessian product ({H.engine})": lambda: H @ v,
        "specops GGN product": lambda: G @ v,
        f"specops GGN matmat({columns}), per column": lambda: G @ V,
        "specops empirical Fisher product": lambda: EF @ v,
        f"specops empirical Fisher matmat({columns}), per column": lambda: EF @ V,
        "specops MC Fisher product (1 sample)": lambda: MC @ v,
    }
    agreement = {}
    try:
        import curvlinops
    except ImportError:
        print("curvlinops not installed: its rows are skipped", file=sys.stderr)
        return out, agreement, n
    batches = [data]
    cG = curvlinops.GGNLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
    cEF = curvlinops.EFLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
    cMC = curvlinops.FisherMCLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
    out["curvlinops GGN product"] = lambda: cG @ v
    out[f"curvlinops GGN matmat({columns}), per column"] = lambda: cG @ V
    out["curvlinops empirical Fisher product"] = lambda: cEF @ v
    out[f"curvlinops empirical Fisher matmat({columns}), per column"] = lambda: cEF @ V
    out["curvlinops MC Fisher product (1 sample)"] = lambda: cMC @ v
    for name, mine, theirs in (("GGN", G, cG), ("empirical Fisher", EF, cEF)):
        a, b = (mine @ V).double(), (theirs @ V).double()
        agreement[name] = float(torch.linalg.norm(a - b) / torch.linalg.norm(b))
    return out, agreement, n


def bench(workload, batch, repeats, columns):
    model, X, y = setup(workload, batch)
    loss_fn = nn.CrossEntropyLoss()
    fns, agreement, n = candidates(model, loss_fn, X, y, columns)
    times = {name: [] for name in fns}
    memory = {}
    for r in range(repeats + 1):  # the first round warms up (caches, vmap/jit paths)
        for name, fn in fns.items():
            before = reset_peak_rss() if r == 1 else None
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            if before is not None:
                memory[name] = (peak_rss_kib() - before) / 1024
            times[name].append(t / (columns if "matmat" in name else 1))
    grad = np.array(times["gradient (torch.autograd.grad)"][1:])
    hess = np.array(next(ts for name, ts in times.items() if name.startswith("specops Hessian"))[1:])
    rows = []
    for name, ts in times.items():
        ts = np.array(ts[1:])
        rows.append((name, float(np.median(ts)), float(np.median(ts / grad)), float(np.median(ts / hess)),
                     memory.get(name)))
    return rows, agreement, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["resnet", "mlp", "both"], default="both")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--columns", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"torch {torch.__version__}, curvlinops {version('curvlinops-for-pytorch')}, {info['cpu']}, "
          f"{args.threads} thread(s), float32, batch {args.batch}, medians of {args.repeats} repeats\n")
    for workload in (["resnet", "mlp"] if args.workload == "both" else [args.workload]):
        rows, agreement, n = bench(workload, args.batch, args.repeats, args.columns)
        print(f"### {workload} ({n} parameters)\n")
        print("| product | median s | / gradient | / Hessian product | peak memory growth (MiB) |")
        print("|---|---:|---:|---:|---:|")
        for name, t, rg, rh, mem in rows:
            print(f"| {name} | {t:.4f} | {rg:.2f} | {rh:.2f} | {'' if mem is None else f'{mem:.1f}'} |")
        for name, err in agreement.items():
            print(f"\nspecops vs curvlinops, {name}: relative difference {err:.2e} ({args.columns} columns)")
        print()


if __name__ == "__main__":
    main()
