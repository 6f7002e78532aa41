"""The MPI side of test_mpi_linalg.py: ``mpiexec -n N python linalg_worker.py OUTDIR``.

Builds the NumPy model's Hessian on this rank's unequal share of the data and writes
``linalg-rankR.json`` with solve / logdet / trace_function / funm results.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenarios

import specops as so
from specops.distributed import MPIComm


def linalg(H) -> dict:
    """The results of every function of docs/linalg.md on ``H`` (same seeds on every rank)."""
    n = H.shape[0]
    b = np.random.default_rng(0).standard_normal((n, 2))
    sol = so.solve(H, b, shift=0.1, tol=1e-10)
    ind = so.solve(H - 0.05 * H.identity(), b[:, 0], tol=1e-8)  # indefinite: CG, then MINRES
    ld = so.logdet(H, shift=[0.1, 1.0], num_probes=4, num_steps=15, seed=2)
    tf = so.trace_function(H, np.sqrt, shift=0.1, num_probes=3, num_steps=10, seed=3)
    fm = so.funm(H, np.exp, b, num_steps=20, tol=1e-12)
    return {
        "x": H.ops.to_numpy(sol.x).ravel().tolist(), "residual": sol.residual_norm.tolist(),
        "solve_matvecs": sol.num_matvecs, "indefinite_method": ind.settings["method_used"],
        "indefinite_x": H.ops.to_numpy(ind.x).tolist(), "indefinite_matvecs": ind.num_matvecs,
        "logdet": ld.estimate.tolist(), "logdet_stderr": ld.stderr.tolist(),
        "trace_sqrt": float(tf.estimate), "funm": H.ops.to_numpy(fm.y).ravel().tolist(),
        "funm_steps": fm.settings["steps"],
    }


def main():
    out = sys.argv[1]
    comm = MPIComm()
    H = scenarios.build_numpy(scenarios.split(scenarios.NUM_SAMPLES, comm, "unequal"), comm)
    with open(os.path.join(out, f"linalg-rank{comm.rank}.json"), "w") as f:
        json.dump(linalg(H), f)


if __name__ == "__main__":
    main()
