"""Two MPI ranks against one process: the same spectra to 1e-10, and faults that end the job.

Each test launches ``mpiexec -n 2`` on ``mpi_worker.py`` (with a time limit) and compares
what every rank wrote with the single-process result computed here on all the data; the
NumPy model is also compared with the eigenvalues of its dense Hessian.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import scenarios
from scenarios import assert_close
from mpi_launch import WORKER

pytestmark = pytest.mark.mpi

FAULT_SECONDS = 30.0


def needs_backend(framework: str):
    """Skip (with the reason) where the framework or its specops backend is not available."""
    if framework == "numpy":
        return
    try:
        module = importlib.import_module(f"specops.backends.{framework}")
    except ImportError as e:
        pytest.skip(f"specops.backends.{framework} cannot be imported here: {e}")
    if not hasattr(module, "hessian"):
        pytest.skip(f"specops.backends.{framework} has no hessian() yet")


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax", "tensorflow"])
def test_two_ranks_match_one_process(framework, mpirun, tmp_path, monkeypatch):
    needs_backend(framework)
    monkeypatch.setenv("SPECOPS_TEST_JAX_CACHE", str(tmp_path / "jax-cache"))
    splits, sizes = scenarios.PLAN[framework]
    ref = scenarios.spectra(scenarios.BUILDERS[framework](range(scenarios.NUM_SAMPLES)), **sizes)
    run = mpirun([WORKER, f"spectra:{framework}", tmp_path], timeout=150)
    assert run.returncode == 0, f"mpiexec failed ({run.returncode}):\n{run.stderr[-4000:]}"
    for how in splits:
        ranks = [json.loads((tmp_path / f"{framework}-{how}-rank{r}.json").read_text()) for r in (0, 1)]
        # Every rank runs the algorithm redundantly; identical inputs must give identical
        # results, or the ranks' control flow could drift apart and deadlock.
        assert ranks[0] == ranks[1], f"{framework}/{how}: the ranks hold different results"
        assert ranks[0]["transport"] == "host"
        assert_close(ranks[0], ref, f"{framework}/{how}")


def test_numpy_two_ranks_match_dense_hessian(mpirun, tmp_path):
    run = mpirun([WORKER, "spectra:numpy", tmp_path], timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    X, _ = scenarios.digits(scenarios.NUM_SAMPLES)
    model = scenarios.SoftmaxRegression(64, 10)
    dense = model.dense_hessian(scenarios.theta0(640), X)
    top = np.sort(np.linalg.eigvalsh(dense))[::-1][:4]
    for how in scenarios.SPLITS:
        got = json.loads((tmp_path / f"numpy-{how}-rank0.json").read_text())
        np.testing.assert_allclose(got["eigenvalues"], top, rtol=1e-8)
        np.testing.assert_allclose(got["trace"], np.trace(dense), rtol=0.2)  # an estimate, 30 products


def test_communicator_operations(mpirun, tmp_path):
    run = mpirun([WORKER, "basics", tmp_path], timeout=60, env={"SPECOPS_MPI_CUDA_AWARE": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"basics-rank{r}.json").read_text())
        assert (got["rank"], got["size"], got["local_rank"], got["local_size"]) == (r, 2, r, 2)
        assert (got["int_sum"], got["int_type"], got["float_sum"]) == (3, "int", 1.5)
        assert got["array_sum"] == [0.0, 3.0, 6.0]
        assert got["allgather"] == [0, 10]
        assert got["bcast"] == "from 1"
        assert got["agree"] == ["same", 3]
        assert got["cuda_aware"] is True  # forced by the environment variable
        assert got["transport_cpu_array"] == "host"  # host arrays never take the device path


def test_exception_on_one_rank_ends_all_ranks(mpirun):
    run = mpirun([WORKER, "raise", os.devnull], timeout=FAULT_SECONDS + 30)
    assert run.returncode != 0, "the job succeeded although rank 1 raised"
    assert run.seconds < FAULT_SECONDS, f"the job took {run.seconds:.1f} s to end after the failure"
    assert "uncaught exception on rank 1 of 2" in run.stderr, run.stderr[-3000:]
    assert "RuntimeError: deliberate failure on rank 1" in run.stderr, run.stderr[-3000:]
    assert "rank 0 finished" not in run.stdout


def test_mismatched_models_raise_on_every_rank(mpirun):
    run = mpirun([WORKER, "mismatch", os.devnull], timeout=FAULT_SECONDS + 30)
    assert run.returncode == 0, run.stderr[-4000:]
    for r in (0, 1):
        assert f"rank {r} caught ValueError: ranks disagree on the number of parameters" in run.stdout
        assert "rank 0: (640, 'float64'), rank 1: (630, 'float64')" in run.stdout
        assert f"rank {r} caught NonFiniteError: the loss is not finite for batch 0 (loss nan) on rank 1" \
            in run.stdout


def test_uncaught_mismatch_ends_the_job(mpirun):
    run = mpirun([WORKER, "mismatch-uncaught", os.devnull], timeout=FAULT_SECONDS + 30)
    assert run.returncode != 0
    assert run.seconds < FAULT_SECONDS
    assert "ranks disagree on the number of parameters" in run.stderr, run.stderr[-3000:]
