"""JAX data parallelism over the devices of one process (``hessian(..., devices=...)``).

A subprocess sees 4 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``,
which must be set before JAX starts) and compares the split operator with the one-device
operator built there on the same data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scenarios import RTOL

pytest.importorskip("jax")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax-devices") / "result.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, os.path.join(HERE, "jax_devices_worker.py"), str(out)], env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_one_program_uses_every_device(four_devices):
    r = four_devices
    assert (r["devices"], r["mesh_size"], r["batch_devices"]) == (4, 4, 4)
    assert r["all_reduce_in_program"], "the split product should sum the devices' parts inside the program"
    assert r["split_batches"] == [True, False, False]  # 23 and 117 samples: not multiples of 4
    assert r["product_on"] == "cpu:0"  # results come back to the parameters' device


def test_four_devices_match_one_device(four_devices):
    r = four_devices
    assert r["product_rel_diff"] < 1e-13
    for key in ("eigenvalues", "trace", "nodes", "weights", "loss", "gradient_norm", "num_samples"):
        a, b = np.asarray(r["many"][key]), np.asarray(r["one"][key])
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(np.max(np.abs(b))), err_msg=key)


def test_bad_devices():
    import jax

    from specops.backends.jax import DataMesh

    home = jax.devices()[0]
    with pytest.raises(ValueError, match="devices must be 'local'"):
        DataMesh("all", home)
    with pytest.raises(ValueError, match="devices is empty"):
        DataMesh([], home)
    one = DataMesh([home], home)
    assert one.size == 1 and not one.splits((np.zeros((4, 2)),))
