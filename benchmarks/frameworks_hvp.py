"""Hessian-vector product cost relative to a gradient, per framework, on the same models.

For an MLP and a small CNN on scikit-learn's digits, in PyTorch, JAX and
TensorFlow/Keras, times one batch's gradient, one Hessian-vector product, and one
``matmat`` of ``k`` columns (per column), through each backend's adapter (the
per-batch functions specops calls). Reports medians and the ratio to the gradient.
"First calls extra" is the first HVP and first matmat minus their steady-state
times: JAX's compile time, TensorFlow's trace time, and for PyTorch's
``cached_graph`` engine the building of the cached graph.

Usage::

    python benchmarks/frameworks_hvp.py [--threads 1] [--batch 256] [--repeats 30] [--k 8] [--float64]

Threads are fixed before any framework is imported: ``OMP_NUM_THREADS``,
``XLA_FLAGS`` (single-threaded Eigen, one intra-op thread),
``tf.config.threading`` and ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--k", type=int, default=8, help="columns of the matmat")
    p.add_argument("--float64", action="store_true")
    p.add_argument("--frameworks", default="torch,jax,tensorflow")
    return p.parse_args()


ARGS = parse()
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["XLA_FLAGS"] = (
    f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={ARGS.threads}"
)

import numpy as np

from specops.zoo.data import digits

DTYPE = np.float64 if ARGS.float64 else np.float32
HIDDEN, CHANNELS, CLASSES = 32, 8, 10


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_call_seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- the models in each framework -------------------------------------------------------
def torch_adapter(kind, X, y):
    import torch

    from specops.backends import torch as st

    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    nn = torch.nn
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    else:
        model = nn.Sequential(nn.Conv2d(1, CHANNELS, 3), nn.Tanh(), nn.Flatten(),
                              nn.Linear(CHANNELS * 36, CLASSES))
    model = model.to(torch.float64 if DTYPE == np.float64 else torch.float32)
    batch = (torch.tensor(X), torch.tensor(y))
    adapters = {}
    for engine in ("auto", "forward_over_reverse"):
        H = st.hessian(model, nn.CrossEntropyLoss(), batch, engine=engine, check_deterministic=False)
        adapters[f"torch ({H.engine})"] = (H, batch)
    return adapters


def jax_adapter(kind, X, y):
    import jax
    import jax.numpy as jnp

    from specops.backends import jax as sj

    jax.config.update("jax_enable_x64", DTYPE == np.float64)
    rng = np.random.default_rng(0)

    def init(*shape):
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]) or 1), dtype=DTYPE)

    if kind == "mlp":
        params = {"hidden": {"w": init(64, HIDDEN), "b": init(HIDDEN)},
                  "out": {"w": init(HIDDEN, CLASSES), "b": init(CLASSES)}}

        def features(p, x):
            return jnp.tanh(x.reshape(len(x), -1) @ p["hidden"]["w"] + p["hidden"]["b"])
    else:
        params = {"conv": {"w": init(CHANNELS, 1, 3, 3), "b": init(CHANNELS)},
                  "out": {"w": init(CHANNELS * 36, CLASSES), "b": init(CLASSES)}}

        def features(p, x):
            h = jax.lax.conv_general_dilated(x, p["conv"]["w"], (1, 1), "VALID")
            return jnp.tanh(h + p["conv"]["b"][:, None, None]).reshape(len(x), -1)

    def loss(p, batch):
        x, t = batch
        logp = jax.nn.log_softmax(features(p, x) @ p["out"]["w"] + p["out"]["b"])
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    batch = (jnp.asarray(X), jnp.asarray(y))
    H = sj.hessian(loss, params, batch, check_deterministic=False, chunk_size=max(ARGS.k, 1))
    return {"jax": (H, batch)}


def tf_adapter(kind, X, y):
    import keras
    import tensorflow as tf

    from specops.backends import tensorflow as stf

    tf.config.threading.set_intra_op_parallelism_threads(ARGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(ARGS.threads)
    keras.utils.set_random_seed(0)
    dt = np.dtype(DTYPE).name
    L = keras.layers
    if kind == "mlp":
        layers = [L.Flatten(dtype=dt), L.Dense(HIDDEN, activation="tanh", dtype=dt), L.Dense(CLASSES, dtype=dt)]
    else:
        layers = [L.Conv2D(CHANNELS, 3, activation="tanh", dtype=dt), L.Flatten(dtype=dt),
                  L.Dense(CLASSES, dtype=dt)]
    model = keras.Sequential([keras.Input((8, 8, 1), dtype=dt)] + layers)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dt)
    batch = (tf.constant(X.transpose(0, 2, 3, 1)), tf.constant(y))
    H = stf.hessian(model, loss, batch, check_deterministic=False, chunk_size=max(ARGS.k, 1))
    return {"tensorflow": (H, batch)}


BUILDERS = {"torch": torch_adapter, "jax": jax_adapter, "tensorflow": tf_adapter}


def measure(H, batch):
    ad, ops = H.adapter, H.ops
    v = ops.random(H.shape[0], [0], 0, distribution="normal")
    V = ops.random(H.shape[0], range(ARGS.k), 0, distribution="normal")
    def done(x):  # one entry to the host: waits for the result without timing a transfer
        return ops.to_numpy(x[:1])

    grad = lambda: done(ad.gradient(batch))
    hvp = lambda: done(ad.hvp(0, batch, v))
    mm = lambda: done(ad.hvp(0, batch, V))
    first = first_call_seconds(hvp)
    first_mm = first_call_seconds(mm)
    t_grad = median_seconds(grad, ARGS.repeats)
    t_hvp = median_seconds(hvp, ARGS.repeats)
    t_mm = median_seconds(mm, ARGS.repeats)
    return {"n": H.shape[0], "grad": t_grad, "hvp": t_hvp, "mm": t_mm / ARGS.k,
            "compile": (first - t_hvp) + (first_mm - t_mm)}


def main():
    X, y = digits(n=ARGS.batch)
    X = X.astype(DTYPE)
    rows = []
    for kind in ("mlp", "cnn"):
        for fw in ARGS.frameworks.split(","):
            for name, (H, batch) in BUILDERS[fw](kind, X, y).items():
                r = measure(H, batch)
                rows.append((kind, name, r))
                print(f"  done {kind} {name}", file=sys.stderr)
    print(f"\nbatch {ARGS.batch}, {np.dtype(DTYPE).name}, {ARGS.threads} thread(s), "
          f"medians of {ARGS.repeats}; k = {ARGS.k} columns per matmat\n")
    print("| model | framework (engine) | params | gradient ms | HVP ms | HVP / grad "
          "| matmat ms per column | per column / grad | first calls extra s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, name, r in rows:
        print(f"| {kind} | {name} | {r['n']} | {r['grad'] * 1e3:.3f} | {r['hvp'] * 1e3:.3f} | "
              f"{r['hvp'] / r['grad']:.2f} | {r['mm'] * 1e3:.3f} | {r['mm'] / r['grad']:.2f} | "
              f"{r['compile']:.2f} |")


if __name__ == "__main__":
    main()
