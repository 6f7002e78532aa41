"""The TensorFlow backend against dense Hessians from nested GradientTapes on the full batch."""

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import specops
import specops.checks
from specops.backends import tensorflow as stf

RTOL = 1e-10
F64 = "float64"


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny)


def dense_hessian(loss, variables):
    """The dense Hessian of ``loss()`` by a tape's Jacobian of the flat gradient."""
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = loss()
        g = tf.concat([tf.reshape(t, [-1]) for t in inner.gradient(value, variables)], axis=0)
    J = outer.jacobian(g, variables)
    return np.concatenate([np.reshape(j, (g.shape[0], -1)) for j in J], axis=1), float(value), g.numpy()


def cross_entropy(reduction="sum_over_batch_size"):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction, dtype=F64)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    model = keras.Sequential([
        keras.Input((5,), dtype=F64),
        keras.layers.Dense(4, activation="tanh", dtype=F64, name="hidden"),
        keras.layers.Dense(3, dtype=F64, name="out"),
    ], name="sequential")  # named: Keras numbers unnamed models by creation order
    X, Y = rng.normal(size=(23, 5)), rng.integers(0, 3, size=23)
    batches = [(X[:10], Y[:10]), (X[10:20], Y[10:20]), (X[20:], Y[20:])]  # unequal last batch
    truth, loss, grad = dense_hessian(lambda: cross_entropy()(Y, model(X)), model.trainable_variables)
    truth_sum, _, _ = dense_hessian(lambda: cross_entropy("sum")(Y, model(X)), model.trainable_variables)
    H = stf.hessian(model, cross_entropy(), batches, chunk_size=64)
    return {"model": model, "X": X, "Y": Y, "batches": batches, "H": H, "H_mean": truth,
            "H_sum": truth_sum, "loss": loss, "grad": grad}


