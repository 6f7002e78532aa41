"""JAX across processes: parameters sharded over the devices of two processes (``jax.distributed``).

Two processes on localhost, 2 host devices each, CPU collectives through gloo
(``jax_cpu_collectives_implementation``), run ``jax_sharded_processes_worker.py``: the MLP of
``jax_sharded_worker.py`` (n = 603, not a multiple of 4) sharded over all 4 devices (a
1-D mesh, and a 2-D data x model mesh), against the same model on one device of one
process. Truth: the one-device operator with the same seeds, to 1e-10 in float64.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax-processes")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               OMP_NUM_THREADS="1")
    port = str(_free_port())
    worker = os.path.join(HERE, "jax_sharded_processes_worker.py")
    runs = [subprocess.Popen([sys.executable, worker, str(i), port, str(out / f"{i}.json")], env=env, cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [run.communicate(timeout=600)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
    for run, log in zip(runs, logs):
        assert run.returncode == 0, log[-4000:]
    return [json.loads((out / f"{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_two_processes_give_the_answers_of_one_device(processes, layout):
    for r in processes:
        assert (r["devices"], r["local"]) == (4, 2)
        got, one = r[layout]["sharded"], r[layout]["one"]
        for key in ("eigenvalues", "trace", "hutchinson", "nodes", "weights"):
            a, b = np.asarray(got[key]), np.asarray(one[key])
            assert np.abs(a - b).max() <= 1e-10 * max(1.0, np.abs(b).max()), key
        assert got["converged"] == one["converged"] and got["matvecs"] == one["matvecs"]
        assert max(r[layout]["residuals"]) < 1e-6
    assert processes[0][layout] == processes[1][layout]  # every process holds the same result


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_each_process_holds_only_its_shards(processes, layout):
    for r in processes:
        x = r[layout]
        assert (x["n"], x["padded"], x["eigvec_devices"]) == (603, 604, 4)
        assert x["num_local_shards"] == 2 and x["local_shards"] == [[151, 3]]  # a quarter of the rows per device
        assert x["host_rows"] == 603 and x["diagonal_rows"] == 603  # host copies gather the other process's rows
