"""Output-space matrices (specops/output_space.py) on JAX and TensorFlow, and the construction check.

JAX (optax, classes on the last axis, per-position values summed per sample) and Keras
(classes on the last axis, ``sum_over_batch_size`` over positions; MSE over entries) on
sequence outputs ``(N, 4, C)``, batches of 3 and 5: the GGN, the empirical Fisher per
sample and per loss term, against dense references on the concatenated data (the
explicit Jacobian, the explicit Hessian of the loss in the outputs, per-datum output
gradients), in float64 and float32. The construction check is seen to catch a planted
convention error (a wrong class axis) on every backend.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def dense(A):
    return np.asarray(A.to_dense(chunk_size=A.shape[0]), dtype=np.float64)


def references(J, H_out, sample_grads, term_grads, sample_weight, term_weight):
    """GGN ``J^T H_out J`` and the two empirical Fishers ``w sum_d J^T g_d g_d^T J``."""
    J = np.asarray(J).reshape(-1, np.asarray(J).shape[-1])
    S, T = np.asarray(sample_grads) @ J, np.asarray(term_grads) @ J
    return {"ggn": J.T @ np.asarray(H_out) @ J, "sample": sample_weight * S.T @ S, "term": term_weight * T.T @ T}


# --- JAX ----------------------------------------------------------------------------------
def jax_setup():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    optax = pytest.importorskip("optax")
    return jax, jax.numpy, optax


def jax_problem(loss_name):
    jax, jnp, optax = jax_setup()
    rng = np.random.default_rng(11)
    C = 3 if loss_name == "ce" else 2
    params = {"w1": rng.normal(size=(6, 5)), "b1": 0.1 * rng.normal(size=5), "w2": rng.normal(size=(5, C)),
              "b2": 0.1 * rng.normal(size=C)}
    params = {k: jnp.asarray(v) for k, v in params.items()}

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    batches = [(jnp.asarray(rng.normal(size=(n, 4, 6))),
                jnp.asarray(rng.integers(0, C, (n, 4))) if loss_name == "ce" else jnp.asarray(rng.normal(size=(n, 4, C))))
               for n in (3, 5)]
    loss = optax.softmax_cross_entropy_with_integer_labels if loss_name == "ce" else optax.squared_error
    return params, apply, batches, loss


def jax_truth(params, apply, batches, loss):
    jax, jnp, _ = jax_setup()
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    X, Y = jnp.concatenate([b[0] for b in batches]), jnp.concatenate([b[1] for b in batches])
    N = X.shape[0]
    out = apply(params, X)

    def terms(o):  # one value per position: optax's CE values, or a squared error's row sums
        v = loss(o, Y)
        return v if v.ndim == 2 else v.sum(-1)

    J = jax.jacobian(lambda t: apply(unravel(t), X).reshape(-1))(flat)
    H_out = jax.hessian(lambda o: terms(o.reshape(out.shape)).sum() / N)(out.reshape(-1))
    g_term = jax.jacobian(lambda o: terms(o.reshape(out.shape)).reshape(-1))(out.reshape(-1))
    g_sample = jax.jacobian(lambda o: terms(o.reshape(out.shape)).sum(1))(out.reshape(-1))
    # specops' mean: each sample's values summed, averaged over samples: weight 1/N for both data
    return references(J, H_out, g_sample, g_term, 1 / N, 1 / N)


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_jax_sequence_outputs_match_dense_references(loss_name):
    jax, jnp, _ = jax_setup()
    from specops.backends import jax as sj

    params, apply, batches, loss = jax_problem(loss_name)
    T = jax_truth(params, apply, batches, loss)
    kw = {"chunk_size": 64, "check_deterministic": False}
    G = sj.ggn(apply, loss, params, batches, **kw)
    assert "closed form" in G.engine and G.adapter.output_check_error < 1e-12
    assert rel(dense(G), T["ggn"]) < 1e-10
    assert rel(dense(sj.fisher(apply, loss, params, batches, **kw)), T["sample"]) < 1e-10
    assert rel(dense(sj.fisher(apply, loss, params, batches, datum="term", **kw)), T["term"]) < 1e-10
    batches32 = [(x.astype(jnp.float32), y.astype(jnp.float32) if loss_name == "mse" else y) for x, y in batches]
    G32 = sj.ggn(apply, loss, params, batches32, dtype=jnp.float32, **kw)
    assert "closed form" in G32.engine and rel(dense(G32), T["ggn"]) < 1e-5


# --- TensorFlow ---------------------------------------------------------------------------
def keras_problem(loss_name, dtype="float64"):
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(12)
    C = 3 if loss_name == "ce" else 2
    model = keras.Sequential([keras.Input((4, 6), dtype=dtype), keras.layers.Dense(5, activation="tanh", dtype=dtype),
                              keras.layers.Dense(C, dtype=dtype)])
    rng = np.random.default_rng(13)
    batches = [(rng.normal(size=(n, 4, 6)).astype(dtype),
                rng.integers(0, C, (n, 4)) if loss_name == "ce" else rng.normal(size=(n, 4, C)).astype(dtype))
               for n in (3, 5)]
    loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype) if loss_name == "ce"
            else keras.losses.MeanSquaredError(dtype=dtype))
    unreduced = (keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=dtype)
                 if loss_name == "ce" else keras.losses.MeanSquaredError(reduction=None, dtype=dtype))
    return tf, model, batches, loss, unreduced


def keras_truth(tf, model, batches, loss, unreduced, loss_name):
    variables = model.trainable_variables
    X, Y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    N = X.shape[0]
    with tf.GradientTape() as tape:
        out = model(X)
    J = np.concatenate([np.reshape(j, (int(np.prod(out.shape)), -1)) for j in tape.jacobian(out, variables)], 1)
    o = tf.constant(out)
    C = out.shape[-1]

    def terms(o):  # Keras' per-position values; a squared error's row sums (its values are row means)
        v = unreduced(Y, o)
        return v if loss_name == "ce" else C * v

    with tf.GradientTape() as outer:
        outer.watch(o)
        with tf.GradientTape() as inner:
            inner.watch(o)
            value = loss(Y, o)
        g = tf.reshape(inner.gradient(value, o), [-1])
    H_out = np.reshape(outer.jacobian(g, o), (g.shape[0], -1))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(o)
        t = terms(o)
        per_sample = tf.reduce_mean(unreduced(Y, o), axis=1)  # the loss of each sample alone
    g_term = np.reshape(tape.jacobian(t, o), (int(np.prod(t.shape)), -1))
    g_sample = np.reshape(tape.jacobian(per_sample, o), (N, -1))
    # a term's weight in the loss: 1 / positions (CE) or 1 / entries (MSE)
    w_term = 1 / (N * 4) if loss_name == "ce" else 1 / (N * 4 * C)
    return references(J, H_out, g_sample, g_term, 1 / N, w_term)


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_keras_sequence_outputs_match_dense_references(loss_name):
    from specops.backends import tensorflow as stf

    tf, model, batches, loss, unreduced = keras_problem(loss_name)
    T = keras_truth(tf, model, batches, loss, unreduced, loss_name)
    kw = {"chunk_size": 256, "check_deterministic": False}
    G = stf.ggn(model, loss, batches, **kw)
    assert "closed form" in G.engine and G.adapter.output_check_error < 1e-12
    assert rel(dense(G), T["ggn"]) < 1e-10
    assert rel(dense(stf.fisher(model, loss, batches, **kw)), T["sample"]) < 1e-10
    assert rel(dense(stf.fisher(model, loss, batches, datum="term", **kw)), T["term"]) < 1e-10
    _, model32, batches32, loss32, _ = keras_problem(loss_name, "float32")
    model32.set_weights([w.astype("float32") for w in model.get_weights()])
    G32 = stf.ggn(model32, loss32, batches32, **kw)
    assert "closed form" in G32.engine and rel(dense(G32), T["ggn"]) < 1e-5


# --- the construction check catches a planted convention error ------------------------------
def test_torch_a_wrong_class_axis_is_caught_at_construction(monkeypatch):
    torch = pytest.importorskip("torch")
    from torch import nn

    from specops.backends import torch as st
    from specops.output_space import LossSpec

    torch.manual_seed(0)
    # (N, 3, 3) logits, classes on axis 1: the targets' shape fits either axis, only the check can tell
    model = nn.Conv1d(2, 3, 1).double()
    batches = [(torch.randn(n, 2, 3, dtype=torch.float64), torch.randint(0, 3, (n, 3))) for n in (3, 4)]
    right = st.ggn(model, nn.CrossEntropyLoss(), batches)
    assert "closed form" in right.engine
    monkeypatch.setattr(st.curvature, "_loss_spec", lambda loss_fn: LossSpec("categorical", -1, "samples"))  # the old bug
    with pytest.warns(UserWarning, match="specops read the loss wrong; using autodiff"):
        G = st.ggn(model, nn.CrossEntropyLoss(), batches)
    assert "autodiff" in G.engine and G.adapter.output_check_error > 0.5
    assert rel(dense(G), dense(right)) < 1e-12  # autodiff is the loss's
    with pytest.raises(RuntimeError, match="specops read the loss wrong"):
        st.fisher(model, nn.CrossEntropyLoss(), batches, estimator="mc")


def test_jax_and_keras_a_wrong_class_axis_is_caught_at_construction(monkeypatch):
    from specops.backends import jax as sj
    from specops.backends import tensorflow as stf
    from specops.output_space import LossSpec

    params, apply, batches, loss = jax_problem("ce")
    # a wrong weighting: optax values summed per sample are not averaged over positions
    monkeypatch.setattr(sj.curvature, "_loss_spec", lambda loss_fn, reduction: LossSpec("categorical", -1, "positions"))
    with pytest.warns(UserWarning, match="specops read the loss wrong"):
        G = sj.ggn(apply, loss, params, batches, check_deterministic=False)
    assert "autodiff" in G.engine
    _, model, kbatches, kloss, _ = keras_problem("ce")
    monkeypatch.setattr(stf.curvature, "_loss_spec", lambda loss_fn: LossSpec("categorical", 1, "positions"))
    with pytest.raises(RuntimeError, match="specops read the loss wrong"):
        stf.fisher(model, kloss, kbatches, estimator="mc", check_deterministic=False)
