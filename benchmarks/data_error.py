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

``--cost``: the time of data errors on a CIFAR ResNet-8 (64 random images, float32, one thread),
the data as 8 batches and as one batch that ``data_error=True`` splits into 8 sub-batches.

``--curve``: the worked example of docs/algorithms.md, "How much data?": data error against the
number of samples (``--curve-samples``, each in ``--batches`` batches, ``--subsets`` subsets each),
true spread against reported stderr, and the samples that ``samples_needed`` predicts from single
runs on 128 samples; the plot goes to ``--plot``
(``python benchmarks/data_error.py --curve --subsets 40 --plot docs/img/data_error_samples.png``,
about 1.5 minutes of CPU; ``--replot`` redraws from ``--out``'s JSON).
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
            tr = so.trace(H, max_matvecs=trace_products, seed=s, data_error=flag)
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
        "top_reported": se_top[:, 0].tolist(), "trace_reported": [float(x) for x in se_trace],
    }


def cost(repeats=3, samples=64, batches=8, depth=8, k=3, trace_products=30, threads=1, layouts=None, trace_rtol=None):
    """The time of data errors on a CIFAR ResNet: ``eigsh`` + ``trace`` with and without ``data_error``.

    Two layouts of the same ``samples`` random 3x32x32 images (batch norm in eval mode, float32):
    ``batches`` batches, and one batch, which ``data_error=True`` splits into sub-batches. Each
    pair runs interleaved ``repeats`` times in one process; the ratios are medians of the
    per-repeat ratios (with / without), of the whole task and of ``eigsh`` and ``trace`` apart.
    ``layouts``: ``"batches"``, ``"one"`` or both (None). ``trace_rtol``: the trace's ``rtol``
    (with a budget of 100 or more, ``"auto"`` may hand over to Krylov Hutch++).
    """
    import torch

    import specops as so
    from specops.backends import torch as st
    from specops.zoo.torch_resnet import resnet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet(depth).eval()
    X, y = torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,))
    loss = torch.nn.CrossEntropyLoss()
    every = {"batches": (f"{batches} batches", list(zip(X.tensor_split(batches), y.tensor_split(batches)))),
             "one": ("one batch", (X, y))}
    out = {"model": f"ResNet-{depth}", "samples": samples, "k": k, "trace_products": trace_products,
           "trace_rtol": trace_rtol, "threads": threads, "repeats": repeats}
    for name, data in (every[w] for w in (layouts or every)):
        H = st.hessian(model, loss, data)
        so.eigsh(H, k=k, tol=1e-3, seed=0)  # warm-up: the cached graph, allocator
        times: dict[tuple[str, bool], list[float]] = {(t, f): [] for t in ("eigsh", "trace") for f in (False, True)}
        products: dict[bool, int] = {}
        estimators: dict[bool, str] = {}
        for _ in range(repeats):
            for flag in (False, True):
                t0 = time.perf_counter()
                e = so.eigsh(H, k=k, tol=1e-3, seed=0, data_error=flag)
                t1 = time.perf_counter()
                tr = so.trace(H, max_matvecs=trace_products, rtol=trace_rtol, seed=0, data_error=flag)
                times["eigsh", flag].append(t1 - t0)
                times["trace", flag].append(time.perf_counter() - t1)
                products[flag] = int(e.num_matvecs + tr.num_matvecs)
                estimators[flag] = tr.settings.get("estimator", tr.settings["method"])
        total = {f: np.add(times["eigsh", f], times["trace", f]) for f in (False, True)}
        ratios = total[True] / total[False]
        out[name] = {"seconds_without": float(np.median(total[False])), "seconds_with": float(np.median(total[True])),
                     "time_ratio_median": float(np.median(ratios)), "time_ratios": ratios.tolist(),
                     "eigsh_ratio_median": float(np.median(np.divide(times["eigsh", True], times["eigsh", False]))),
                     "trace_ratio_median": float(np.median(np.divide(times["trace", True], times["trace", False]))),
                     "products_without": products[False], "products_with": products[True],
                     "trace_estimator_without": estimators[False], "trace_estimator_with": estimators[True]}
        print(json.dumps({name: out[name]}), flush=True)
    return out


#: The digits training images the subsets are drawn from (without replacement).
POPULATION = 1797


