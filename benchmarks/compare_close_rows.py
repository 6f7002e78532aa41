"""The close rows of ``compare.py``'s accuracy table again, with many seeds.

With 20 seeds a root-mean-square error is itself uncertain by about 16 % (``1/sqrt(2 * 20)``),
so rows where specops and a peer differ by less than that are not decided by the table. This
script reruns chosen (task, budget, library) cells of workload (a) with ``--seeds`` seeds
(the same MLP, the same dense truth) and prints each library's RMS error with its uncertainty.

Run: ``python benchmarks/compare_close_rows.py --seeds 200 --cells trace:20 trace:80 density:20``
(libraries: specops and every peer found; ``--libs`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402
from compare import accuracy_runners  # noqa: E402
from compare_problems import mlp_problem  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--cells", nargs="+", default=["trace:20", "trace:80", "density:20", "density:80"],
                        help="task:budget pairs")
    parser.add_argument("--libs", nargs="+", help="runner labels (e.g. specops curvlinops); default: all")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    _common.shim_torch_eig()
    model, X, y, _ = mlp_problem()
    from torch import nn

    from specops.backends import torch as st

    D = st.hessian(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    lam = np.linalg.eigvalsh((D + D.T) / 2)
    trace, width = float(lam.sum()), float(lam[-1] - lam[0])
    peers = _common.found_peers()
    runners = accuracy_runners(model, X, y, {"specops": "", **peers})
    rows = []
    for cell in args.cells:
        task, m = cell.split(":")
        m = int(m)
        for name, fns in runners.items():
            if task not in fns or (args.libs and name not in args.libs):
                continue
            t0 = time.perf_counter()
            errs = []
            for seed in range(args.seeds):
                if task == "trace":
                    est, _ = fns[task](m, seed)
                    errs.append(abs(est - trace) / abs(trace))
                else:
                    s = min(m, 20)
                    nodes, weights, _ = fns[task](max(1, m // s), s, seed)
                    errs.append(_common.wasserstein1(nodes, weights, lam) / width)
            sq = np.square(errs)
            rms = float(np.sqrt(sq.mean()))
            # the delta method: stderr of sqrt(mean of squares)
            se = float(sq.std(ddof=1) / np.sqrt(len(sq)) / (2 * rms))
            rows.append(dict(task=task, budget=m, library=name, seeds=args.seeds, rms=rms, rms_stderr=se))
            print(f"{task:7s} m={m:4d} {name:28s} RMS {rms:.4g} ± {se:.2g}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
