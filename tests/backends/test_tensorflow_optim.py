"""Keras 3 preconditioners and thresholds against D built by hand from the optimizer's slots.

The Hessian truth is a nested GradientTape's Jacobian of the gradient; ``D`` is computed in
float64 NumPy from the optimizer's variables with Keras' update formulas.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import specops as so
from specops.backends import tensorflow as stf

STEPS = 4


def _dense_hessian(loss, variables):
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = loss()
        g = tf.concat([tf.reshape(t, [-1]) for t in inner.gradient(value, variables)], axis=0)
    J = outer.jacobian(g, variables)
    return np.concatenate([np.reshape(j, (g.shape[0], -1)) for j in J], axis=1).astype(np.float64)


@pytest.fixture(scope="module", params=["float64", "float32"])
def problem(request):
    dtype = request.param
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype=dtype), keras.layers.Dense(5, activation="tanh", dtype=dtype),
                              keras.layers.Dense(3, dtype=dtype)])
    X, Y = rng.normal(size=(24, 4)).astype(dtype), rng.integers(0, 3, 24)
    lf = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)
    H = stf.hessian(model, lf, (X, Y))
    truth = _dense_hessian(lambda: lf(Y, model(X)), model.trainable_variables)
    return dtype, model, lf, X, Y, H, truth


def _train(opt, model, lf, X, Y):
    start = [v.numpy() for v in model.trainable_variables]
    for _ in range(STEPS):
        with tf.GradientTape() as tape:
            value = lf(Y, model(X))
        grads = tape.gradient(value, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    for v, s in zip(model.trainable_variables, start):  # back to the operator's point: D depends on the slots only
        v.assign(s)


def _slots(opt, attr, model):
    return np.concatenate([np.ravel(np.asarray(getattr(opt, attr)[opt._get_variable_index(v)].numpy(), np.float64))
                           for v in model.trainable_variables])


CASES = {
    "Adam": (lambda: keras.optimizers.Adam(1e-2, beta_2=0.99, epsilon=1e-6),
             lambda o, m: np.sqrt(_slots(o, "_velocities", m) / (1 - 0.99 ** STEPS)) + 1e-6 / np.sqrt(1 - 0.99 ** STEPS)),
    "AdamW-amsgrad": (lambda: keras.optimizers.AdamW(1e-2, amsgrad=True),
                      lambda o, m: (np.sqrt(_slots(o, "_velocity_hats", m)) + 1e-7) / np.sqrt(1 - 0.999 ** STEPS)),
    "RMSprop": (lambda: keras.optimizers.RMSprop(1e-3, momentum=0.5),
                lambda o, m: np.sqrt(_slots(o, "_velocities", m) + 1e-7)),
    "RMSprop-centered": (lambda: keras.optimizers.RMSprop(1e-3, centered=True, epsilon=1e-4),
                         lambda o, m: np.sqrt(_slots(o, "_velocities", m) - _slots(o, "_average_gradients", m) ** 2
                                              + 1e-4)),
    "Adagrad": (lambda: keras.optimizers.Adagrad(1e-2), lambda o, m: np.sqrt(_slots(o, "_accumulators", m) + 1e-7)),
    "SGD": (lambda: keras.optimizers.SGD(1e-2, momentum=0.9, nesterov=True), lambda o, m: None),
}


@pytest.mark.parametrize("which", list(CASES))
def test_preconditioned_matches_dense_truth(which, problem):
    dtype, model, lf, X, Y, H, truth = problem
    make, hand = CASES[which]
    opt = make()
    _train(opt, model, lf, X, Y)
    P = stf.preconditioner(opt, H)
    d = hand(opt, model)
    d = np.ones(H.shape[0]) if d is None else d
    f64 = dtype == "float64"
    np.testing.assert_allclose(P.ops.to_numpy(P.diagonal), d, rtol=1e-12 if f64 else 1e-5)
    want = truth / np.sqrt(np.outer(d, d))
    dense = so.preconditioned(H, P).to_dense()
    assert np.abs(dense - want).max() <= (1e-9 if f64 else 2e-4) * np.abs(want).max()


def test_bad_input_and_thresholds(problem):
    dtype, model, lf, X, Y, H, truth = problem
    opt = keras.optimizers.Adam(1e-3)
    with pytest.raises(ValueError, match="has not updated"):
        stf.preconditioner(opt, H)
    other = keras.Sequential([keras.Input((4,), dtype=dtype), keras.layers.Dense(3, dtype=dtype)])
    opt.build(other.trainable_variables)
    opt.iterations.assign(1)
    with pytest.raises(ValueError, match="does not hold the variable"):
        stf.preconditioner(opt, H)
    with pytest.raises(TypeError, match=r"Adamax.*keras.optimizers.Adam.*preconditioned\(H, P\)"):
        stf.preconditioner(keras.optimizers.Adamax(), H)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    with pytest.raises(TypeError, match="schedule"):
        stf.stability_threshold(schedule)
    assert stf.stability_threshold(keras.optimizers.Adam(1e-3)) == pytest.approx(38e3, rel=1e-6)
    assert stf.stability_threshold(keras.optimizers.SGD(0.1)) == pytest.approx(20, rel=1e-6)
    assert stf.stability_threshold(keras.optimizers.SGD(0.1, momentum=0.9)) == pytest.approx(38, rel=1e-6)
    assert stf.stability_threshold(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)) == pytest.approx(
        3.8 / 0.28, rel=1e-6)
    # a schedule: the rate now, at optimizer.iterations
    sgd = keras.optimizers.SGD(schedule)
    sgd.build(model.trainable_variables)
    sgd.iterations.assign(2)
    assert stf.stability_threshold(sgd) == pytest.approx(2 / 0.025, rel=1e-6)


@pytest.mark.parametrize("make", [lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                                  lambda: keras.optimizers.Adam(0.1, beta_2=0.5, epsilon=1e3)], ids=["nesterov", "adam"])
def test_threshold_separates_stable_from_divergent_on_a_quadratic(make):
    # P = sqrt(v_hat) + epsilon / sqrt(1 - beta_2^t) ~ epsilon while |g| << epsilon and beta_2^t ~ 0
    scale = 1e3 if isinstance(make(), keras.optimizers.Adam) else 1.0

    def growth(lam):
        opt = make()
        x = keras.Variable(np.full(1, 1e-60), dtype="float64")
        opt.build([x])
        step = tf.function(lambda: opt.apply_gradients([(lam * x.value, x)]))
        xs = []
        for _ in range(500):
            step()
            xs.append(abs(float(x.numpy()[0])))
        return np.inf if not max(xs) <= 1e-6 else max(xs[-50:]) / max(xs[150:200])

    thr = stf.stability_threshold(make()) * scale
    assert growth(0.97 * thr) < 1e-2
    assert growth(1.03 * thr) > 1e2
