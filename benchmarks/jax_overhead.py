"""specops' per-product overhead in JAX against a hand-jitted ``jvp(grad)``.

For an MLP (small: ~10 k parameters; medium: ~1 M), one batch, float32, the median time of
one Hessian-vector product, side by side in one run:

- ``hand (pytree)``: ``jax.jit(lambda t: jax.jvp(jax.grad(f), (p,), (t,))[1])`` on the
  parameter pytree, the reference of the issue's target (specops within 1.3x);
- ``hand (flat)``: the same on a flat vector (``ravel_pytree``), what a flat-vector
  algorithm would write by hand;
- ``specops adapter``: ``JaxAdapter.hvp`` (the compiled product specops calls);
- ``specops H @ v``: ``H.matvec(v)`` of :func:`specops.backends.jax.hessian`, with its
  batch loop, reduction and checks (``check_deterministic=False``);
- ``specops H @ V / 8``: a block of 8 columns, per column.

Run: ``python benchmarks/jax_overhead.py [--repeats 50]`` (about a minute).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from specops.backends import jax as sj


def mlp(sizes, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes))
    return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def loss(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    logits = x @ params[-1]["w"] + params[-1]["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def median_time(fn, arg, repeats):
    jax.block_until_ready(fn(arg))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"{'model':8} {'n':>8} {'hand (pytree)':>14} {'hand (flat)':>12} {'adapter':>10} "
          f"{'H @ v':>10} {'H @ V / 8':>10} {'H@v / hand':>11}")
    for label, sizes, batch in (("small", [64, 128, 10], 128), ("medium", [256, 1024, 1024, 10], 256)):
        params = mlp(sizes)
        rng = np.random.default_rng(0)
        data = (jnp.asarray(rng.standard_normal((batch, sizes[0])), dtype=jnp.float32),
                jnp.asarray(rng.integers(0, sizes[-1], batch)))
        flat, unravel = ravel_pytree(params)
        tangent = unravel(jnp.asarray(rng.standard_normal(flat.size), dtype=jnp.float32))

        def f(p):
            return loss(p, data)

        hand_tree = jax.jit(lambda t: jax.jvp(jax.grad(f), (params,), (t,))[1])
        hand_flat = jax.jit(lambda v: jax.jvp(jax.grad(lambda q: f(unravel(q))), (flat,), (v,))[1])
        H = sj.hessian(loss, params, data, check_deterministic=False)
        v = ravel_pytree(tangent)[0]
        V = jnp.asarray(rng.standard_normal((flat.size, 8)), dtype=jnp.float32)
        adapter = H.adapter if hasattr(H, "adapter") else None
        t_tree = median_time(hand_tree, tangent, args.repeats)
        t_flat = median_time(hand_flat, v, args.repeats)
        t_adapter = (median_time(lambda u: adapter.hvp(0, data, u[:, None]), v, args.repeats)
                     if adapter is not None else float("nan"))
        t_H = median_time(H.matvec, v, args.repeats)
        t_block = median_time(H.matmat, V, args.repeats) / 8
        err = float(jnp.abs(H.matvec(v) - hand_flat(v)).max() / jnp.abs(hand_flat(v)).max())
        print(f"{label:8} {flat.size:8d} {t_tree * 1e3:12.3f}ms {t_flat * 1e3:10.3f}ms {t_adapter * 1e3:8.3f}ms "
              f"{t_H * 1e3:8.3f}ms {t_block * 1e3:8.3f}ms {t_H / t_tree:10.2f}x   (max rel. diff {err:.1e})")


if __name__ == "__main__":
    main()
