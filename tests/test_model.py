"""The model-backed operator (batching, weighting, reductions, checks) on a NumPy model
with a closed-form Hessian."""

import numpy as np
import pytest

import specops as so
from specops.backends import numpy as snp
from numpy_models import SoftmaxRegression, digits


@pytest.fixture(scope="module")
def problem():
    X, y = digits(150)
    X = X[:, ::4]  # 16 features -> 160 parameters
    model = SoftmaxRegression(X.shape[1], 10)
    theta = np.random.default_rng(0).normal(0, 0.3, X.shape[1] * 10)
    return model, theta, X, y


def batches(X, y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((X[i : i + s], y[i : i + s]))
        i += s
    return out


def make(model, theta, data, **kw):
    params = {"weight": theta.reshape(model.d, model.c)}
    return snp.hessian(model.loss, model.grad, model.hvp, params, data, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unequal_batches_give_the_full_data_hessian(problem, reduction):
    model, theta, X, y = problem
    model = SoftmaxRegression(model.d, model.c, reduction)
    H = make(model, theta, batches(X, y, [70, 50, 30]), reduction=reduction)
    dense = model.dense_hessian(theta, X)
    V = np.random.default_rng(1).standard_normal((H.shape[0], 3))
    np.testing.assert_allclose(H.matmat(V), dense @ V, rtol=1e-10, atol=1e-12)
    assert H.loss_at() == pytest.approx(model.loss(theta, (X, y)), rel=1e-12)
    np.testing.assert_allclose(H.gradient(), model.grad(theta, (X, y)), rtol=1e-10, atol=1e-13)
    assert H.num_samples == 150 and H.num_matvecs == 3


def test_single_batch_and_spectrum_match_dense(problem):
    model, theta, X, y = problem
    H = make(model, theta, (X, y))
    dense = model.dense_hessian(theta, X)
    lam = np.linalg.eigvalsh(dense)
    res = so.eigsh(H, k=3, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, lam[::-1][:3], rtol=1e-8)
    t = so.trace(H, method="hutch++", max_matvecs=60, seed=0)
    assert abs(t.estimate - lam.sum()) <= 5 * t.stderr + 1e-8


def test_loss_at_moves_parameters_without_changing_them(problem):
    model, theta, X, y = problem
    H = make(model, theta, (X, y), check_deterministic=False)
    delta = np.random.default_rng(2).standard_normal(H.shape[0]) * 0.01
    assert H.loss_at(delta) == pytest.approx(model.loss(theta + delta, (X, y)), rel=1e-12)
    np.testing.assert_array_equal(H.params_vector(), theta)
    assert H.num_loss_evals == 1


def test_restrict_to_named_blocks(problem):
    model, theta, X, y = problem
    # two named blocks: the first 5 input rows of W and the rest
    W = theta.reshape(model.d, model.c)
    params = {"head": W[:5], "tail": W[5:]}
    H = snp.hessian(model.loss, model.grad, model.hvp, params, (X, y))
    assert list(H.param_blocks) == ["head", "tail"]
    assert H.param_shapes == {"head": (5, 10), "tail": (11, 10)}  # the shapes passed in
    dense = model.dense_hessian(theta, X)
    np.testing.assert_allclose(H.restrict("tail").to_dense(), dense[50:, 50:], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(H.restrict(["t*"]).to_dense(), dense[50:, 50:], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(H.restrict(slice(0, 50)).to_dense(), dense[:50, :50], rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="no parameter matches 'body'.*head, tail"):
        H.restrict("body")


def test_non_finite_loss_names_the_batch(problem):
    model, theta, X, y = problem
    Xb = X.copy()
    Xb[100] = np.nan
    with pytest.raises(so.NonFiniteError, match="batch 2"):
        make(model, theta, batches(Xb, y, [50, 40, 60]))


def test_non_deterministic_products_are_detected(problem):
    model, theta, X, y = problem
    rng = np.random.default_rng(0)

    def noisy_hvp(th, batch, V):
        return model.hvp(th, batch, V) * (1 + 0.01 * rng.standard_normal())

    with pytest.raises(so.NonDeterministicError, match="dropout"):
        snp.hessian(model.loss, model.grad, noisy_hvp, theta, (X, y))
    H = snp.hessian(model.loss, model.grad, noisy_hvp, theta, (X, y), check_deterministic=False)
    assert H.shape == (160, 160)


def test_bad_data(problem):
    model, theta, X, y = problem
    with pytest.raises(TypeError, match="one-shot iterator"):
        make(model, theta, (b for b in batches(X, y, [75, 75])))
    with pytest.raises(ValueError, match="reduction"):
        make(model, theta, (X, y), reduction="avg")
    with pytest.raises(ValueError, match="no samples"):
        make(model, theta, [(X[:0], y[:0])], check_deterministic=False)
