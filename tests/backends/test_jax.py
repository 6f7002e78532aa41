"""The JAX backend against dense Hessians from ``jax.hessian`` on the concatenated full batch."""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import specops
from specops.backends import jax as sj

RTOL = 1e-10


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny)


def mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["layers"][0]["w"] + params["layers"][0]["b"])
    logits = h @ params["layers"][1]["w"] + params["layers"][1]["b"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def mlp_sum_loss(params, batch):
    return mlp_loss(params, batch) * batch[0].shape[0]


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    d, h, c, n = 5, 4, 3, 23
    params = {"layers": [
        {"w": jnp.asarray(rng.normal(size=(d, h))), "b": jnp.asarray(0.1 * rng.normal(size=h))},
        {"w": jnp.asarray(rng.normal(size=(h, c))), "b": jnp.asarray(0.1 * rng.normal(size=c))},
    ]}
    X, Y = rng.normal(size=(n, d)), rng.integers(0, c, size=n)
    batches = [(X[:10], Y[:10]), (X[10:20], Y[10:20]), (X[20:], Y[20:])]  # unequal last batch
    flat, unravel = ravel_pytree(params)

    def full_batch_hessian(loss):
        return np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), (X, Y))))(flat))

    return {"params": params, "X": X, "Y": Y, "batches": batches, "flat": flat, "unravel": unravel,
            "H_mean": full_batch_hessian(mlp_loss), "H_sum": full_batch_hessian(mlp_sum_loss),
            "H": sj.hessian(mlp_loss, params, batches, chunk_size=64)}


def dense(H):
    return H.to_dense(chunk_size=H.shape[0])  # one compiled block shape per batch shape


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_products_match_dense_hessian(problem, reduction):
    if reduction == "mean":
        H = problem["H"]
    else:
        H = sj.hessian(mlp_sum_loss, problem["params"], problem["batches"], reduction="sum", chunk_size=64)
    truth = problem[f"H_{reduction}"]
    V = np.random.default_rng(1).normal(size=(H.shape[0], 5))
    HV = H @ jnp.asarray(V)
    assert isinstance(HV, jax.Array) and HV.dtype == jnp.float64
    assert rel(HV, truth @ V) < RTOL
    assert rel(H @ jnp.asarray(V[:, 0]), truth @ V[:, 0]) < RTOL
    assert rel(dense(H), truth) < RTOL
    assert H.num_samples == 23


def test_blocks_are_named_by_pytree_path_in_ravel_order(problem):
    H = problem["H"]
    assert list(H.param_blocks) == ["layers.0.b", "layers.0.w", "layers.1.b", "layers.1.w"]
    assert H.param_blocks["layers.0.w"] == slice(4, 24)
    assert H.param_shapes["layers.0.w"] == (5, 4)
    assert rel(H.params_vector(), problem["flat"]) == 0


def test_chunked_matmat_equals_one_pass(problem):
    H = sj.hessian(mlp_loss, problem["params"], problem["batches"][:2], chunk_size=3,
                   check_deterministic=False)
    V = np.random.default_rng(2).normal(size=(H.shape[0], 7))
    first_two = sj.hessian(mlp_loss, problem["params"], problem["batches"][:2], chunk_size=64,
                           check_deterministic=False)
    assert rel(H @ jnp.asarray(V), first_two @ jnp.asarray(V)) < RTOL


def test_compiled_once_not_per_product(problem):
    H = sj.hessian(mlp_loss, problem["params"], problem["batches"], chunk_size=64)
    traced = H.adapter.num_traces  # the full batches and the shorter last batch
    assert traced == 2
    v = jnp.ones(H.shape[0])
    H @ v  # H @ v has its own program per batch shape (no reshapes around it)
    assert H.adapter.num_traces <= 2 * traced
    traced = H.adapter.num_traces
    for _ in range(5):
        H @ v
        H.matmat(v[:, None])
    assert H.adapter.num_traces == traced


def test_subset_is_the_dense_block(problem):
    H = problem["H"]
    B = H.restrict("layers.1.*")
    assert list(B.param_blocks) == ["layers.1.b", "layers.1.w"]
    sl = slice(H.param_blocks["layers.1.b"].start, H.param_blocks["layers.1.w"].stop)
    assert rel(dense(B), problem["H_mean"][sl, sl]) < RTOL
    only = sj.hessian(mlp_loss, problem["params"], problem["batches"], wrt=["layers.0.w"],
                      check_deterministic=False)
    s = H.param_blocks["layers.0.w"]
    assert rel(dense(only), problem["H_mean"][s, s]) < RTOL


def test_loss_at_and_gradient(problem):
    H = problem["H"]
    full = lambda f: mlp_loss(problem["unravel"](f), (problem["X"], problem["Y"]))
    delta = 0.01 * np.random.default_rng(3).normal(size=H.shape[0])
    assert abs(H.loss_at() - full(problem["flat"])) < 1e-12
    assert abs(H.loss_at(jnp.asarray(delta)) - full(problem["flat"] + delta)) < 1e-12
    assert rel(H.gradient(), jax.grad(full)(problem["flat"])) < RTOL
    assert rel(H.params_vector(), problem["flat"]) == 0  # parameters untouched


def test_float32_parameters_cast_to_float64(problem):
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), problem["params"])
    v = np.random.default_rng(7).normal(size=problem["flat"].shape[0])
    H32 = sj.hessian(mlp_loss, params32, problem["batches"])
    assert H32.dtype == np.float32 and (H32 @ jnp.asarray(v, jnp.float32)).dtype == jnp.float32
    assert rel(H32 @ jnp.asarray(v, jnp.float32), problem["H_mean"] @ v) < 1e-5
    H64 = sj.hessian(mlp_loss, params32, problem["batches"], dtype=jnp.float64, check_deterministic=False)
    assert H64.dtype == np.float64
    with pytest.raises(TypeError, match="cast the input to float64"):
        H64 @ jnp.asarray(v, jnp.float32)


