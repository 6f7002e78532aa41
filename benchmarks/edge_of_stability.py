"""Products per step of every-step sharpness tracking: warm-started tracker against cold starts.

Full-batch GD on the digits network of examples/edge_of_stability.py for ``--steps`` steps
(500 by default); at every step the tracker computes lambda_1 of the Hessian to a relative
residual of ``--tol`` (1e-3) warm-started as ``--warm-lag`` says (``auto``, the tracker's
default, or a number of steps back), and at the same weights ``eigsh`` computes it again
warm-started from the previous step's eigenvector and from a cold (random, same seed) start. Prints the mean
products per step of the three, and the largest relative difference of the tracker's and
the cold start's eigenvalues.

    python benchmarks/edge_of_stability.py [--steps 500] [--lr 0.5] [--tol 1e-3] [--warm-lag auto]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np


def _example():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "edge_of_stability.py")
    spec = importlib.util.spec_from_file_location("edge_of_stability", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["edge_of_stability"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    """Run the benchmark and print one JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--warm-lag", default="auto", type=lambda s: s if s == "auto" else int(s),
                        help="the tracker's warm_lag: auto (the default) or a number of steps")
    parser.add_argument("--out", default="eos_benchmark.jsonl")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    example = _example()
    summary = example.run("gd", args.lr, args.steps, args.out, tol=args.tol, compare=True, warm_lag=args.warm_lag)
    import specops as so

    records = so.TrackerLog.read(args.out).records
    summary["max_residual_over_tol"] = float(max(r["residuals"][0] / abs(r["eigenvalues"][0]) for r in records)
                                             / args.tol)
    summary["tol"] = args.tol
    summary["products_warm_p90"] = float(np.percentile([r["products"]["eigenvalues"] for r in records], 90))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
