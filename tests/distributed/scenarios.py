"""Small float64 models on scikit-learn digits, built on one rank's share of the data.

Run by ``mpi_worker.py`` on every rank of an ``mpiexec`` job, and by the tests in one
process on all of the data; the tests compare the two. Each ``build_*`` returns the
Hessian operator of one framework for the samples ``index`` (cut into batches of 23, so
batch sizes differ within and across ranks).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from numpy_models import SoftmaxRegression, digits

import specops
from specops.distributed import shard_range

NUM_SAMPLES = 240
BATCH = 23
HIDDEN = 12
SPLITS = ("equal", "unequal", "empty")


def split(n: int, comm, how: str) -> range:
    """This rank's samples: ``"equal"`` (:func:`shard_range`), ``"unequal"`` (rank r holds a
    share proportional to (r + 1)^2), ``"empty"`` (the last rank holds all, the others none),
    or ``"all"`` (everything: the single-process reference)."""
    if how == "all":
        return range(n)
    if how == "equal":
        return shard_range(n, comm)
    if how == "unequal":
        w = np.arange(1, comm.size + 1) ** 2
        bounds = np.concatenate([[0], np.round(np.cumsum(w) / w.sum() * n)]).astype(int)
    elif how == "empty":
        bounds = np.array([0] * comm.size + [n])
    else:
        raise ValueError(f"unknown split {how!r}")
    return range(bounds[comm.rank], bounds[comm.rank + 1])


def data(index):
    X, y = digits(NUM_SAMPLES)
    X, y = X[index.start:index.stop], y[index.start:index.stop]
    return [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(X), BATCH)]


def theta0(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.3, size=n)


def build_numpy(index, comm=None, d: int = 64):
    from specops.backends.numpy import hessian

    model = SoftmaxRegression(d, 10)
    batches = [(X[:, :d], y) for X, y in data(index)]
    return hessian(model.loss, model.grad, model.hvp, theta0(d * 10), batches, comm=comm)


def build_torch(index, comm=None, batches=None, device="cpu"):
    """``batches`` (an iterable of ``(X, y)`` tensors, e.g. a DataLoader) replaces those of ``index``."""
    import torch
    from specops.backends.torch import hessian

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)).double()
    model = model.to(device)
    if batches is None:
        batches = [(torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)) for X, y in data(index)]
    return hessian(model, torch.nn.CrossEntropyLoss(), batches, comm=comm, engine="double_backward")


def torch_dataset(n: int):
    """The first ``n`` digits as a ``TensorDataset`` (float64 images, int64 labels)."""
    import torch

    X, y = digits(NUM_SAMPLES)
    return torch.utils.data.TensorDataset(torch.as_tensor(X[:n]), torch.as_tensor(y[:n]))


def _mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(scale=0.3, size=(64, HIDDEN)), "b1": np.zeros(HIDDEN),
            "w2": rng.normal(scale=0.3, size=(HIDDEN, 10)), "b2": np.zeros(10)}


def build_jax(index, comm=None):
    import jax

    jax.config.update("jax_enable_x64", True)
    if os.environ.get("SPECOPS_TEST_JAX_CACHE"):
        # Compiling each new block shape costs seconds on small CI machines; the reference
        # run and the ranks compile the same shapes, so they share a persistent cache.
        jax.config.update("jax_compilation_cache_dir", os.environ["SPECOPS_TEST_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    import jax.numpy as jnp
    from specops.backends.jax import hessian

    def loss(p, batch):
        X, y = batch
        logits = jnp.tanh(X @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    params = {k: jnp.asarray(v) for k, v in _mlp_params().items()}
    batches = [(jnp.asarray(X), jnp.asarray(y)) for X, y in data(index)]
    return hessian(loss, params, batches, comm=comm)


def build_tensorflow(index, comm=None):
    import tensorflow as tf
    from specops.backends.tensorflow import hessian

    p = _mlp_params()
    model = tf.keras.Sequential([tf.keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64"),
                                 tf.keras.layers.Dense(10, dtype="float64")])
    model.build((None, 64))
    model.set_weights([p["w1"], p["b1"], p["w2"], p["b2"]])
    batches = [(tf.constant(X), tf.constant(y)) for X, y in data(index)]
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    return hessian(model, loss, batches, comm=comm)


BUILDERS = {"numpy": build_numpy, "torch": build_torch, "jax": build_jax, "tensorflow": build_tensorflow}


#: Splits and algorithm sizes per framework: JAX compiles for every new block shape (about
#: 3 s each on two shared cores), so its check is kept to the unequal split and fewer shapes.
PLAN = {
    "numpy": (SPLITS, {"k": 4, "probes": 30, "steps": 20}),
    "torch": (SPLITS, {"k": 4, "probes": 30, "steps": 20}),
    "jax": (("unequal",), {"k": 2, "probes": 12, "steps": 8}),
    "tensorflow": (("unequal",), {"k": 2, "probes": 12, "steps": 8}),
}


def spectra(H, k: int = 4, probes: int = 30, steps: int = 20) -> dict:
    """Top eigenvalues, a Hutch++ trace, an SLQ density, the loss and the gradient norm."""
    eig = specops.eigsh(H, k=k, which="LA", tol=1e-10, seed=3)
    tr = specops.trace(H, method="hutch++", max_matvecs=probes, seed=7)
    dens = specops.spectral_density(H, num_probes=3, num_steps=steps, seed=5)
    grad = H.ops.to_numpy(H.gradient())
    return {
        "eigenvalues": eig.eigenvalues.tolist(),
        "trace": float(tr.estimate),
        "nodes": np.asarray(dens.nodes).ravel().tolist(),
        "weights": np.asarray(dens.weights).ravel().tolist(),
        "loss": float(H.loss_at()),
        "gradient_norm": float(np.linalg.norm(grad)),
        "num_samples": int(H.num_samples),
    }


RTOL = 1e-10
KEYS = ("eigenvalues", "trace", "nodes", "weights", "loss", "gradient_norm", "num_samples")


def assert_close(got: dict, ref: dict, label: str):
    """Every entry of :data:`KEYS` of a distributed run equals the single-process one to :data:`RTOL`."""
    for key in KEYS:
        a, b = np.asarray(got[key], dtype=np.float64), np.asarray(ref[key], dtype=np.float64)
        assert a.shape == b.shape, f"{label}: {key} has shape {a.shape} distributed, {b.shape} in one process"
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * scale,
                                   err_msg=f"{label}: {key} distributed differs from one process")
