"""Calibration of ``trace``'s standard errors, and XTrace's ``rtol`` stops on the comparison's ResNet-20.

1. **table** (default): RMS of ``(estimate - tr(A)) / stderr`` over seeds (an honest standard
   error gives 1) for XTrace, Hutch++ and Hutchinson at two budgets, on twelve 600 x 600
   spectra (``Q diag(lambda) Q^T``, one random ``Q``) and on the Hessian of the comparison
   benchmark's digits MLP (3,010 parameters, float64, its exact trace from the dense Hessian).
2. ``--resnet SEED...``: ``trace(rtol=0.01)`` (the default estimator, or ``--method``) on the
   ResNet-20 of ``compare.py`` (16 digits images, float32, eval mode): products, estimate,
   stderr; ``--reference M``: its reference trace, Hutch++ with ``M`` products (seed 1000);
   ``--data-error``: each seed also with ``data_error=True`` (the one batch split), to time it.
3. ``--krylov``: Krylov Hutch++ against XTrace on the twelve spectra: its RMS ``z``, its RMS
   error over XTrace's (same budgets and seeds) and its basis; then, with ``rtol=0.01``
   (``--rtol-seeds`` seeds), the products to the stop and the RMS ``z`` of both.

Run: ``python benchmarks/trace_calibration.py --seeds 200`` (table; about 1 h on a loaded
2-core machine for 200 seeds), ``python benchmarks/trace_calibration.py --resnet 0 1 2 3 4``,
``python benchmarks/trace_calibration.py --krylov --seeds 100`` (about 10 min).
Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import specops  # noqa: E402

N = 600
METHODS = ("xtrace", "hutch++", "hutchinson")


def spectra(n=N):
    """The twelve spectra of the calibration table (docs/algorithms.md)."""
    rng = np.random.default_rng(0)
    i = np.arange(1, n + 1)
    return {
        "`1/i`": 1 / i, "`1/i²`": 1 / i**2, "`i^{-1.5}`": i**-1.5, "`0.9^i`": 0.9**i, "`0.99^i`": 0.99**i,
        "uniform [0, 1]": rng.uniform(0, 1, n), "uniform [−3, 5]": rng.uniform(-3, 5, n),
        "`1 + 10⁻³ N(0, 1)`": 1 + 1e-3 * rng.standard_normal(n),
        "Hessian-like (4 outliers, bulk `N(0, 0.004²)`)": np.concatenate([[5, 3, 2, 1.5], rng.normal(0, 0.004, n - 4)]),
        "rank 10 + `10⁻³` noise": np.concatenate([rng.uniform(1, 3, 10), np.zeros(n - 10)])
        + 1e-3 * rng.standard_normal(n),
        "`1/√i`": i**-0.5,
        "two clusters (0 and 4)": np.concatenate([np.zeros(n // 2), 4 * np.ones(n // 2)]) + 1e-3 * rng.standard_normal(n),
    }


def rms_z(A, truth, method, m, seeds):
    """RMS of the z-scores of ``trace(A, method, max_matvecs=m)`` over ``seeds``."""
    z = []
    for seed in seeds:
        r = specops.trace(A, method=method, max_matvecs=m, seed=seed)
        z.append((r.estimate - truth) / r.stderr if r.stderr > 0 else 0.0)
    return float(np.sqrt(np.mean(np.square(z))))


def mlp_hessian():
    """The comparison benchmark's digits MLP Hessian (float64, dense) and its exact trace."""
    import torch
    from compare_problems import mlp_problem
    from torch import nn

    from specops.backends import torch as st

    torch.set_num_threads(1)
    model, X, y, _ = mlp_problem()
    D = np.asarray(st.hessian(model, nn.CrossEntropyLoss(), (X, y)).to_dense(), dtype=np.float64)
    D = (D + D.T) / 2  # the dense Hessian as the operator: the same products, at a matrix's cost
    return D, float(np.trace(D))


