"""The reduction is the loss's: read from loss objects, checked on a split batch for plain functions.

Truth: the dense Hessian of the sum (or mean) of the loss over the concatenated data,
by double autodiff in each framework, float64.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def dense(A):
    return np.asarray(A.to_dense(chunk_size=A.shape[0]))


# --- PyTorch ------------------------------------------------------------------------------
def torch_problem():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
               for n in (4, 6)]
    return torch, nn, model, batches


def torch_dense_hessian(torch, model, loss, batches):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    X, Y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    def L(t):
        params = {n: q.view(s) for n, q, s in zip(names, t.split([s.numel() for s in shapes]), shapes)}
        return loss(torch.func.functional_call(model, params, (X,)), Y)

    return torch.autograd.functional.hessian(L, theta).numpy()


def test_torch_the_loss_objects_reduction_is_used():
    torch, nn, model, batches = torch_problem()
    from specops.backends import torch as st

    loss = nn.CrossEntropyLoss(reduction="sum")
    truth = torch_dense_hessian(torch, model, loss, batches)  # the Hessian of the sum
    H = st.hessian(model, loss, batches)  # issue 22: 48 % off before
    assert H.reduction == "sum" and rel(dense(H), truth) < 1e-12
    G = st.ggn(model, loss, batches)
    assert G.reduction == "sum"
    assert rel(dense(st.hessian(model, nn.CrossEntropyLoss(), batches)),
               torch_dense_hessian(torch, model, nn.CrossEntropyLoss(), batches)) < 1e-12
    import functools

    import torch.nn.functional as F

    H = st.hessian(model, functools.partial(F.cross_entropy, reduction="sum"), batches)
    assert H.reduction == "sum" and rel(dense(H), truth) < 1e-12


def test_torch_a_contradicting_or_unreduced_reduction_is_refused():
    _, nn, model, batches = torch_problem()
    from specops.backends import torch as st

    with pytest.raises(ValueError, match="contradicts the loss's own reduction 'sum'"):
        st.hessian(model, nn.CrossEntropyLoss(reduction="sum"), batches, reduction="mean")
    with pytest.raises(ValueError, match="contradicts"):
        st.ggn(model, nn.MSELoss(), batches, reduction="sum")
    with pytest.raises(ValueError, match="must return a scalar"):
        st.fisher(model, nn.CrossEntropyLoss(reduction="none"), batches)
    with pytest.raises(ValueError, match="reduction must be one of"):
        st.hessian(model, nn.CrossEntropyLoss(), batches, reduction="avg")


def test_torch_a_plain_functions_reduction_is_checked_on_a_split_batch():
    torch, nn, model, batches = torch_problem()
    import torch.nn.functional as F

    from specops.backends import torch as st

    def summed(o, y):
        return F.cross_entropy(o, y, reduction="sum")

    with pytest.raises(ValueError, match="reduction='sum'"):
        st.hessian(model, summed, batches)
    with pytest.raises(ValueError, match="reduction='sum'"):
        st.ggn(model, summed, batches)
    with pytest.raises(ValueError, match="reduction='mean'"):
        st.hessian(model, lambda o, y: F.cross_entropy(o, y), batches, reduction="sum")
    with pytest.raises(ValueError, match="reduction='sum'"):  # loss_fn(model, batch) too
        st.hessian(model, lambda model, batch: summed(model(batch[0]), batch[1]), batches)
    truth = torch_dense_hessian(torch, model, nn.CrossEntropyLoss(reduction="sum"), batches)
    assert rel(dense(st.hessian(model, summed, batches, reduction="sum")), truth) < 1e-12
    with pytest.warns(UserWarning, match="not separable"):  # neither a sum nor a mean: said, not refused
        st.hessian(model, lambda o, y: F.cross_entropy(o, y) * len(y) ** 0.5, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.hessian(model, lambda o, y: F.cross_entropy(o, y), batches)  # a mean passes quietly


# --- JAX ----------------------------------------------------------------------------------
def jax_problem():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.asarray(0.1 * rng.normal(size=3))}
    batches = [(jnp.asarray(rng.normal(size=(n, 5))), jnp.asarray(rng.normal(size=(n, 3)))) for n in (4, 6)]

    def apply(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    return jax, jnp, params, batches, apply


def test_jax_a_plain_functions_reduction_is_checked_on_a_split_batch():
    jax, jnp, params, batches, apply = jax_problem()
    from specops.backends import jax as sj

    def summed(p, batch):
        return jnp.sum((apply(p, batch[0]) - batch[1]) ** 2)

    with pytest.raises(ValueError, match="reduction='sum'"):
        sj.hessian(summed, params, batches)
    with pytest.raises(ValueError, match="reduction='sum'"):
        sj.ggn(apply, lambda o, y: jnp.sum((o - y) ** 2), params, batches)
    H = sj.hessian(summed, params, batches, reduction="sum")
    X, Y = jnp.concatenate([b[0] for b in batches]), jnp.concatenate([b[1] for b in batches])
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    truth = jax.hessian(lambda t: summed(unravel(t), (X, Y)))(flat)
    assert rel(dense(H), truth) < 1e-12
    # per-sample values are reduced by specops as reduction says: nothing to check
    import optax

    G = sj.ggn(apply, optax.squared_error, params, batches, reduction="sum")
    assert G.reduction == "sum"


# --- TensorFlow ---------------------------------------------------------------------------
def keras_problem():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,), dtype="float64"),
                              keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(4)
    batches = [(rng.normal(size=(n, 5)), rng.integers(0, 3, n)) for n in (4, 6)]
    return tf, keras, model, batches


def keras_dense_hessian(tf, model, loss, batches):
    variables = model.trainable_variables
    X = np.concatenate([b[0] for b in batches])
    Y = np.concatenate([b[1] for b in batches])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = loss(Y, model(X))
        g = tf.concat([tf.reshape(x, [-1]) for x in inner.gradient(value, variables)], 0)
    return np.concatenate([np.reshape(j, (g.shape[0], -1)) for j in outer.jacobian(g, variables)], 1)


def test_keras_the_loss_objects_reduction_is_used_and_plain_functions_are_checked():
    tf, keras, model, batches = keras_problem()
    from specops.backends import tensorflow as stf

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum", dtype="float64")
    H = stf.hessian(model, loss, batches, check_deterministic=False)
    assert H.reduction == "sum" and rel(dense(H), keras_dense_hessian(tf, model, loss, batches)) < 1e-12
    assert stf.ggn(model, loss, batches, check_deterministic=False).reduction == "sum"
    with pytest.raises(ValueError, match="contradicts"):
        stf.hessian(model, loss, batches, reduction="mean")
    with pytest.raises(ValueError, match="must return a scalar"):
        stf.hessian(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None,
                                                                      dtype="float64"), batches)

    def summed(y, o):
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, o))

    with pytest.raises(ValueError, match="reduction='sum'"):
        stf.hessian(model, summed, batches)
    with pytest.raises(ValueError, match="reduction='sum'"):
        stf.fisher(model, summed, batches)
    assert stf.hessian(model, summed, batches, reduction="sum", check_deterministic=False).reduction == "sum"
