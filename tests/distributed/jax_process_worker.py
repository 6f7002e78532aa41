"""Two JAX processes of one ``jax.distributed`` job: ``python jax_process_worker.py ID PORT OUTDIR [raise]``.

Each process joins the job (coordinator on ``127.0.0.1:PORT``, gloo between the CPUs), builds a
:class:`~specops.distributed.JaxComm` and writes ``basics-rankR.json`` (the communicator's
operations) and ``jax-unequal-rankR.json`` (the spectra of ``scenarios.build_jax`` on its
share of the unequal split), as ``mpi_worker.py`` does under MPI. With ``raise``, process 1
raises while process 0 waits in a product's allreduce (the job must end, not hang).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    process, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process)
    from mpi_worker import run_basics, run_raise, run_spectra

    from specops.distributed import as_comm

    comm = as_comm("jax")
    if sys.argv[4:] == ["raise"]:
        return run_raise(comm)
    run_basics(comm, out)
    run_spectra(comm, "jax", out)


if __name__ == "__main__":
    main()
