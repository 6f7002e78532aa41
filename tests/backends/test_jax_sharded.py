"""JAX parameters sharded over a mesh of 4 host devices (backends/jax/sharded.py) against one device.

A subprocess sees 4 CPU devices (``XLA_FLAGS`` must be set before JAX starts) and runs
the same MLP (n = 603, not a multiple of 4) with its parameters on one device and
sharded over a 1-D mesh and a 2-D (data x model) mesh; the truth is the one-device
operator with the same seed, and its dense Hessian.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax-sharded") / "result.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, os.path.join(HERE, "jax_sharded_worker.py"), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_sharded_parameters_give_the_answers_of_one_device(meshes, layout):
    r = meshes[layout]
    for key in ("eigenvalues", "trace", "hutchinson", "nodes", "weights"):
        a, b = np.asarray(r["sharded"][key]), np.asarray(r["one"][key])
        assert np.abs(a - b).max() <= 1e-10 * max(1.0, np.abs(b).max()), key
    assert r["sharded"]["converged"] == r["one"]["converged"] and r["sharded"]["matvecs"] == r["one"]["matvecs"]
    assert np.abs(np.asarray(r["one"]["eigenvalues"]) - r["dense_top"]).max() < 1e-7
    assert r["product_vs_dense"] < 1e-12


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_vectors_stay_sharded(meshes, layout):
    r = meshes[layout]
    assert (r["n"], r["padded"]) == (603, 604)  # padded with one zero row to a multiple of 4
    assert r["eigvec_devices"] == 4 and r["eigvec_shards"] == [[151, 3]] and r["product_shards"] == [[151]]
    assert r["padding_zero"] == 0.0 and r["diagonal_rows"] == 603
    assert r["as_params_specs"] == r["given_specs"]


def test_docs_example_runs(meshes):
    assert meshes["docs_example"] == "ran"  # the JAX example of docs/distributed.md, with its asserts
