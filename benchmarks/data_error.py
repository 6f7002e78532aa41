"""Data standard errors against brute force (issue 27): digits, a small MLP, many random subsets.

For each of ``--subsets`` random subsets of ``--samples`` digits images, the dense Hessian of
the mean cross-entropy of a small trained MLP (64-``--hidden``-10, tanh, float64) gives the
exact top eigenvalues and trace; their spread over the subsets is the true data error. On the
same subsets, split into ``--batches`` batches, ``eigsh(k=3, data_error=True)`` and
``trace(data_error=True)`` report data standard errors from a single run each; the root mean
square of the reported stderrs is compared with the spread (ratio 1 is right). Also the
cost: the same calls without ``data_error``, side by side, medians of the per-subset time
ratios.

Run: ``python benchmarks/data_error.py`` (about 5 minutes on one core; ``--subsets 40`` about 1).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def problem(hidden, seed=0, steps=200):
    """The digits data (float64 tensors) and an MLP trained briefly on all of it."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float64), torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


def dense_hessian(model, X, y):
    """The exact Hessian of the mean loss on ``(X, y)`` (torch.func, flat parameters)."""
    import torch
    from torch.func import functional_call, hessian

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            parts[name] = theta[i:i + size].reshape(shape)
            i += size
        return torch.nn.functional.cross_entropy(functional_call(model, parts, (X,)), y)

    return hessian(loss)(flat).numpy()


def study(subsets=200, samples=128, batches=8, hidden=12, k=3, seed=0, trace_products=100, timing=True,
          steps=200):
    """Exact values and reported data stderrs on ``subsets`` random subsets; returns a summary dict."""
    import torch

    import specops as so
    from specops.backends import torch as st

    model, X, y = problem(hidden, steps=steps)
    loss = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    exact_top, exact_trace, se_top, se_trace, probe_se, t_ratio = [], [], [], [], [], []
    size = samples // batches
    for s in range(subsets):
        idx = torch.tensor(rng.choice(len(X), samples, replace=False))
        lam = np.linalg.eigvalsh(dense_hessian(model, X[idx], y[idx]))
        exact_top.append(lam[::-1][:k])
        exact_trace.append(lam.sum())
        data = [(X[idx[i:i + size]], y[idx[i:i + size]]) for i in range(0, samples, size)]
        H = st.hessian(model, loss, data)
        times = {}
        for flag in (False, True) if timing else (True,):
            t0 = time.perf_counter()
            e = so.eigsh(H, k=k, tol=1e-8, seed=s, data_error=flag)
            tr = so.trace(H, num_matvecs=trace_products, seed=s, data_error=flag)
            times[flag] = time.perf_counter() - t0
        se_top.append(e.data_stderr)
        se_trace.append(tr.data_stderr)
        probe_se.append(tr.stderr)
        t_ratio.append(times[True] / times.get(False, np.nan))
    exact_top, se_top = np.array(exact_top), np.array(se_top)
    spread_top = exact_top.std(axis=0, ddof=1)
    rms_top = np.sqrt(np.mean(se_top ** 2, axis=0))
    spread_trace = float(np.std(exact_trace, ddof=1))
    rms_trace = float(np.sqrt(np.mean(np.square(se_trace))))
    return {
        "subsets": subsets, "samples": samples, "batches": batches, "hidden": hidden,
        "params": int(sum(p.numel() for p in model.parameters())),
        "top_mean": exact_top.mean(axis=0).tolist(), "top_spread": spread_top.tolist(),
        "top_reported_rms": rms_top.tolist(), "top_ratio": (rms_top / spread_top).tolist(),
        "trace_mean": float(np.mean(exact_trace)), "trace_spread": spread_trace,
        "trace_reported_rms": rms_trace, "trace_ratio": rms_trace / spread_trace,
        "trace_probe_stderr_rms": float(np.sqrt(np.mean(np.square(probe_se)))),
        "time_ratio_median": float(np.median(t_ratio)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=12)
    parser.add_argument("--out", help="write the summary as JSON here")
    args = parser.parse_args()
    out = study(args.subsets, args.samples, args.batches, args.hidden)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
