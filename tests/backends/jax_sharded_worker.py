"""Run under 4 host devices: a JAX MLP with parameters sharded over a mesh against one device.

Writes a JSON file of the results of the sharded and the one-device operator (same
seed, same data) and of where the sharded arrays live. Usage: ``python
jax_sharded_worker.py OUT.json``; both meshes: ``1d`` (parameters over 4 devices) and
``2d`` (data over 2 x parameters over 2).
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import specops as so
from specops.backends import jax as sj

jax.config.update("jax_enable_x64", True)


def loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0])


def spectra(H):
    top = so.eigsh(H, k=3, seed=0, tol=1e-8)
    tr = so.trace(H, method="xtrace", num_matvecs=20, seed=1)
    d = so.spectral_density(H, num_probes=2, num_steps=12, seed=2)
    hutch = so.trace(H, method="hutchinson", num_matvecs=4, seed=3)
    return dict(eigenvalues=top.eigenvalues.tolist(), converged=top.converged.tolist(), trace=tr.estimate,
                hutchinson=hutch.estimate, nodes=d.nodes.tolist(), weights=d.weights.tolist(),
                matvecs=top.num_matvecs), top


def main(out):
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(16, 30)) / 4, "b1": rng.normal(size=30) / 4,
              "w2": rng.normal(size=(30, 3)) / 5, "b2": np.zeros(3)}  # n = 603: not a multiple of 4
    x, y = rng.normal(size=(64, 16)), rng.integers(0, 3, size=64)
    one = sj.hessian(loss, jax.tree.map(jnp.asarray, params), (jnp.asarray(x), jnp.asarray(y)))
    ref, _ = spectra(one)
    dense_one = one.to_dense()
    results = {layout: sharded_run(params, x, y, layout, ref, dense_one) for layout in ("1d", "2d")}
    page = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "distributed.md")).read()
    code = re.search(r"<!-- sharded-example: jax -->\s*```python\n(.*?)```", page, re.S).group(1)
    exec(compile(code, "docs/distributed.md (sharded-example: jax)", "exec"), {"__name__": "__main__"})
    results["docs_example"] = "ran"
    with open(out, "w") as f:
        json.dump(results, f)


def sharded_run(params, x, y, layout, ref, dense_one):
    devices = np.array(jax.devices())
    if layout == "1d":
        mesh = Mesh(devices, ("model",))
        specs = {"w1": P("model", None), "b1": P(), "w2": P(), "b2": P()}
        data = P()
    else:
        mesh = Mesh(devices.reshape(2, 2), ("data", "model"))
        specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
        data = P("data")
    sharded = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in params.items()}
    batch = tuple(jax.device_put(jnp.asarray(a), NamedSharding(mesh, data)) for a in (x, y))
    H = sj.hessian(loss, sharded, batch)
    got, top = spectra(H)
    V = top.eigenvectors
    tree = H.as_params(V[:, 0])
    v = H.ops.random(H.shape[0], [0], 0, distribution="normal")
    Hv = H @ v[:, 0]
    return dict(
        one=ref, sharded=got, n=H.shape[0], padded=int(V.shape[0]), ops=repr(H.ops),
        eigvec_shards=sorted({tuple(s.data.shape) for s in V.addressable_shards}),
        eigvec_devices=len(V.sharding.device_set),
        product_shards=sorted({tuple(s.data.shape) for s in Hv.addressable_shards}),
        padding_zero=float(jnp.max(jnp.abs(V[H.shape[0]:]))) if V.shape[0] > H.shape[0] else 0.0,
        as_params_specs={k: str(tree[k].sharding.spec) for k in tree},
        given_specs={k: str(sharded[k].sharding.spec) for k in sharded},
        product_vs_dense=float(np.max(np.abs(H.ops.to_numpy(Hv) - dense_one @ H.ops.to_numpy(v)[:, 0]))),
        dense_top=np.sort(np.linalg.eigvalsh(dense_one))[::-1][:3].tolist(),
        diagonal_rows=int(so.diagonal(H, num_matvecs=2, seed=0).estimate.shape[0]),
    )


if __name__ == "__main__":
    main(sys.argv[1])