def curve(sizes=(32, 64, 128, 256, 512), subsets=30, batches=8, hidden=12, fraction=0.05, base=128, k=3):
    """Data error against the number of samples, and ``samples_needed`` from single runs at ``base``.

    The top eigenvalue comes from ``eigsh(k=k)`` (3: the default ``--top-k`` of ``specops analyze``).

    The subsets are drawn without replacement from the 1797 digits, so their spread is that of
    a finite population: it is divided by ``sqrt(1 - N / 1797)`` (the finite-population
    correction) to compare with the reported stderrs, which are those of an unlimited supply.
    """
    from specops.data_error import samples_needed

    rows = []
    for n in sizes:
        r = study(subsets, n, batches, hidden, k=k, timing=False)
        fpc = np.sqrt(1 - n / POPULATION)
        row = dict(samples=n, top_mean=r["top_mean"][0], top_spread=r["top_spread"][0] / fpc,
                   top_reported_rms=r["top_reported_rms"][0], trace_mean=r["trace_mean"],
                   trace_spread=r["trace_spread"] / fpc, trace_reported_rms=r["trace_reported_rms"])
        if n == base:  # the prediction a user gets from one run with `base` samples, over the subsets
            row["top_needed"] = [samples_needed(s, r["top_mean"][0], n, fraction) for s in r["top_reported"]]
            row["trace_needed"] = [samples_needed(s, r["trace_mean"], n, fraction) for s in r["trace_reported"]]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("needed")}), flush=True)
    out = dict(sizes=list(sizes), subsets=subsets, batches=batches, hidden=hidden, fraction=fraction, base=base,
               k=k, rows=rows)
    b = next(r for r in rows if r["samples"] == base)
    for q in ("top", "trace"):
        needed = np.array(b[f"{q}_needed"])
        out[f"{q}_needed_median"] = float(np.median(needed))
        out[f"{q}_needed_quartiles"] = np.percentile(needed, [25, 75]).tolist()
        # the truth: where the measured relative spread, fitted as c / sqrt(N), reaches the fraction
        rel = np.array([r[f"{q}_spread"] / abs(r[f"{q}_mean"]) for r in rows])
        c = np.exp(np.mean(np.log(rel * np.sqrt(sizes))))
        out[f"{q}_needed_true"] = float((c / fraction) ** 2)
    return out


def plot_curve(out, path):
    """Left: relative data error of the top eigenvalue and the trace against the number of samples.

    Right: the mean top eigenvalue over the subsets, which falls with the samples (a bias that
    no standard error of a single sample shows).
    """
    from specops.plots import atomic_savefig, pyplot

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=(3, 2)))
    n = np.array(out["sizes"], dtype=float)
    rows = out["rows"]
    for q, label, color in (("top", "top eigenvalue", "C0"), ("trace", "trace", "C1")):
        spread = np.array([r[f"{q}_spread"] / abs(r[f"{q}_mean"]) for r in rows])
        rep = np.array([r[f"{q}_reported_rms"] / abs(r[f"{q}_mean"]) for r in rows])
        ax.plot(n, spread, "o", color=color, label=f"{label}: spread over {out['subsets']} subsets (truth)")
        ax.plot(n, rep, "x--", color=color, label=f"{label}: reported data stderr (RMS)")
        b = out["sizes"].index(out["base"])
        ax.plot(n, rep[b] * np.sqrt(n[b] / n), ":", color=color, lw=1)
    ax.axhline(out["fraction"], color="gray", lw=0.8)
    ax.text(n[0], out["fraction"] * 1.05, f"{100 * out['fraction']:g} %", color="gray", va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("samples (in %d batches)" % out["batches"])
    ax.set_ylabel("data error / |estimate|")
    ax.set_title(f"digits, MLP 64-{out['hidden']}-10: data error vs samples\n(dotted: 1/sqrt(N) from "
                 f"{out['base']} samples)", fontsize=10)
    ax.legend(fontsize=7)
    mean = np.array([r["top_mean"] for r in rows])
    spread = np.array([r["top_spread"] for r in rows])
    bx.errorbar(n, mean, yerr=spread, fmt="o-", color="C0", capsize=3)
    bx.set_xscale("log", base=2)
    bx.set_xlabel("samples")
    bx.set_ylabel("top eigenvalue (mean ± spread over subsets)")
    bx.set_title("the top eigenvalue of a small sample is biased up", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=200)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=12)
    parser.add_argument("--out", help="write the summary as JSON here")
    parser.add_argument("--curve", action="store_true", help="data error against the number of samples")
    parser.add_argument("--curve-samples", default="32,64,128,256,512", help="sample counts of --curve")
    parser.add_argument("--plot", help="--curve: save the plot here")
    parser.add_argument("--replot", metavar="JSON", help="--curve: plot the summary --out wrote, computing nothing")
    parser.add_argument("--cost", action="store_true",
                        help="the time of data errors on a CIFAR ResNet-8, as 8 batches and as one batch split")
    parser.add_argument("--repeats", type=int, default=3, help="--cost: interleaved repeats")
    parser.add_argument("--layouts", nargs="+", choices=("batches", "one"), help="--cost: these data layouts only")
    parser.add_argument("--trace-products", type=int, default=30, help="--cost: the trace's max_matvecs")
    parser.add_argument("--trace-rtol", type=float, help="--cost: the trace's rtol")
    args = parser.parse_args()
    if args.cost:
        print(json.dumps(cost(args.repeats, layouts=args.layouts, trace_products=args.trace_products,
                              trace_rtol=args.trace_rtol), indent=1))
        return
    if args.replot:
        with open(args.replot) as f:
            plot_curve(json.load(f), args.plot)
        return
    if args.curve:
        out = curve(tuple(int(x) for x in args.curve_samples.split(",")), args.subsets, args.batches, args.hidden)
        if args.plot:
            plot_curve(out, args.plot)
    else:
        out = study(args.subsets, args.samples, args.batches, args.hidden)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
