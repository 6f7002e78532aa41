"""JAX over several devices of one process: ``python jax_devices_worker.py OUT.json``.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (4 CPU devices). Builds the
float64 MLP of ``scenarios`` on batches of 100, 23 and 117 samples (23 and 117 are not
multiples of 4: they run on one device) once on one device and once with ``devices="local"``,
and writes both spectra, the largest relative difference of a block product, and whether the
split program holds an all-reduce over the devices.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenarios

SIZES = (100, 23, 117)


def build(devices):
    import jax
    import jax.numpy as jnp

    from specops.backends.jax import hessian

    jax.config.update("jax_enable_x64", True)
    X, y = scenarios.digits(scenarios.NUM_SAMPLES)
    bounds = np.cumsum((0,) + SIZES)
    batches = [(jnp.asarray(X[a:b]), jnp.asarray(y[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]

    def loss(p, batch):
        Xb, yb = batch
        logits = jnp.tanh(Xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(yb)), yb])

    params = {k: jnp.asarray(v) for k, v in scenarios._mlp_params().items()}
    return hessian(loss, params, batches, devices=devices), batches


def main():
    import jax

    one, batches = build(None)
    many, _ = build("local")
    mesh = many.adapter.mesh
    V = one.ops.random(one.shape[0], [0, 1, 2], seed=11, distribution="normal")
    a, b = one.ops.to_numpy(one @ V), many.ops.to_numpy(many @ V)
    big = batches[0]
    split = mesh.split(big)
    product = many.adapter.engines["forward_over_reverse"].program
    program = product.lower(mesh.replicate(many.adapter._flat), mesh.replicate(many.adapter._fixed),
                            split, mesh.replicate(V)).compile().as_text()
    sizes = {"k": 2, "probes": 6, "steps": 6}  # few block shapes: each compiles twice (1 and 4 devices)
    result = {
        "devices": len(jax.local_devices()), "mesh_size": mesh.size,
        "split_batches": [mesh.splits(bt) for bt in batches],
        "batch_devices": len(split[0].sharding.device_set),
        "all_reduce_in_program": "all-reduce" in program,
        "product_rel_diff": float(np.abs(a - b).max() / np.abs(a).max()),
        "product_on": str(next(iter(many.matvec(V[:, 0]).devices()))),
        "one": scenarios.spectra(one, **sizes), "many": scenarios.spectra(many, **sizes),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