def conv_loss(params, batch):
    x, y = batch  # x: (N, 1, 6, 6)
    h = jax.lax.conv_general_dilated(x, params["conv"]["w"], (1, 1), "VALID") + params["conv"]["b"][:, None, None]
    h = jnp.tanh(h).reshape(x.shape[0], -1)
    logits = h @ params["dense"]["w"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def test_small_cnn_matches_dense_hessian():
    rng = np.random.default_rng(4)
    params = {"conv": {"w": jnp.asarray(0.5 * rng.normal(size=(2, 1, 3, 3))), "b": jnp.zeros(2)},
              "dense": {"w": jnp.asarray(0.3 * rng.normal(size=(32, 3)))}}
    X, Y = rng.normal(size=(12, 1, 6, 6)), rng.integers(0, 3, size=12)
    H = sj.hessian(conv_loss, params, [(X[:6], Y[:6]), (X[6:], Y[6:])], chunk_size=128)
    flat, unravel = ravel_pytree(params)
    truth = np.asarray(jax.jit(jax.hessian(lambda f: conv_loss(unravel(f), (X, Y))))(flat))
    assert rel(dense(H), truth) < RTOL


def test_unused_leaf_gives_a_zero_block(problem):
    params = dict(problem["params"], unused=jnp.ones(2))
    H = sj.hessian(mlp_loss, params, problem["batches"][:2], chunk_size=64, check_deterministic=False)
    s = H.param_blocks["unused"]
    D = dense(H)
    assert np.all(D[s] == 0) and np.all(D[:, s] == 0)


class Linear(NamedTuple):
    """An Equinox-like model: array fields and a function field, all pytree leaves."""

    w: jax.Array
    activation: Callable


def test_attribute_paths_static_leaves_and_dict_batches():
    rng = np.random.default_rng(8)
    model = Linear(w=jnp.asarray(rng.normal(size=3)), activation=jnp.tanh)
    X, y = rng.normal(size=(9, 3)), rng.normal(size=9)

    def loss_fn(m, batch):
        return jnp.mean((m.activation(batch["x"] @ m.w) - batch["y"]) ** 2)

    with pytest.raises(TypeError, match="'activation' \\(function\\)"):
        sj.hessian(loss_fn, model, {"x": X, "y": y})
    H = sj.hessian(loss_fn, model, [{"x": X[:5], "y": y[:5]}, {"x": X[5:], "y": y[5:]}], wrt="w")
    assert list(H.param_blocks) == ["w"]
    truth = jax.hessian(lambda w: loss_fn(model._replace(w=w), {"x": X, "y": y}))(model.w)
    assert rel(dense(H), truth) < RTOL


# --- bad input ----------------------------------------------------------------------
def test_loss_that_is_not_a_scalar(problem):
    def per_sample(params, batch):
        return jnp.sum(batch[0] @ params["layers"][0]["w"], axis=1)

    with pytest.raises(ValueError, match=r"must return a scalar, got shape \(10,\).*\.mean\(\)"):
        sj.hessian(per_sample, problem["params"], problem["batches"])


def test_integer_leaves_are_named(problem):
    params = dict(problem["params"], step=jnp.asarray(3))
    with pytest.raises(TypeError, match=r"'step' \(int64\).*wrt="):
        sj.hessian(mlp_loss, params, problem["batches"])
    H = sj.hessian(mlp_loss, params, problem["batches"], wrt="layers")  # held fixed: fine
    v = np.ones(H.shape[0])
    assert rel(H @ jnp.asarray(v), problem["H_mean"] @ v) < RTOL


def test_non_finite_loss_names_the_batch(problem):
    X, Y = problem["X"].copy(), problem["Y"]
    X[12, 0] = np.nan
    with pytest.raises(specops.NonFiniteError, match="batch 1"):
        sj.hessian(mlp_loss, problem["params"], [(X[:10], Y[:10]), (X[10:], Y[10:])])


def test_mixed_dtypes_and_empty_selection(problem):
    params = dict(problem["params"], extra=jnp.ones(2, dtype=jnp.float32))
    with pytest.raises(TypeError, match="mix dtypes.*dtype="):
        sj.hessian(mlp_loss, params, problem["batches"])
    with pytest.raises(ValueError, match="no parameter matches 'conv"):
        sj.hessian(mlp_loss, problem["params"], problem["batches"], wrt="conv*")


def test_float64_without_x64_is_refused():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(TypeError, match="jax_enable_x64"):
            sj.JaxOps(np.float64)
    finally:
        jax.config.update("jax_enable_x64", True)


# --- vector operations and dense matrices -------------------------------------------
def test_dense_jax_matrix_operator():
    rng = np.random.default_rng(6)
    M = rng.normal(size=(6, 6))
    A = specops.aslinearoperator(jnp.asarray(M + M.T))
    assert A.backend == "jax" and A.dtype == np.float64
    v = rng.normal(size=6)
    out = A @ jnp.asarray(v)
    assert isinstance(out, jax.Array) and rel(out, (M + M.T) @ v) < 1e-14
    with pytest.raises(ValueError, match="not symmetric"):
        specops.aslinearoperator(jnp.asarray(M))
    assert not specops.aslinearoperator(jnp.asarray(M), symmetric=False).symmetric
    with pytest.raises(ValueError, match="square"):
        specops.aslinearoperator(jnp.ones((2, 3)))
