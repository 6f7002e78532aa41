"""The MPI side of the distributed tests: run as ``mpiexec -n N python mpi_worker.py MODE OUTDIR``.

Modes:
    ``spectra:FRAMEWORK``: for every split of ``scenarios.PLAN[FRAMEWORK]``, build the Hessian on this
        rank's share and write ``FRAMEWORK-SPLIT-rankR.json`` with its spectra.
    ``basics``: the communicator's own operations, written to ``basics-rankR.json``.
    ``raise``: rank 1 raises while rank 0 waits in a product's Allreduce (must abort, not hang).
    ``mismatch``: ranks build models of different sizes, then one with a non-finite loss on
        rank 1; every rank catches and reports the errors (must raise on all ranks).
    ``mismatch-uncaught``: the size mismatch, uncaught (must abort, not hang).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenarios

import specops
from specops.distributed import MPIComm


def write(out: str, name: str, payload) -> None:
    with open(os.path.join(out, name), "w") as f:
        json.dump(payload, f)


def run_spectra(comm, framework, out):
    build = scenarios.BUILDERS[framework]
    splits, sizes = scenarios.PLAN[framework]
    for how in splits:
        H = build(scenarios.split(scenarios.NUM_SAMPLES, comm, how), comm)
        result = scenarios.spectra(H, **sizes)
        result["transport"] = comm.transport(H.params_vector())
        write(out, f"{framework}-{how}-rank{comm.rank}.json", result)


def run_basics(comm, out):
    r = comm.rank
    write(out, f"basics-rank{r}.json", {
        "rank": r, "size": comm.size, "local_rank": comm.local_rank, "local_size": comm.local_size,
        "int_sum": comm.allreduce_host(r + 1), "int_type": type(comm.allreduce_host(r + 1)).__name__,
        "float_sum": comm.allreduce_host(0.5 * (r + 1)),
        "array_sum": comm.allreduce_host(np.arange(3.0) * (r + 1)).tolist(),
        "allgather": comm.allgather(r * 10), "bcast": comm.bcast(f"from {r}", root=1),
        "agree": comm.agree(("same", 3), "a constant"),
        "transport_cpu_array": comm.transport(np.zeros(3)),
        "cuda_aware": comm.cuda_aware,
    })


def run_raise(comm):
    H = scenarios.build_numpy(scenarios.split(scenarios.NUM_SAMPLES, comm, "equal"), comm)
    if comm.rank == 1:
        print(f"rank 1 raises at {time.time():.3f}", flush=True)
        raise RuntimeError("deliberate failure on rank 1")
    H @ np.ones(H.shape[0])  # rank 0 waits in the Allreduce for rank 1
    print("rank 0 finished a product that rank 1 never joined", flush=True)


def run_mismatch(comm, catch: bool):
    index = scenarios.split(scenarios.NUM_SAMPLES, comm, "equal")
    d = 64 if comm.rank == 0 else 63  # rank 1 forgot a feature: 630 parameters, not 640
    if not catch:
        scenarios.build_numpy(index, comm, d=d)
        return
    try:
        scenarios.build_numpy(index, comm, d=d)
    except ValueError as e:
        print(f"rank {comm.rank} caught ValueError: {e}", flush=True)
    from specops.backends.numpy import hessian

    model = scenarios.SoftmaxRegression(64, 10)
    batches = scenarios.data(index)
    if comm.rank == 1:
        batches[0][0][0, 0] = np.nan
    try:
        hessian(model.loss, model.grad, model.hvp, scenarios.theta0(640), batches, comm=comm)
    except specops.NonFiniteError as e:
        print(f"rank {comm.rank} caught NonFiniteError: {e}", flush=True)
    comm.barrier()


def main():
    mode, out = sys.argv[1], sys.argv[2]
    comm = MPIComm()
    if mode.startswith("spectra:"):
        run_spectra(comm, mode.split(":", 1)[1], out)
    elif mode == "basics":
        run_basics(comm, out)
    elif mode == "raise":
        run_raise(comm)
    elif mode in ("mismatch", "mismatch-uncaught"):
        run_mismatch(comm, catch=mode == "mismatch")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
