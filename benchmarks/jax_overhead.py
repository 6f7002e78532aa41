"""specops' per-product overhead in JAX against a hand-jitted ``jvp(grad)``.

For an MLP (small: ~10 k parameters; medium: ~1 M), one batch, float32, the median time of
one Hessian-vector product, side by side in one run:

- ``hand (args)``: ``jax.jit(lambda p, b, t: jax.jvp(jax.grad(lambda q: loss(q, b)), (p,), (t,))[1])``
  on the parameter pytree, with the parameters and the batch as arguments, as training code
  has them (they change every step): the reference of the target (specops within 1.3x);
- ``hand (const)``: the same closed over the parameters and the batch, which XLA then
  treats as constants and folds the forward pass of at compile time (a lower bound no
  product at changing weights reaches; it compiles for half a minute on the medium model);
- ``hand (flat)``: as ``hand (args)`` on a flat vector (``ravel_pytree``), what a
  flat-vector algorithm would write by hand;
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


def median_times(candidates, repeats):
    """Median seconds of each ``name: (fn, arg)``, timed in rounds (every candidate once a round).

    Rounds make a changing machine load hit every candidate alike; ``"ratio"`` is the median
    over rounds of ``H @ v`` against ``hand (args)`` in the same round.
    """
    for fn, arg in candidates.values():
        jax.block_until_ready(fn(arg))  # compile
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (fn, arg) in candidates.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(arg))
            times[name].append(time.perf_counter() - t)
    out = {name: float(np.median(t)) for name, t in times.items()}
    out["ratio"] = float(np.median(np.divide(times["H @ v"], times["hand (args)"])))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"{'model':8} {'n':>8} {'hand (args)':>12} {'hand (const)':>13} {'hand (flat)':>12} {'adapter':>10} "
          f"{'H @ v':>10} {'H @ V / 8':>10} {'H@v / hand (args)':>18}")
    for label, sizes, batch in (("small", [64, 128, 10], 128), ("medium", [256, 1024, 1024, 10], 256)):
        params = mlp(sizes)
        rng = np.random.default_rng(0)
        data = (jnp.asarray(rng.standard_normal((batch, sizes[0])), dtype=jnp.float32),
                jnp.asarray(rng.integers(0, sizes[-1], batch)))
        flat, unravel = ravel_pytree(params)
        tangent = unravel(jnp.asarray(rng.standard_normal(flat.size), dtype=jnp.float32))

        def f(p):
            return loss(p, data)

        hand_args = jax.jit(lambda p, b, t: jax.jvp(jax.grad(lambda q: loss(q, b)), (p,), (t,))[1])
        hand_const = jax.jit(lambda t: jax.jvp(jax.grad(f), (params,), (t,))[1])
        hand_flat = jax.jit(lambda w, b, v: jax.jvp(jax.grad(lambda q: loss(unravel(q), b)), (w,), (v,))[1])
        H = sj.hessian(loss, params, data, check_deterministic=False)
        v = ravel_pytree(tangent)[0]
        V = jnp.asarray(rng.standard_normal((flat.size, 8)), dtype=jnp.float32)
        adapter = H.adapter
        t = median_times({
            "hand (args)": (lambda u: hand_args(params, data, u), tangent),
            "hand (const)": (hand_const, tangent),
            "hand (flat)": (lambda u: hand_flat(flat, data, u), v),
            "adapter": (lambda u: adapter.hvp(0, data, u[:, None]), v),
            "H @ v": (H.matvec, v),
            "H @ V": (H.matmat, V),
        }, args.repeats)
        ref = hand_flat(flat, data, v)
        err = float(jnp.abs(H.matvec(v) - ref).max() / jnp.abs(ref).max())
        print(f"{label:8} {flat.size:8d} {t['hand (args)'] * 1e3:10.3f}ms {t['hand (const)'] * 1e3:11.3f}ms "
              f"{t['hand (flat)'] * 1e3:10.3f}ms {t['adapter'] * 1e3:8.3f}ms {t['H @ v'] * 1e3:8.3f}ms "
              f"{t['H @ V'] / 8 * 1e3:8.3f}ms {t['ratio']:17.2f}x   (max rel. diff {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