def dense(H):
    return H.to_dense(chunk_size=H.shape[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_products_match_dense_hessian(problem, reduction):
    if reduction == "mean":
        H = problem["H"]
    else:
        H = stf.hessian(problem["model"], cross_entropy("sum"), problem["batches"], reduction="sum",
                        chunk_size=64, check_deterministic=False)
    truth = problem[f"H_{reduction}"]
    V = np.random.default_rng(1).normal(size=(H.shape[0], 5))
    HV = H @ tf.constant(V)
    assert isinstance(HV, tf.Tensor) and HV.dtype == tf.float64
    assert rel(HV, truth @ V) < RTOL
    assert rel(H @ tf.constant(V[:, 0]), truth @ V[:, 0]) < RTOL
    assert rel(dense(H), truth) < RTOL
    assert H.num_samples == 23


def test_dataset_input(problem):
    ds = tf.data.Dataset.from_tensor_slices((problem["X"], problem["Y"])).batch(10)  # 10, 10, 3
    H = stf.hessian(problem["model"], cross_entropy(), ds, chunk_size=64)
    assert H.batch_sizes == [10, 10, 3]
    v = np.random.default_rng(2).normal(size=H.shape[0])
    assert rel(H @ tf.constant(v), problem["H_mean"] @ v) < RTOL


def test_blocks_named_by_variable_path(problem):
    H = problem["H"]
    assert list(H.param_blocks) == ["sequential/hidden/kernel", "sequential/hidden/bias",
                                    "sequential/out/kernel", "sequential/out/bias"]
    assert H.param_shapes["sequential/hidden/kernel"] == (5, 4)
    flat = np.concatenate([v.numpy().ravel() for v in problem["model"].trainable_variables])
    assert np.array_equal(H.params_vector().numpy(), flat)


def test_one_trace_per_function_for_every_batch_size_and_column_count(problem):
    """Batches of 10, 10 and 3 samples, single vectors and blocks of 2, 3, 5 and n columns:
    one trace for single vectors, one for blocks, one loss and one gradient function."""
    H = stf.hessian(problem["model"], cross_entropy(), problem["batches"])
    rng = np.random.default_rng(9)
    for k in (1, 2, 3, 5):
        H @ tf.constant(rng.normal(size=(H.shape[0], k)))
        H @ tf.constant(rng.normal(size=H.shape[0]))
    dense(H)
    H.gradient()
    H.loss_at(tf.constant(0.01 * rng.normal(size=H.shape[0])))
    adapter = H.adapter
    assert adapter.num_traces == 2
    counts = {name: getattr(adapter, name).experimental_get_tracing_count() for name in ("_hvp", "_hvp1", "_grad", "_loss")}
    assert counts == {"_hvp": 1, "_hvp1": 1, "_grad": 1, "_loss": 1}


@pytest.mark.parametrize("engine", ["double_backward", "forward_over_reverse"])
def test_engines_match_dense_hessian(problem, engine):
    H = stf.hessian(problem["model"], cross_entropy(), problem["batches"], engine=engine, chunk_size=2)
    assert H.engine == engine
    truth = problem["H_mean"]
    V = np.random.default_rng(10).normal(size=(H.shape[0], 5))  # three chunks of forward_over_reverse
    assert rel(H @ tf.constant(V), truth @ V) < RTOL
    assert rel(H @ tf.constant(V[:, 1]), truth @ V[:, 1]) < RTOL
    assert H.adapter.num_traces == 2


def test_static_batch_size_is_traced_per_shape(problem):
    """A loss that needs a static batch size cannot be traced with an unknown one: traced per shape."""
    model = problem["model"]

    def loss_fn(model, batch):
        x, y = batch
        per_sample = cross_entropy(None)(y, model(tf.reshape(x, (x.shape[0], 5))))
        return tf.reduce_sum(per_sample) / x.shape[0]

    H = stf.hessian(model, loss_fn, problem["batches"])
    assert rel(dense(H), problem["H_mean"]) < RTOL
    traced = H.adapter.num_traces
    v = np.random.default_rng(11).normal(size=H.shape[0])
    assert rel(H @ tf.constant(v), problem["H_mean"] @ v) < RTOL
    dense(H)
    assert H.adapter.num_traces == traced
    assert H.adapter._hvp.experimental_get_tracing_count() == 2  # the 10- and the 3-sample batch


def test_unknown_engine(problem):
    with pytest.raises(ValueError, match="engine must be one of"):
        stf.hessian(problem["model"], cross_entropy(), problem["batches"], engine="jvp")


def test_subsets_are_dense_blocks(problem):
    H = problem["H"]
    sl = slice(H.param_blocks["sequential/out/kernel"].start, H.shape[0])
    B = H.restrict("sequential/out/*")
    assert list(B.param_blocks) == ["sequential/out/kernel", "sequential/out/bias"]
    assert rel(dense(B), problem["H_mean"][sl, sl]) < RTOL
    by_layer = stf.hessian(problem["model"], cross_entropy(), problem["batches"],
                           wrt=problem["model"].get_layer("out"), check_deterministic=False)
    assert list(by_layer.param_blocks) == list(B.param_blocks)
    v = np.random.default_rng(8).normal(size=by_layer.shape[0])
    assert rel(by_layer @ tf.constant(v), problem["H_mean"][sl, sl] @ v) < RTOL


def test_loss_at_and_gradient_leave_variables_unchanged(problem):
    H = problem["H"]
    before = [v.numpy().copy() for v in problem["model"].trainable_variables]
    assert abs(H.loss_at() - problem["loss"]) < 1e-12
    assert rel(H.gradient(), problem["grad"]) < RTOL
    delta = 0.01 * np.random.default_rng(3).normal(size=H.shape[0])
    shifted = [tf.Variable(v + d.reshape(v.shape)) for v, d in
               zip(before, np.split(delta, np.cumsum([b.size for b in before])[:-1]))]
    moved = keras.models.clone_model(problem["model"])
    moved.set_weights([s.numpy() for s in shifted])
    assert abs(H.loss_at(tf.constant(delta)) - float(cross_entropy()(problem["Y"], moved(problem["X"])))) < 1e-12
    after = [v.numpy() for v in problem["model"].trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_plain_callable_over_variables_with_dict_batches():
    rng = np.random.default_rng(4)
    w = tf.Variable(rng.normal(size=(3,)))
    c = tf.Variable(0.5, dtype=tf.float64)
    X, y = rng.normal(size=(12, 3)), rng.normal(size=12)

    def loss_fn(model, batch):
        tf.debugging.assert_less(c, tf.constant(10.0, tf.float64), message="c stays small")
        r = tf.tanh(tf.linalg.matvec(batch["x"], w)) * c - batch["y"]
        return tf.reduce_mean(r ** 2)

    data = [{"x": X[:6], "y": y[:6]}, {"x": X[6:], "y": y[6:]}]
    H = stf.hessian(None, loss_fn, data, wrt=[w, c])
    assert list(H.param_blocks) == ["Variable", "Variable_1"]
    truth, _, _ = dense_hessian(lambda: loss_fn(None, {"x": X, "y": y}), [w, c])
    assert rel(dense(H), truth) < RTOL

    before = w.numpy().copy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="c stays small"):
        H.loss_at(tf.constant([0.0, 0.0, 0.0, 1e3], dtype=tf.float64))
    assert np.array_equal(w.numpy(), before) and float(c.numpy()) == 0.5  # restored after the error


def test_small_cnn_matches_dense_hessian():
    rng = np.random.default_rng(5)
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((6, 6, 1), dtype=F64),
        keras.layers.Conv2D(2, 3, activation="tanh", dtype=F64),
        keras.layers.Flatten(dtype=F64),
        keras.layers.Dense(3, dtype=F64),
    ])
    X, Y = rng.normal(size=(12, 6, 6, 1)), rng.integers(0, 3, size=12)
    H = stf.hessian(model, cross_entropy(), [(X[:6], Y[:6]), (X[6:], Y[6:])], chunk_size=128)
    truth, _, _ = dense_hessian(lambda: cross_entropy()(Y, model(X)), model.trainable_variables)
    assert rel(dense(H), truth) < RTOL


