"""JAX's GGN and Fishers built by the core (specops.curvature) from JAX's primitives."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from specops.backends import jax as sj  # noqa: E402
from specops.curvature import CURVATURES, curvature_like  # noqa: E402

LOSS = optax.softmax_cross_entropy_with_integer_labels


def apply(p, x):
    """Two positions of three classes per sample: the empirical Fisher per term differs from per sample."""
    return jnp.reshape(jnp.tanh(x @ p["w1"]) @ p["w2"], (x.shape[0], 2, 3))


def problem(dtype):
    rng = np.random.default_rng(7)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 5)), dtype), "w2": jnp.asarray(rng.normal(size=(5, 6)), dtype)}
    batches = [(jnp.asarray(rng.normal(size=(s, 4)), dtype), jnp.asarray(rng.integers(0, 3, (s, 2)))) for s in (6, 3)]
    return params, batches


def dense_hessian(params, batches):
    """The Hessian of the mean over samples of each sample's summed cross-entropies, by jax.hessian."""
    theta, unravel = ravel_pytree(params)
    X, Y = jnp.concatenate([b[0] for b in batches]), jnp.concatenate([b[1] for b in batches])
    return np.asarray(jax.hessian(lambda t: jnp.mean(jnp.sum(LOSS(apply(unravel(t), X), Y), axis=1)))(theta))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_curvature_like_on_a_jax_operator_equals_the_operator_built_directly(dtype):
    """Each curvature from a JAX GGN/Fisher against sj.ggn/sj.fisher on the same arguments, bit for
    bit (one compiled program each); ``"hessian"`` against jax.hessian of the same loss; blocks too."""
    params, batches = problem(getattr(jnp, dtype))
    kw = {"chunk_size": 64}
    G = sj.ggn(apply, LOSS, params, batches, **kw)
    n = G.shape[0]
    V = jnp.asarray(np.random.default_rng(6).standard_normal((n, 3)), getattr(jnp, dtype))
    direct = {"ggn": G,
              "empirical_fisher": sj.fisher(apply, LOSS, params, batches, datum="term", **kw),
              "mc_fisher": sj.fisher(apply, LOSS, params, batches, estimator="mc", num_samples=2, seed=5, **kw)}
    for curvature in CURVATURES[1:]:  # from the GGN, and the GGN from a Fisher
        start = direct["mc_fisher"] if curvature == "ggn" else G
        made = curvature_like(start, curvature=curvature, num_samples=2, seed=5, datum="term")
        assert made.adapter.curvature == curvature and made.positive_semidefinite is True
        assert np.array_equal(np.asarray(made @ V), np.asarray(direct[curvature] @ V)), curvature
    eps = float(np.finfo(dtype).eps)
    # a block (w2, the last 30 coordinates) is the full operator's block
    W = V.at[:-30].set(0)
    block, want = np.asarray(made.restrict(["w2"]) @ V[-30:]), np.asarray(made @ W)[-30:]
    assert np.linalg.norm(block - want) <= 100 * eps * np.linalg.norm(want)
    H = curvature_like(G, "hessian")
    truth = dense_hessian(params, batches) @ np.asarray(V, np.float64)
    assert np.linalg.norm(np.asarray(H @ V, np.float64) - truth) <= 100 * eps * np.linalg.norm(truth)
    # the Monte-Carlo labels follow the seed
    other = curvature_like(G, "mc_fisher", num_samples=2, seed=6)
    assert not np.allclose(np.asarray(other @ V), np.asarray(direct["mc_fisher"] @ V))


def test_jax_losses_of_the_parameters_are_refused_with_the_jax_form():
    params, batches = problem(jnp.float64)
    with pytest.raises(ValueError, match=r"outputs alone.*pass apply_fn\(params, inputs\) and loss_fn\(outputs, "
                                         r"targets\)"):
        sj.fisher(apply, lambda params, batch: 0.0, params, batches)
    with pytest.raises(TypeError, match="ggn and fisher take apply_fn"):
        sj.ggn(apply, None, params, batches)
    H = sj.hessian(sj.model_loss(apply, lambda o, y: jnp.mean(LOSS(o, y).sum(1))), params, batches)
    with pytest.raises(TypeError, match="for JAX build specops.backends.jax.ggn"):
        curvature_like(H, "ggn")
