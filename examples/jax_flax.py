"""The Hessian spectrum of a JAX model: top eigenvalues, trace, density, per-layer blocks.

A two-layer MLP on scikit-learn's digits, written in pure JAX with a raw-dict
parameter pytree, trained briefly with plain SGD, then analysed with specops. The
same code works for Flax, Equinox or Haiku: pass the parameter pytree and a
``loss_fn(params, batch)`` (with Flax, ``model.apply({"params": params}, x)`` inside
it) — see docs/backends/jax.md. If Flax is installed, ``--flax`` builds the same
MLP with ``flax.linen``.

Run:  python examples/jax_flax.py [--flax]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import specops
from specops.backends import jax as sj
from specops.zoo.data import batches, digits

jax.config.update("jax_enable_x64", True)  # float64 parameters and products


def pure_jax_model(rng):
    """Parameters (a raw dict) and ``apply(params, x) -> logits``."""
    def init(fan_in, fan_out):
        return {"w": jnp.asarray(rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)), "b": jnp.zeros(fan_out)}

    params = {"hidden": init(64, 32), "out": init(32, 10)}

    def apply(p, x):
        h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
        return h @ p["out"]["w"] + p["out"]["b"]

    return params, apply


def flax_model(rng):
    try:
        import flax.linen as nn
    except ImportError as e:
        raise SystemExit("--flax needs Flax: pip install flax (or run without --flax)") from e

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10, name="out")(jnp.tanh(nn.Dense(32, name="hidden")(x)))

    model = MLP()
    params = model.init(jax.random.key(int(rng.integers(2**31))), jnp.zeros((1, 64)))["params"]
    return params, lambda p, x: model.apply({"params": p}, x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flax", action="store_true", help="build the MLP with flax.linen")
    args = parser.parse_args()

    X, y = digits(n=1024)
    X = X.reshape(len(X), -1).astype(np.float64)
    params, apply = (flax_model if args.flax else pure_jax_model)(np.random.default_rng(0))

    def loss_fn(p, batch):
        x, t = batch
        logp = jax.nn.log_softmax(apply(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    step = jax.jit(lambda p, b: jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, p, jax.grad(loss_fn)(p, b)))
    for _ in range(200):
        params = step(params, (X, y))

    data = batches(X, y, batch_size=256)
    H = sj.hessian(loss_fn, params, data)
    print(f"{H.num_params} parameters in blocks {list(H.param_blocks)}; loss {H.loss_at():.4f}")

    top = specops.eigsh(H, k=3, which="LA", tol=1e-8, seed=0)
    print("top eigenvalues:", np.round(top.eigenvalues, 6), "converged:", top.converged.all())
    tr = specops.trace(H, max_matvecs=60, seed=0)
    print(f"trace: {tr.estimate:.4f} +- {tr.stderr:.4f}")
    density = specops.spectral_density(H, num_probes=4, num_steps=48, seed=0)
    grid = density.default_grid()
    values = density.evaluate(grid)
    print(f"spectral density on [{grid[0]:.3g}, {grid[-1]:.3g}], highest at {grid[values.argmax()]:.3g}")

    for name in ("hidden.*", "out.*"):
        block = specops.eigsh(H.restrict(name), k=1, tol=1e-8, seed=0)
        print(f"top eigenvalue of the {name!r} block: {block.eigenvalues[0]:.6f}")


if __name__ == "__main__":
    main()
