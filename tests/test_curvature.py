"""Gauss-Newton and Fisher operators of every backend against dense constructions.

Truth is built independently of the products: the explicit Jacobian of the outputs and
the explicit Hessian of the loss with respect to them on the concatenated full batch
(``J^T H_out J``), and the explicit per-sample gradients (``G^T G / N`` for a mean,
``G^T G`` for a sum), in float64, on a small MLP and a small CNN, with uneven batches.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import specops  # noqa: E402
from specops.backends import jax as sj  # noqa: E402
from specops.backends import torch as st  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def dense(A):
    return A.to_dense(chunk_size=A.shape[0])


def assemble(J, H_out, per_sample_grads, H, reduction):
    """``(GGN, empirical Fisher, Hessian)`` from the explicit pieces on the full batch:
    the Jacobian of the outputs (entries x n), the loss Hessian in the outputs, the
    per-sample gradients (N x n) and the parameter Hessian."""
    G = np.asarray(per_sample_grads)
    J = np.asarray(J).reshape(-1, G.shape[1])
    scale = G.shape[0] if reduction == "mean" else 1
    return J.T @ np.asarray(H_out) @ J, G.T @ G / scale, np.asarray(H)


# --- PyTorch ------------------------------------------------------------------------------
def torch_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def torch_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


def torch_batches(model_kind, task, sizes=(7, 4)):
    g = torch.Generator().manual_seed(2)
    shape = (5,) if model_kind == "mlp" else (1, 6, 6)
    batches = []
    for s in sizes:
        x = torch.randn(s, *shape, generator=g, dtype=torch.float64)
        y = (torch.randint(0, 3, (s,), generator=g) if task == "classification"
             else torch.randn(s, 3, generator=g, dtype=torch.float64))
        batches.append((x, y))
    return batches


def torch_truth(model, loss_fn, batches, reduction):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])

    def f(t, x):
        pieces = dict(zip(names, (p.view(s) for p, s in zip(t.split([int(np.prod(s)) for s in shapes]), shapes))))
        return torch.func.functional_call(model, pieces, (x,))

    out = f(theta, X).detach()
    J = torch.autograd.functional.jacobian(lambda t: f(t, X), theta)
    H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.view(out.shape), Y), out.reshape(-1))
    G = torch.stack([torch.func.grad(lambda t: loss_fn(f(t, X[i:i + 1]), Y[i:i + 1]))(theta)
                     for i in range(len(X))])
    H = torch.autograd.functional.hessian(lambda t: loss_fn(f(t, X), Y), theta)
    return assemble(J, H_out, G, H, reduction)


TORCH_LOSSES = {
    ("classification", "mean"): nn.CrossEntropyLoss(),
    ("classification", "sum"): nn.CrossEntropyLoss(reduction="sum"),
    ("regression", "mean"): nn.MSELoss(),
    ("regression", "sum"): nn.MSELoss(reduction="sum"),
}


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_ggn_and_empirical_fisher_match_dense_constructions(model_kind, task, reduction):
    model = torch_mlp() if model_kind == "mlp" else torch_cnn()
    loss_fn = TORCH_LOSSES[task, reduction]
    batches = torch_batches(model_kind, task)
    G_true, EF_true, _ = torch_truth(model, loss_fn, batches, reduction)
    G = st.ggn(model, loss_fn, batches, reduction=reduction)
    assert "closed form" in G.engine
    assert rel(dense(G), G_true) < 1e-10
    # the same loss hidden in a lambda: the output Hessian by autodiff
    G_auto = st.ggn(model, lambda o, y: loss_fn(o, y), batches, reduction=reduction)
    assert "autodiff" in G_auto.engine
    assert rel(dense(G_auto), G_true) < 1e-10
    EF = st.fisher(model, loss_fn, batches, reduction=reduction)
    assert rel(dense(EF), EF_true) < 1e-10


def test_torch_ggn_is_psd_and_the_residual_is_an_operator_for_every_algorithm():
    model, loss_fn = torch_mlp(), nn.CrossEntropyLoss()
    batches = torch_batches("mlp", "classification")
    G_true, _, H_true = torch_truth(model, loss_fn, batches, "mean")
    G = st.ggn(model, loss_fn, batches)
    H = st.hessian(model, loss_fn, batches)
    R = H - G
    assert rel(dense(R), H_true - G_true) < 1e-10
    eig = specops.eigsh(G, k=3, which="BE", seed=0)
    truth = np.linalg.eigvalsh(G_true)
    assert truth[0] > -1e-12  # PSD: cross-entropy is convex in the logits
    assert np.allclose(np.sort(eig.eigenvalues), np.sort(np.r_[truth[:1], truth[-2:]]), atol=1e-8)
    n = G.shape[0]
    t = specops.trace(R, method="xtrace", max_matvecs=2 * n + 2, seed=0)  # n probes: exact
    assert abs(t.estimate - np.trace(H_true - G_true)) < 1e-8 * max(1.0, abs(np.trace(H_true)))
    d = specops.diagonal(G, max_matvecs=400, seed=0)
    assert rel(d.estimate, np.diag(G_true)) < 0.5  # Hutchinson on a dense 57x57 matrix: rough
    density = specops.spectral_density(G, num_probes=2, num_steps=20, seed=0)
    assert density.nodes.max() <= truth[-1] + 1e-8 and density.nodes.min() >= truth[0] - 1e-8
    land = specops.landscape(G, "eigen-1d", eig=eig, span=0.1, steps=3)
    assert abs(land.center_loss - H.loss_at()) < 1e-12 and land.losses.shape == (3,)


def test_torch_block_restriction_and_wrt_give_the_dense_subblock():
    model, loss_fn = torch_mlp(), nn.CrossEntropyLoss()
    batches = torch_batches("mlp", "classification")
    G_true, EF_true, _ = torch_truth(model, loss_fn, batches, "mean")
    blocks = st.ggn(model, loss_fn, batches).param_blocks
    sl = blocks["2.weight"]
    sub = st.ggn(model, loss_fn, batches).restrict("2.weight")
    assert rel(dense(sub), G_true[sl, sl]) < 1e-10
    EF = st.fisher(model, loss_fn, batches, wrt=["2.*"])
    idx = np.r_[blocks["2.weight"], blocks["2.bias"]]
    assert rel(dense(EF), EF_true[np.ix_(idx, idx)]) < 1e-10


def test_torch_blocks_of_columns_agree_with_single_columns():
    """Blocks go through torch.func.vmap, single columns through one forward-mode pass."""
    model, batches = torch_mlp(), torch_batches("mlp", "classification")
    V = torch.randn(57, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ops = {kind: st.fisher(model, nn.CrossEntropyLoss(), batches, estimator=kind, num_samples=2)
           for kind in ("empirical", "mc")}
    ops["ggn"] = st.ggn(model, lambda o, y: F.cross_entropy(o, y), batches)  # autodiff output Hessian
    for kind, A in ops.items():
        assert rel(A @ V, torch.stack([A @ V[:, j] for j in range(5)], dim=1)) < 1e-12, kind


def mc_average(make, seeds):
    mats = np.stack([dense(make(s)) for s in seeds])
    return mats.mean(0), mats.std(0, ddof=1) / np.sqrt(len(seeds))


def test_torch_mc_fisher_averaged_over_seeds_approaches_the_ggn():
    model, loss_fn = torch_mlp(), nn.CrossEntropyLoss()
    batches = torch_batches("mlp", "classification")
    G_true = torch_truth(model, loss_fn, batches, "mean")[0]
    mean, stderr = mc_average(lambda s: st.fisher(model, loss_fn, batches, estimator="mc", num_samples=40, seed=s,
                                                   check_deterministic=False), range(16))
    z = np.abs(mean - G_true) / (stderr + 1e-14 * np.abs(G_true).max())
    assert np.mean(z < 3) > 0.95 and rel(mean, G_true) < 0.05
    one = dense(st.fisher(model, loss_fn, batches, estimator="mc", seed=0, num_samples=1))
    assert rel(one, G_true) > 3 * rel(mean, G_true)  # one sample is a much worse estimate
    assert np.array_equal(one, dense(st.fisher(model, loss_fn, batches, estimator="mc", seed=0)))  # seeded


def test_torch_mc_fisher_for_squared_error_approaches_the_ggn():
    model, loss_fn = torch_mlp(), nn.MSELoss()
    batches = torch_batches("mlp", "regression")
    G_true = torch_truth(model, loss_fn, batches, "mean")[0]
    mean, _ = mc_average(lambda s: st.fisher(model, loss_fn, batches, estimator="mc", num_samples=120, seed=s,
                                             check_deterministic=False), range(8))
    assert rel(mean, G_true) < 0.05


def test_torch_bad_input_says_what_to_pass():
    model = torch_mlp()
    batches = torch_batches("mlp", "classification")
    with pytest.raises(ValueError, match="nn.CrossEntropyLoss"):
        st.fisher(model, lambda o, y: F.cross_entropy(o, y), batches, estimator="mc")
    with pytest.raises(ValueError, match=r"loss_fn\(outputs, targets\)"):
        st.ggn(model, lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]), batches)
    with pytest.raises(ValueError, match="unknown estimator .true.; choose one of: empirical, mc"):
        st.fisher(model, nn.CrossEntropyLoss(), batches, estimator="true")
    with pytest.raises(ValueError, match="num_samples"):
        st.fisher(model, nn.CrossEntropyLoss(), batches, estimator="mc", num_samples=0)


# --- JAX ----------------------------------------------------------------------------------
optax = pytest.importorskip("optax")


def jax_problem(model_kind, task, sizes=(7, 4)):
    rng = np.random.default_rng(3)
    if model_kind == "mlp":
        params = {"w1": rng.normal(size=(5, 6)), "b1": 0.1 * rng.normal(size=6), "w2": rng.normal(size=(6, 3)),
                  "b2": 0.1 * rng.normal(size=3)}

        def apply(p, x):
            return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

        shape = (5,)
    else:
        params = {"k": rng.normal(size=(2, 1, 3, 3)), "c": 0.1 * rng.normal(size=2),
                  "w": 0.3 * rng.normal(size=(32, 3)), "b": 0.1 * rng.normal(size=3)}

        def apply(p, x):
            h = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "VALID") + p["c"][None, :, None, None]
            return jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"] + p["b"]

        shape = (1, 6, 6)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    batches = []
    for s in sizes:
        x = jnp.asarray(rng.normal(size=(s, *shape)))
        y = jnp.asarray(rng.integers(0, 3, s)) if task == "classification" else jnp.asarray(rng.normal(size=(s, 3)))
        batches.append((x, y))
    return params, apply, batches


def jax_truth(params, apply, loss_fn, batches, reduction):
    from jax.flatten_util import ravel_pytree

    theta, unravel = ravel_pytree(params)
    X = jnp.concatenate([b[0] for b in batches])
    Y = jnp.concatenate([b[1] for b in batches])

    def full(o, y):
        per = jnp.sum(jnp.reshape(loss_fn(o, y), (o.shape[0], -1)), axis=1)
        return jnp.mean(per) if reduction == "mean" else jnp.sum(per)

    out = apply(params, X)
    J = jax.jit(jax.jacfwd(lambda t: apply(unravel(t), X)))(theta)
    H_out = jax.jit(jax.hessian(lambda o: full(o.reshape(out.shape), Y)))(out.reshape(-1))
    G = jax.jit(jax.vmap(jax.grad(lambda t, x, y: full(apply(unravel(t), x[None]), y[None])),
                         in_axes=(None, 0, 0)))(theta, X, Y)
    H = jax.jit(jax.hessian(lambda t: full(apply(unravel(t), X), Y)))(theta)
    return assemble(J, H_out, G, H, reduction)


JAX_LOSSES = {"classification": optax.softmax_cross_entropy_with_integer_labels,
              "regression": optax.squared_error}


@pytest.mark.parametrize("model_kind,task,reduction", [
    ("mlp", "classification", "mean"), ("mlp", "regression", "sum"), ("cnn", "classification", "sum"),
    ("cnn", "regression", "mean")])
def test_jax_ggn_and_empirical_fisher_match_dense_constructions(model_kind, task, reduction):
    # each operator compiles once per batch shape: the CNN gets two equal batches
    params, apply, batches = jax_problem(model_kind, task, sizes=(7, 4) if model_kind == "mlp" else (5, 5))
    loss_fn = JAX_LOSSES[task]
    G_true, EF_true, H_true = jax_truth(params, apply, loss_fn, batches, reduction)
    kw = {"reduction": reduction, "chunk_size": 64, "check_deterministic": False}
    G = sj.ggn(apply, loss_fn, params, batches, **kw)
    assert "closed form" in G.engine
    assert rel(dense(G), G_true) < 1e-10
    EF = sj.fisher(apply, loss_fn, params, batches, **kw)
    assert rel(dense(EF), EF_true) < 1e-10
    if model_kind == "mlp":
        scalar = (lambda o, y: loss_fn(o, y).reshape(o.shape[0], -1).sum(1).mean()) if reduction == "mean" else \
            (lambda o, y: loss_fn(o, y).sum())
        G_auto = sj.ggn(apply, scalar, params, batches, **kw)
        assert "autodiff" in G_auto.engine and rel(dense(G_auto), G_true) < 1e-10
        H = sj.hessian(lambda p, b: scalar(apply(p, b[0]), b[1]), params, batches, **kw)
        assert rel(dense(H - G), H_true - G_true) < 1e-10


def test_jax_mc_fisher_averaged_over_seeds_approaches_the_ggn_and_bad_input():
    params, apply, batches = jax_problem("mlp", "classification")
    loss_fn = JAX_LOSSES["classification"]
    G_true = jax_truth(params, apply, loss_fn, batches, "mean")[0]
    # each operator compiles its own program: few seeds with many samples each
    mean, _ = mc_average(lambda s: sj.fisher(apply, loss_fn, params, batches, estimator="mc", num_samples=300,
                                             seed=s, check_deterministic=False, chunk_size=64), range(2))
    assert rel(mean, G_true) < 0.05
    with pytest.raises(ValueError, match="optax.softmax_cross_entropy_with_integer_labels"):
        sj.fisher(apply, lambda o, y: loss_fn(o, y).mean(), params, batches, estimator="mc")
    with pytest.raises(ValueError, match="unknown estimator 'true'; choose one of: empirical, mc"):
        sj.fisher(apply, loss_fn, params, batches, estimator="true")
    with pytest.raises(ValueError, match="outputs alone"):
        sj.ggn(apply, lambda params, batch: 0.0, params, batches)


# --- TensorFlow / Keras -------------------------------------------------------------------
def keras_models():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    return tf, keras


def keras_problem(model_kind, task, sizes=(7, 4)):
    tf, keras = keras_models()
    keras.utils.set_random_seed(4)
    f64 = "float64"
    if model_kind == "mlp":
        layers = [keras.Input((5,), dtype=f64), keras.layers.Dense(6, activation="tanh", dtype=f64),
                  keras.layers.Dense(3, dtype=f64)]
        shape = (5,)
    else:
        layers = [keras.Input((6, 6, 1), dtype=f64), keras.layers.Conv2D(2, 3, activation="tanh", dtype=f64),
                  keras.layers.Flatten(dtype=f64), keras.layers.Dense(3, dtype=f64)]
        shape = (6, 6, 1)
    model = keras.Sequential(layers)
    rng = np.random.default_rng(5)
    batches = [(rng.normal(size=(s, *shape)),
                rng.integers(0, 3, s) if task == "classification" else rng.normal(size=(s, 3))) for s in sizes]
    return model, batches


def keras_truth(model, loss_fn, batches, reduction):
    tf, _ = keras_models()
    variables = model.trainable_variables
    X = np.concatenate([b[0] for b in batches])
    Y = np.concatenate([b[1] for b in batches])
    def flat_grad(value_fn):
        with tf.GradientTape() as tape:
            value = value_fn()
        return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(value, variables)], 0)

    def jac():
        with tf.GradientTape() as tape:
            out = model(X)
        return np.concatenate([np.reshape(j, (int(np.prod(out.shape)), -1))
                               for j in tape.jacobian(out, variables)], 1)

    def hess_out(out):
        out = tf.constant(out)
        with tf.GradientTape() as outer:
            outer.watch(out)
            with tf.GradientTape() as inner:
                inner.watch(out)
                value = loss_fn(Y, out)
            g = tf.reshape(inner.gradient(value, out), [-1])
        return np.reshape(outer.jacobian(g, out), (g.shape[0], -1))

    def hess_params():
        with tf.GradientTape() as outer:
            g = flat_grad(lambda: loss_fn(Y, model(X)))
        return np.concatenate([np.reshape(j, (g.shape[0], -1)) for j in outer.jacobian(g, variables)], 1)

    G = np.stack([flat_grad(lambda i=i: loss_fn(Y[i:i + 1], model(X[i:i + 1]))).numpy() for i in range(len(X))])
    return assemble(jac(), hess_out(model(X).numpy()), G, hess_params(), reduction)


def keras_loss(task, reduction):
    _, keras = keras_models()
    red = "sum_over_batch_size" if reduction == "mean" else "sum"
    if task == "classification":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=red, dtype="float64")
    return keras.losses.MeanSquaredError(reduction=red, dtype="float64")


@pytest.mark.parametrize("model_kind,task,reduction", [
    ("mlp", "classification", "mean"), ("mlp", "regression", "sum"), ("cnn", "classification", "sum"),
    ("cnn", "regression", "mean")])
def test_keras_ggn_and_empirical_fisher_match_dense_constructions(model_kind, task, reduction):
    stf = pytest.importorskip("specops.backends.tensorflow")
    model, batches = keras_problem(model_kind, task, sizes=(7, 4) if model_kind == "mlp" else (5, 5))
    loss_fn = keras_loss(task, reduction)
    G_true, EF_true, H_true = keras_truth(model, loss_fn, batches, reduction)
    kw = {"reduction": reduction, "chunk_size": 256, "check_deterministic": False}
    G = stf.ggn(model, loss_fn, batches, **kw)
    assert rel(dense(G), G_true) < 1e-10
    EF = stf.fisher(model, loss_fn, batches, **kw)
    assert rel(dense(EF), EF_true) < 1e-10
    if (model_kind, task) == ("mlp", "classification"):
        H = stf.hessian(model, loss_fn, batches, **kw)
        assert rel(dense(H - G), H_true - G_true) < 1e-10
        assert np.linalg.eigvalsh(G_true)[0] > -1e-12
        assert (G.positive_semidefinite, EF.positive_semidefinite, H.positive_semidefinite) == (True, True, False)
        check_solves(G, H, G_true, H_true, np.random.default_rng(4).standard_normal(G.shape[0]), "float64")


def test_keras_bad_input_says_what_to_pass():
    stf = pytest.importorskip("specops.backends.tensorflow")
    tf, _ = keras_models()
    model, batches = keras_problem("mlp", "classification")
    with pytest.raises(ValueError, match="SparseCategoricalCrossentropy"):
        stf.fisher(model, lambda y, o: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, o)),
                   batches, estimator="mc")
    with pytest.raises(ValueError, match="outputs alone"):
        stf.ggn(model, lambda model, batch: tf.reduce_sum(model(batch[0])), batches)


# --- the same weights in three frameworks -------------------------------------------------
def test_three_frameworks_agree_on_the_same_weights():
    """GGN, empirical and Monte-Carlo Fisher (same seed: the same sampled labels) of one MLP."""
    stf = pytest.importorskip("specops.backends.tensorflow")
    tf, keras = keras_models()
    model = torch_mlp()
    batches = torch_batches("mlp", "classification")
    W1, b1, W2, b2 = (p.detach().numpy() for p in model.parameters())
    n1, n2 = W1.size + b1.size, W2.size
    # coordinates of the torch order [W1 (out, in), b1, W2, b2] in the other frameworks' orders
    idx = np.arange(W1.size + b1.size + W2.size + b2.size)
    iW1, ib1, iW2, ib2 = idx[:W1.size].reshape(W1.shape), idx[W1.size:n1], \
        idx[n1:n1 + n2].reshape(W2.shape), idx[n1 + n2:]
    jax_order = np.r_[ib1, ib2, iW1.T.ravel(), iW2.T.ravel()]  # sorted keys b1, b2, w1, w2; kernels (in, out)
    keras_order = np.r_[iW1.T.ravel(), ib1, iW2.T.ravel(), ib2]
    params = {"w1": jnp.asarray(W1.T), "b1": jnp.asarray(b1), "w2": jnp.asarray(W2.T), "b2": jnp.asarray(b2)}

    def apply(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    jb = [(jnp.asarray(x.numpy()), jnp.asarray(y.numpy())) for x, y in batches]
    kb = [(x.numpy(), y.numpy()) for x, y in batches]
    keras.utils.set_random_seed(0)
    km = keras.Sequential([keras.Input((5,), dtype="float64"), keras.layers.Dense(6, activation="tanh", dtype="float64"),
                           keras.layers.Dense(3, dtype="float64")])
    for v, value in zip(km.trainable_variables, [W1.T, b1, W2.T, b2]):
        v.assign(value)
    kloss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    ce = optax.softmax_cross_entropy_with_integer_labels
    for kind in ("ggn", "empirical", "mc"):
        if kind == "ggn":
            t = dense(st.ggn(model, nn.CrossEntropyLoss(), batches))
            j = dense(sj.ggn(apply, ce, params, jb, chunk_size=64))
            k = dense(stf.ggn(km, kloss, kb, chunk_size=64))
        else:
            t = dense(st.fisher(model, nn.CrossEntropyLoss(), batches, estimator=kind, num_samples=3, seed=7))
            j = dense(sj.fisher(apply, ce, params, jb, estimator=kind, num_samples=3, seed=7, chunk_size=64))
            k = dense(stf.fisher(km, kloss, kb, estimator=kind, num_samples=3, seed=7, chunk_size=64))
        inv_j, inv_k = np.argsort(jax_order), np.argsort(keras_order)
        assert rel(j[np.ix_(inv_j, inv_j)], t) < 1e-10, kind
        assert rel(k[np.ix_(inv_k, inv_k)], t) < 1e-10, kind


# --- specops analyze --curvature ----------------------------------------------------------
def cli_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()


def cli_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return [(X[:40] / 16.0, y[:40]), (X[40:70] / 16.0, y[40:70])]


def test_analyze_curvature_hessian_ggn_side_by_side(tmp_path, capsys):
    import json

    from specops import cli

    out = str(tmp_path / "out")
    args = ["analyze", "--model", "test_curvature:cli_model", "--data", "test_curvature:cli_data",
            "--curvature", "hessian,ggn", "--stages", "eigen,esd,curvature", "--top-k", "2", "--eig-tol", "1e-6",
            "--eig-matvecs", "300", "--esd-probes", "2", "--esd-steps", "12", "--trace-matvecs", "200",
            "--no-progress", "--out", out]
    assert cli.main(args) == 0
    with open(os.path.join(out, "results.json")) as fh:
        r = json.load(fh)["stages"]["curvature"]["result"]

    def values(x):
        return np.asarray(x["__ndarray__"] if isinstance(x, dict) else x, dtype=float)

    model, data = cli_model(), [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in cli_data()]
    G = dense(st.ggn(model, nn.CrossEntropyLoss(), data))
    H = dense(st.hessian(model, nn.CrossEntropyLoss(), data))
    for name, M in (("hessian", H), ("ggn", G)):
        top = np.sort(np.linalg.eigvalsh(M))[::-1][:2]
        assert np.allclose(np.sort(values(r["operators"][name]["eigen"]["eigenvalues"]))[::-1], top, rtol=1e-5)
    t = r["residual_trace"]
    assert 0 < t["stderr"] and abs(t["estimate"] - np.trace(H - G)) <= 4 * t["stderr"]
    assert os.path.getsize(os.path.join(out, "curvature.png")) > 0
    with open(os.path.join(out, "summary.md")) as fh:
        summary = fh.read()
    assert "[ggn] top eigenvalues" in summary and "trace(H - G)" in summary and "curvature.png" in summary
    capsys.readouterr()
    assert cli.main(["analyze", "--curvature", "hessian,gauss", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown operator 'gauss'" in capsys.readouterr().err
    assert cli.main(["analyze", "--backend", "jax", "--curvature", "ggn", "--out", str(tmp_path / "bad")]) == 2
    assert "specops.backends.jax.ggn" in capsys.readouterr().err


def cli_regression_data():
    X, _ = cli_data()[0]
    Y = np.random.default_rng(5).standard_normal((X.shape[0], 10))
    return [(X[:25], Y[:25]), (X[25:], Y[25:])]


def test_analyze_fisher_datum_term_scales_the_mse_fisher_by_the_outputs(tmp_path, capsys):
    """MSE with "mean" over C = 10 outputs: a loss term's weight is 1/(N C), a sample's 1/N."""
    import json

    from specops import cli

    out = str(tmp_path / "out")
    base = ["analyze", "--model", "test_curvature:cli_model", "--data", "test_curvature:cli_regression_data",
            "--loss", "mse", "--stages", "curvature", "--top-k", "2", "--eig-tol", "1e-8", "--eig-matvecs", "300",
            "--esd-probes", "1", "--esd-steps", "4", "--no-progress"]
    assert cli.main([*base, "--curvature", "empirical_fisher", "--fisher-datum", "term", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as fh:
        stage = json.load(fh)["stages"]["curvature"]
    top = stage["result"]["operators"]["empirical_fisher"]["eigen"]["eigenvalues"]
    top = np.asarray(top["__ndarray__"] if isinstance(top, dict) else top, dtype=float)
    model = cli_model()
    data = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in cli_regression_data()]
    EF_sample = torch_truth(model, nn.MSELoss(), data, "mean")[1]  # per-sample gradients, G^T G / N
    truth = np.sort(np.linalg.eigvalsh(10 * EF_sample))[::-1][:2]
    assert np.allclose(np.sort(top)[::-1], truth, rtol=1e-6)
    assert stage["settings"]["fisher_datum"] == "term"
    capsys.readouterr()
    assert cli.main([*base, "--curvature", "hessian,ggn", "--fisher-datum", "term", "--out",
                     str(tmp_path / "bad")]) == 2
    assert "add empirical_fisher to --curvature" in capsys.readouterr().err


# --- Definiteness: what solve(method="auto") reads ----------------------------------------
def check_solves(G, H, G_true, H_true, b, dtype_name):
    """A damped GGN is solved by CG, the Hessian by MINRES from the start; both against
    ``np.linalg.solve`` of the dense truths, within the conditioning's bound."""
    tol, eps = {"float32": (1e-5, 1.2e-7), "float64": (1e-10, 2.3e-16)}[dtype_name]
    bn, lam, I = np.asarray(b, dtype=np.float64), 0.5, np.eye(G.shape[0])
    for A, shift, M, method in ((G, lam, G_true, "cg"), (G.shift(lam), 0.0, G_true, "cg"),
                                (H, lam, H_true, "minres")):
        r = specops.solve(A, b, shift=shift, tol=tol)
        assert r.converged and r.settings["method_used"] == method, r.settings
        S = M + lam * I
        cond = np.linalg.cond(S)
        assert rel(r.x, np.linalg.solve(S, bn)) < 10 * cond * (tol + 100 * eps)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_definiteness_flags_pick_cg_for_a_damped_ggn_and_minres_for_the_hessian(dtype):
    model, loss_fn = torch_mlp(), nn.CrossEntropyLoss()
    batches = torch_batches("mlp", "classification")
    G_true, _, H_true = torch_truth(model, loss_fn, batches, "mean")
    assert np.linalg.eigvalsh(H_true)[0] < 0  # indefinite: the Hessian flag is not a formality
    tdtype = getattr(torch, dtype)
    model = model.to(tdtype)
    batches = [(x.to(tdtype), y) for x, y in batches]
    G, H = st.ggn(model, loss_fn, batches), st.hessian(model, loss_fn, batches)
    assert (G.positive_semidefinite, H.positive_semidefinite) == (True, False)
    for kind in ("empirical", "mc"):  # sums of outer products, whatever the loss
        assert st.fisher(model, loss_fn, batches, estimator=kind).positive_semidefinite is True
    assert st.fisher(model, lambda o, y: -loss_fn(o, y), batches).positive_semidefinite is True
    # autodiff of an arbitrary loss's output Hessian: convexity unknown
    assert st.ggn(model, lambda o, y: torch.sin(o).sum(), batches, reduction="sum").positive_semidefinite is None
    # blocks by name keep the flag
    assert G.restrict("0.*").positive_semidefinite is True and H.restrict("0.*").positive_semidefinite is False
    b = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(4), dtype=tdtype)
    check_solves(G, H, G_true, H_true, b, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_jax_definiteness_flags_pick_cg_for_a_damped_ggn_and_minres_for_the_hessian(dtype):
    params, apply, batches = jax_problem("mlp", "classification", sizes=(6, 6))
    loss_fn = JAX_LOSSES["classification"]
    G_true, _, H_true = jax_truth(params, apply, loss_fn, batches, "mean")
    jdtype = getattr(jnp, dtype)
    batches = [(x.astype(jdtype), y) for x, y in batches]
    kw = {"chunk_size": 64, "check_deterministic": False, "dtype": jdtype}
    G = sj.ggn(apply, loss_fn, params, batches, **kw)
    scalar = lambda o, y: loss_fn(o, y).mean()  # noqa: E731
    H = sj.hessian(lambda p, b: scalar(apply(p, b[0]), b[1]), params, batches, **kw)
    assert (G.positive_semidefinite, H.positive_semidefinite) == (True, False)
    assert sj.ggn(apply, scalar, params, batches, **kw).positive_semidefinite is None  # autodiff
    assert sj.fisher(apply, loss_fn, params, batches, **kw).positive_semidefinite is True
    b = jnp.asarray(np.random.default_rng(4).standard_normal(G.shape[0]), dtype=jdtype)
    check_solves(G, H, G_true, H_true, b, dtype)


# --- curvature_like: one core function, the adapter supplies the framework ----------------
def _keras_mlp(dtype):
    _, keras = keras_models()
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,), dtype=dtype), keras.layers.Dense(6, activation="tanh", dtype=dtype),
                              keras.layers.Dense(3, dtype=dtype)])
    rng = np.random.default_rng(5)
    batches = [(rng.normal(size=(s, 5)).astype(dtype), rng.integers(0, 3, size=s)) for s in (7, 4)]
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype), batches


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_curvature_like_equals_the_operator_built_directly(framework, dtype):
    """Each curvature from an existing operator (of any curvature) against the backend's own
    ggn/fisher on the same arguments: the same products, bit for bit; ``"hessian"`` gives the
    Hessian back, also from a GGN."""
    from specops.curvature import CURVATURES, curvature_like

    if framework == "torch":
        be = st
        model = torch_mlp().to(getattr(torch, dtype))
        batches = [(x.to(getattr(torch, dtype)), y) for x, y in torch_batches("mlp", "classification")]
        loss_fn, kw = nn.CrossEntropyLoss(), {}
    else:
        be = pytest.importorskip("specops.backends.tensorflow")
        model, loss_fn, batches = _keras_mlp(dtype)
        kw = {"chunk_size": 64}
    H = be.hessian(model, loss_fn, batches, **kw)
    n = H.shape[0]
    V = H.ops.asarray(np.random.default_rng(6).standard_normal((n, 3)))
    direct = {"ggn": be.ggn(model, loss_fn, batches, **kw),
              "empirical_fisher": be.fisher(model, loss_fn, batches, datum="term", **kw),
              "mc_fisher": be.fisher(model, loss_fn, batches, estimator="mc", num_samples=2, seed=5, **kw)}
    # bit for bit in PyTorch; TensorFlow's two traces of one function may round differently
    tol = 0.0 if framework == "torch" else 1e-6 if dtype == "float32" else 1e-13

    def same(A, B):
        return rel(H.ops.to_numpy(A), H.ops.to_numpy(B)) <= tol

    G = curvature_like(H, curvature="ggn")
    assert G.adapter.curvature == "ggn"
    for curvature in CURVATURES[1:]:
        made = curvature_like(G, curvature=curvature, num_samples=2, seed=5, datum="term")
        assert made.adapter.curvature == curvature
        assert made.positive_semidefinite is True
        assert same(made @ V, direct[curvature] @ V), curvature
    assert curvature_like(H, "hessian") is H
    assert same(curvature_like(G, "hessian") @ V, H @ V)
    # the Monte-Carlo labels follow the seed
    other = curvature_like(H, "mc_fisher", num_samples=2, seed=6)
    assert rel(H.ops.to_numpy(other @ V), H.ops.to_numpy(direct["mc_fisher"] @ V)) > 1e-3
    with pytest.raises(ValueError, match="unknown curvature 'fisher'; choose one of: hessian, ggn, empirical_fisher"):
        curvature_like(H, "fisher")  # vocab: keep (a former name, refused)
    with pytest.raises(ValueError, match="unknown estimator 'true'; choose one of: empirical, mc"):
        be.fisher(model, loss_fn, batches, estimator="true", **kw)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        curvature_like(H, "mc_fisher", num_samples=0)


def test_curvature_like_refuses_operators_without_a_model_split():
    from specops.curvature import curvature_like

    params = {"w": jnp.ones(3)}
    H = sj.hessian(lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2), params,
                   (jnp.ones((4, 3)), jnp.zeros(4)))
    with pytest.raises(TypeError, match="for JAX build specops.backends.jax.ggn"):
        curvature_like(H, "ggn")
    with pytest.raises(TypeError, match="takes a model operator"):
        curvature_like(specops.aslinearoperator(np.eye(3)), "ggn")
