"""Curvature tracked over training in a JAX/optax loop.

A two-layer MLP on scikit-learn's digits (pure JAX, a dict of parameters), trained with
``optax.sgd`` with momentum; every other epoch a :class:`specops.Tracker` records the top
eigenvalues, the trace and the spectral density of the loss Hessian at the current
parameters, and each layer's trace.

Run:  python examples/jax_optax_tracker.py [--epochs 10]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import specops
from specops.backends import jax as sj
from specops.zoo.data import batches, digits

jax.config.update("jax_enable_x64", True)


def apply(p, x):
    return jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["out"]["w"] + p["out"]["b"]


def loss_fn(p, batch):
    x, y = batch
    logp = jax.nn.log_softmax(apply(p, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="curvature_jax.jsonl")
    args = ap.parse_args()

    X, y = digits()
    X = X.reshape(len(X), -1).astype(np.float64)
    rng = np.random.default_rng(0)
    params = {"hidden": {"w": jnp.asarray(rng.normal(size=(64, 32)) / 8.0), "b": jnp.zeros(32)},
              "out": {"w": jnp.asarray(rng.normal(size=(32, 10)) / np.sqrt(32)), "b": jnp.zeros(10)}}
    opt = optax.sgd(0.1, momentum=0.9)
    state = opt.init(params)
    current = {"params": params}
    hessian_data = batches(jnp.asarray(X[:512]), jnp.asarray(y[:512]), 256)

    @jax.jit
    def step(p, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    tracker = specops.Tracker(lambda: sj.hessian(loss_fn, current["params"], hessian_data), args.out, k=2,
                              blocks={"hidden": "hidden.*", "out": "out.*"}, block_metrics=("trace",),
                              trace_options=dict(max_matvecs=40), density_options=dict(num_probes=2, num_steps=30),
                              resume=True)
    for epoch in range(1, args.epochs + 1):
        for xb, yb in batches(jnp.asarray(X), jnp.asarray(y), 64):
            current["params"], state, loss = step(current["params"], state, (xb, yb))
        if epoch % 2 == 0:
            r = tracker.update(epoch, info={"loss": float(loss)})
            print(f"epoch {epoch}: top eigenvalue {r['eigenvalues'][0]:.4g}, trace {r['trace']['estimate']:.4g} "
                  f"+- {r['trace']['stderr']:.2g}, layer traces {[round(b['trace']['estimate'], 3) for b in r['blocks'].values()]}"
                  f", {r['num_matvecs']} products")
    print(f"log in {args.out}; read it back with specops.Tracker.load")


if __name__ == "__main__":
    main()