def table(args):
    from spectra import symmetric_with_spectrum

    seeds = range(args.seeds)
    budgets = args.budgets
    head = " | ".join(f"{m} products: {method}" for m in budgets for method in METHODS)
    print(f"RMS of (estimate − trace) / stderr over {args.seeds} seeds (an honest stderr gives 1)\n")
    print(f"| operator | {head} |")
    print("|---|" + "---|" * (len(budgets) * len(METHODS)))
    ops = {name: (lambda lam=lam: symmetric_with_spectrum(lam, seed=1)) for name, lam in spectra().items()}
    ops["digits MLP Hessian (3,010 parameters)"] = mlp_hessian
    for name, make in list(ops.items())[args.first:args.last]:
        t0 = time.perf_counter()
        A, truth = make()
        truth = float(np.sum(truth)) if np.ndim(truth) else truth
        cells = [f"{rms_z(A, truth, method, m, seeds):.2f}" for m in budgets for method in METHODS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def resnet_hessian():
    """The comparison benchmark's ResNet-20 Hessian (16 digits images, float32, eval mode)."""
    import torch
    from compare_problems import resnet_problem
    from torch import nn

    from specops.backends import torch as st

    torch.set_num_threads(1)
    model, X, y = resnet_problem(16)
    return st.hessian(model, nn.CrossEntropyLoss(), (X, y))


def reference(args):
    """A reference trace of the ResNet-20 Hessian: Hutch++ with a large budget (seed 1000)."""
    H = resnet_hessian()
    t0 = time.perf_counter()
    r = specops.trace(H, method="hutch++", max_matvecs=args.reference, seed=1000)
    print(f"ResNet-20 reference: hutch++, {r.num_matvecs} products, seed 1000: {r.estimate:.2f} +- {r.stderr:.2f} "
          f"({r.stderr / abs(r.estimate):.2%}), {time.perf_counter() - t0:.0f} s", flush=True)


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def krylov(args):
    """Krylov Hutch++ against XTrace on the twelve spectra, at fixed budgets and with ``rtol=0.01``."""
    from spectra import symmetric_with_spectrum

    def runs(A, truth, method, seeds, **kw):
        out = [specops.trace(A, method=method, seed=s, **kw) for s in seeds]
        err = np.array([r.estimate - truth for r in out])
        z = np.array([e / r.stderr if r.stderr > 0 else 0.0 for e, r in zip(err, out)])
        return err, z, out

    ops = {name: symmetric_with_spectrum(lam, seed=1) for name, lam in spectra().items()}
    head = " | ".join(f"{m}: z | {m}: error / XTrace's" for m in args.budgets)
    print(f"Krylov Hutch++ over {args.seeds} seeds\n\n| operator | {head} | basis |")
    print("|---|" + "---|" * (2 * len(args.budgets) + 1))
    for name, (A, lam) in ops.items():
        cells, basis = [], []
        for m in args.budgets:
            err, z, out = runs(A, lam.sum(), "krylov-hutch++", range(args.seeds), max_matvecs=m)
            xerr = runs(A, lam.sum(), "xtrace", range(args.seeds), max_matvecs=m)[0]
            cells += [f"{_rms(z):.2f}", f"{_rms(err) / _rms(xerr):.2g}"]
            basis.append(f"{np.median([r.settings['krylov_basis'] for r in out]):.0f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(basis)} |", flush=True)
    print(f"\nrtol=0.01, {args.rtol_seeds} seeds: median products and RMS z, XTrace / Krylov Hutch++\n")
    print("| operator | products | RMS z |\n|---|---|---|")
    for name, (A, lam) in ops.items():
        got = [runs(A, lam.sum(), method, range(args.rtol_seeds), max_matvecs=3000, rtol=0.01)
               for method in ("xtrace", "krylov-hutch++")]
        products = " / ".join(f"{np.median([r.num_matvecs for r in out]):.0f}" for _, _, out in got)
        print(f"| {name} | {products} | {_rms(got[0][1]):.2f} / {_rms(got[1][1]):.2f} |", flush=True)


def resnet(args):
    from compare_problems import TRACE_RTOL

    H = resnet_hessian()
    print(f"ResNet-20, 16 images, float32: trace(method={args.method!r}, rtol={TRACE_RTOL}, max_matvecs=2000)\n")
    print("| seed | products | estimator | estimate | stderr | seconds |")
    print("|---:|---:|---|---:|---:|---:|")
    for seed in args.resnet:
        for data_error in (False, True) if args.data_error else (False,):
            t0 = time.perf_counter()
            r = specops.trace(H, method=args.method, max_matvecs=2000, rtol=TRACE_RTOL, seed=seed, data_error=data_error)
            estimator = r.settings.get("estimator") or args.method
            if estimator == "krylov-hutch++":
                estimator += f" (basis {r.settings['krylov_basis']}, {r.settings['pilots']} pilots)"
            if data_error:
                d = r.settings["data_error"]
                estimator += (f"; data stderr {r.data_stderr:.1f} from {d['probes']} probes over "
                              f"{d['batches']} sub-batches")
            print(f"| {seed} | {r.num_matvecs} | {estimator} | {r.estimate:.1f} | "
                  f"{r.stderr:.1f} ({r.stderr / abs(r.estimate):.2%}) | {time.perf_counter() - t0:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--budgets", type=int, nargs="+", default=[60, 200])
    ap.add_argument("--first", type=int, default=0, help="rows first..last-1 of the table only (to run it in parts)")
    ap.add_argument("--last", type=int, default=None)
    ap.add_argument("--resnet", type=int, nargs="*", help="seeds of trace(rtol=0.01) on the ResNet-20")
    ap.add_argument("--reference", type=int, help="products of a Hutch++ reference trace of the ResNet-20")
    ap.add_argument("--method", default="auto", help="--resnet: the trace method")
    ap.add_argument("--data-error", action="store_true",
                    help="--resnet: each seed also with data_error=True (the 16 images split into sub-batches)")
    ap.add_argument("--krylov", action="store_true", help="Krylov Hutch++ against XTrace on the twelve spectra")
    ap.add_argument("--rtol-seeds", type=int, default=20, help="--krylov: seeds of the rtol=0.01 stops")
    args = ap.parse_args()
    if args.krylov:
        krylov(args)
    elif args.reference:
        reference(args)
    elif args.resnet is not None:
        resnet(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