# --- bad input ----------------------------------------------------------------------
def test_loss_that_is_not_a_scalar(problem):
    per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)
    with pytest.raises(ValueError, match=r"must return a scalar, got shape \(10,\)"):
        stf.hessian(problem["model"], per_sample, problem["batches"])


def test_variables_not_used_by_the_loss(problem):
    stray = tf.Variable(np.ones(2), name="stray")
    with pytest.raises(ValueError, match="does not depend on the variables 'stray'.*wrt="):
        stf.hessian(problem["model"], cross_entropy(), problem["batches"],
                    wrt=list(problem["model"].trainable_variables) + [stray])


def test_integer_variables_and_lower_precision_loss(problem):
    step = tf.Variable(3, name="step")
    with pytest.raises(TypeError, match="'step' \\(int32\\).*wrt="):
        stf.hessian(problem["model"], cross_entropy(), problem["batches"], wrt=[step])
    loss32 = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # float32 by default
    with pytest.raises(TypeError, match="loss is float32 but the variables are float64.*dtype='float64'"):
        stf.hessian(problem["model"], loss32, problem["batches"])


def test_non_finite_loss_names_the_batch(problem):
    X = problem["X"].copy()
    X[15, 2] = np.nan
    Y = problem["Y"]
    with pytest.raises(specops.NonFiniteError, match="batch 1"):
        stf.hessian(problem["model"], cross_entropy(), [(X[:10], Y[:10]), (X[10:], Y[10:])])


def test_dropout_in_training_mode_is_reported(problem):
    dropout = keras.layers.Dropout(0.5, dtype=F64)

    def loss_fn(model, batch):
        x, y = batch
        return cross_entropy()(y, model(dropout(x, training=True)))

    with pytest.raises(specops.NonDeterministicError, match="training=True"):
        stf.hessian(problem["model"], loss_fn, problem["batches"])


# --- vector operations and dense matrices -------------------------------------------
def test_dense_tf_matrix_operator():
    rng = np.random.default_rng(7)
    M = rng.normal(size=(6, 6))
    A = specops.aslinearoperator(tf.constant(M + M.T))
    assert A.backend == "tensorflow" and A.dtype == np.float64
    v = rng.normal(size=6)
    out = A @ tf.constant(v)
    assert isinstance(out, tf.Tensor) and rel(out, (M + M.T) @ v) < 1e-14
    with pytest.raises(ValueError, match="not symmetric"):
        specops.aslinearoperator(tf.constant(M))
    with pytest.raises(ValueError, match="square"):
        specops.aslinearoperator(tf.ones((2, 3)))


