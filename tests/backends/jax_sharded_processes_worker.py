"""One of two processes of a JAX job (``jax.distributed``, gloo collectives on CPU), 2 host devices each.

The MLP of ``jax_sharded_worker.py`` (n = 603) with its parameters sharded over the 4
devices of both processes (a 1-D mesh, and a 2-D data x model mesh with the batch split
over ``data``), against the same model on this process's first device alone. Usage:
``python jax_sharded_processes_worker.py PROCESS_ID PORT OUT.json`` (``XLA_FLAGS`` giving 2 host
devices, ``JAX_PLATFORMS=cpu``).
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: str, out: str) -> None:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import specops as so
    from specops.backends import jax as sj
    from jax_sharded_worker import loss, spectra

    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(16, 30)) / 4, "b1": rng.normal(size=30) / 4,
              "w2": rng.normal(size=(30, 3)) / 5, "b2": np.zeros(3)}
    x, y = rng.normal(size=(64, 16)), rng.integers(0, 3, size=64)
    local = jax.local_devices()[0]
    one = sj.hessian(loss, jax.device_put(params, local), jax.device_put((x, y), local))
    ref, _ = spectra(one)
    results = {"process": jax.process_index(), "devices": len(jax.devices()), "local": len(jax.local_devices())}
    for layout in ("1d", "2d"):
        devices = np.array(jax.devices())
        if layout == "1d":
            mesh = Mesh(devices, ("model",))
            specs, data = {"w1": P("model", None), "b1": P(), "w2": P(), "b2": P()}, P()
        else:
            mesh = Mesh(devices.reshape(2, 2), ("data", "model"))
            specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
            data = P("data")

        def put(a, spec):  # every process holds the whole host array and places its own shards
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda index: a[index])

        H = sj.hessian(loss, {k: put(v, specs[k]) for k, v in params.items()}, (put(x, data), put(y, data)))
        got, top = spectra(H)
        V = top.eigenvectors
        results[layout] = dict(
            one=ref, sharded=got, n=H.shape[0], padded=int(V.shape[0]),
            eigvec_devices=len(V.sharding.device_set),
            local_shards=sorted({tuple(s.data.shape) for s in V.addressable_shards}),
            num_local_shards=len(V.addressable_shards),
            residuals=top.residuals.tolist(),
            host_rows=int(H.ops.to_numpy(V).shape[0]),
            diagonal_rows=int(so.diagonal(H, max_matvecs=2, seed=0).estimate.shape[0]),
        )
    with open(out, "w") as f:
        json.dump(results, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
