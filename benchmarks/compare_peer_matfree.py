"""matfree in ``compare.py``: workload (a) only, on a JAX twin of the torch MLP (the same
weights, so the same Hessian)."""

from __future__ import annotations

import functools

import numpy as np

TASKS: dict = {}   # no ResNet (workload (b)) runner: matfree takes JAX models


def _tridiag_measure(T_list):
    """Nodes and weights (squared first components), one row per probe, of dense tridiagonals."""
    nodes, weights = [], []
    for T in T_list:
        theta, U = np.linalg.eigh(np.asarray(T, dtype=np.float64))
        nodes.append(theta)
        weights.append(U[0] ** 2)
    return np.array(nodes), np.array(weights)



def accuracy(model, X, y):
    """matfree's Hutchinson trace and Lanczos quadrature on a JAX twin of the torch MLP."""
    import jax
    import jax.flatten_util

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from matfree import decomp, stochtrace

    W1, b1, W2, b2 = (jnp.asarray(p.detach().numpy()) for p in model.parameters())
    flat, unravel = jax.flatten_util.ravel_pytree((W1, b1, W2, b2))
    Xj, yj = jnp.asarray(X.numpy()), jnp.asarray(y.numpy())

    def loss(theta):
        w1, c1, w2, c2 = unravel(theta)
        logits = jnp.tanh(Xj @ w1.T + c1) @ w2.T + c2
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(yj)), yj])

    grad = jax.grad(loss)

    def hvp(v):
        return jax.jvp(grad, (flat,), (v,))[1]

    # one compiled function per budget, reused over the seeds (a fresh jit per call recompiled
    # every time: seconds per seed, most of this workload's time)
    @functools.cache
    def compiled_trace(m):
        est = stochtrace.estimator_monte_carlo(stochtrace.monte_carlo_trace(),
                                               stochtrace.sampler_signs(flat, num=m))
        return jax.jit(lambda key: est(hvp, key))

    @functools.cache
    def compiled_tridiag(s):
        tridiag = decomp.tridiag_sym(s)
        return jax.jit(lambda v: tridiag(hvp, v).J_small)

    def trace(m, seed):
        return float(compiled_trace(m)(jax.random.PRNGKey(seed))), m

    def density(p, s, seed):
        probes = stochtrace.sampler_signs(flat, num=p)(jax.random.PRNGKey(seed))
        nodes, weights = _tridiag_measure([compiled_tridiag(s)(v) for v in probes])
        return nodes, weights, p * s

    return {"matfree": {"trace": trace, "density": density}}