def finite_difference_hessian(loss, variables, h=1e-5):
    """Central differences of the tape gradient, column by column: no second-order autodiff."""
    theta = np.concatenate([v.numpy().ravel() for v in variables])

    def grad_at(t):
        offset = 0
        for v in variables:
            v.assign(t[offset:offset + v.shape.num_elements()].reshape(v.shape))
            offset += v.shape.num_elements()
        with tf.GradientTape() as tape:
            value = loss()
        return np.concatenate([g.numpy().ravel() for g in tape.gradient(value, variables)])

    cols = [(grad_at(theta + h * e) - grad_at(theta - h * e)) / (2 * h) for e in np.eye(theta.size)]
    grad_at(theta)
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("norm", ["layer", "group", "batch_training"])
@pytest.mark.parametrize("engine", ["double_backward", "forward_over_reverse"])
def test_normalization_layers_match_finite_differences(norm, engine):
    """Keras' LayerNormalization, GroupNormalization and BatchNormalization in training mode take
    their statistics from ``tf.nn.moments``, whose ``stop_gradient`` makes TensorFlow's own second
    derivatives wrong (the dense tape Hessian too); specops' products must match central
    differences of the gradient instead."""
    rng = np.random.default_rng(1)
    layer = {"layer": keras.layers.LayerNormalization(dtype=F64),
             "group": keras.layers.GroupNormalization(groups=2, dtype=F64),
             "batch_training": keras.layers.BatchNormalization(dtype=F64)}[norm]
    net = keras.Sequential([keras.Input((5,), dtype=F64), keras.layers.Dense(4, dtype=F64), layer,
                            keras.layers.Dense(3, dtype=F64)])
    X, Y = rng.normal(size=(6, 5)), rng.integers(0, 3, size=6)
    training = norm == "batch_training"

    def loss_fn(model, batch):
        return cross_entropy()(batch[1], model(batch[0], training=training))

    truth = finite_difference_hessian(lambda: loss_fn(net, (X, Y)), net.trainable_variables)
    H = stf.hessian(net, loss_fn, [(X, Y)], engine=engine, check_deterministic=False,
                    random_layers="fixed" if training else "error")
    V = rng.normal(size=(H.shape[0], 3))
    assert rel(H @ V, truth @ V) < 1e-7
    assert H.adapter.cross_check_error < 1e-7  # the construction's own check against central differences
    if norm != "batch_training":  # what TensorFlow's own tape gives: the defect exposed
        wrong, _, _ = dense_hessian(lambda: loss_fn(net, (X, Y)), net.trainable_variables)
        assert rel(wrong @ V, truth @ V) > 1e-3


def test_a_wrong_second_derivative_is_reported_at_construction(monkeypatch):
    """Without specops' replacement of tf.nn.moments, TensorFlow's products of a LayerNormalization
    model are wrong; the construction's central-difference check says so (and is silent with it)."""
    import contextlib

    rng = np.random.default_rng(2)
    model = keras.Sequential([keras.Input((5,), dtype=F64), keras.layers.Dense(4, dtype=F64),
                              keras.layers.LayerNormalization(dtype=F64), keras.layers.Dense(3, dtype=F64)])
    data = [(rng.normal(size=(6, 5)), rng.integers(0, 3, size=6))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert stf.hessian(model, cross_entropy(), data).adapter.cross_check_error < 1e-7
    monkeypatch.setattr(stf.formulas, "_twice_differentiable", contextlib.nullcontext)
    specops.checks.VERDICTS.clear()  # the verdict of the build above would carry over to this model
    with pytest.warns(RuntimeWarning, match="differ from central differences of gradients"):
        H = stf.hessian(model, cross_entropy(), data)
    assert H.adapter.cross_check_error > 1e-3
    assert H.engine == "finite_difference" and H.engine_check.verdict == "wrong"
    with pytest.raises(ValueError, match="engine='finite_difference'"):
        stf.hessian(model, cross_entropy(), data, engine="double_backward")
    assert stf.hessian(model, cross_entropy(), data, cross_check=False).adapter.cross_check_error is None


def test_keras_non_trainable_state_is_never_differentiated():
    """Batch-norm moving statistics and a frozen layer are left out; the rest matches the dense
    Hessian with respect to the trainable variables, and finite differences agree with it."""
    rng = np.random.default_rng(5)
    frozen = keras.layers.Dense(4, dtype=F64, name="frozen")
    model = keras.Sequential([keras.Input((5,), dtype=F64), frozen, keras.layers.BatchNormalization(dtype=F64),
                              keras.layers.Dense(3, activation="tanh", dtype=F64), keras.layers.Dense(3, dtype=F64)])
    frozen.trainable = False
    X, y = rng.normal(size=(8, 5)), rng.integers(0, 3, size=8)
    H = stf.hessian(model, cross_entropy(), (X, y))
    assert not any("frozen" in n or "moving" in n for n in H.param_blocks)
    assert H.num_params == sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 4 + 4 + 4 * 3 + 3 + 3 * 3 + 3
    truth, _, _ = dense_hessian(lambda: cross_entropy()(y, model(X)), model.trainable_variables)
    assert rel(H.to_dense(), truth) < RTOL and H.engine_check.verdict == "agree"
    F = stf.hessian(model, cross_entropy(), (X, y), engine="finite_difference")
    assert F.engine == "finite_difference" and rel(F.to_dense(), truth) < 1e-6
