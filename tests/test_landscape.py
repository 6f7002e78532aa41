"""specops.landscape against closed forms: a least-squares quadratic and softmax regression."""

import numpy as np
import pytest
from numpy_models import SoftmaxRegression, digits
from specops.backends import numpy as sn

import specops as so
from specops import random as _random
from specops.landscape import (
    Landscape,
    filter_normalized_directions,
    make_directions,
    random_directions,
)


class LeastSquares:
    """loss(theta) = mean_i (x_i . w + b - y_i)^2 / 2 with theta = [W (o, d) rows, b (o,)] and o=1 output.

    Its Hessian X1^T X1 / N (X1 = [X, 1]) is constant: the loss along any direction is an
    exact parabola.
    """

    def __init__(self, d):
        self.d = d

    def _design(self, X):
        return np.hstack([X, np.ones((len(X), 1))])

    def loss(self, theta, batch):
        X, y = batch
        r = self._design(X) @ theta - y
        return 0.5 * np.mean(r**2)

    def grad(self, theta, batch):
        X, y = batch
        A = self._design(X)
        return A.T @ (A @ theta - y) / len(X)

    def hvp(self, theta, batch, V):
        A = self._design(batch[0])
        return A.T @ (A @ V) / len(A)


@pytest.fixture
def quadratic():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 5)), rng.standard_normal(60)
    model = LeastSquares(5)
    params = {"weight": rng.standard_normal(5), "bias": np.array([0.3])}
    data = [(X[:25], y[:25]), (X[25:], y[25:])]   # unequal batches: loss_at must weight them
    H = sn.hessian(model.loss, model.grad, model.hvp, params, data)
    A = model._design(X)
    theta = np.concatenate([params["weight"], params["bias"]])
    return H, model, (X, y), A.T @ A / len(X), theta


def test_line_along_top_eigenvector_is_the_exact_parabola(quadratic):
    H, model, full, dense, theta = quadratic
    eig = so.eigsh(H, k=1)
    v = eig.eigenvectors[:, 0]
    ls = so.landscape(H, eig, span=2.0, steps=9)
    lam_true = np.linalg.eigvalsh(dense)[-1]
    g = model.grad(theta, full)
    expected = model.loss(theta, full) + ls.alphas * (g @ v) + 0.5 * lam_true * ls.alphas**2
    assert ls.losses.shape == (9,)
    np.testing.assert_allclose(ls.alphas, np.linspace(-2, 2, 9))
    np.testing.assert_allclose(ls.losses, expected, rtol=1e-10)
    assert ls.center_loss == pytest.approx(model.loss(theta, full), rel=1e-12)
    assert ls.settings["directions"] == "eigen" and ls.num_evaluations == 10


def test_plane_of_two_eigenvectors_matches_closed_form(quadratic):
    H, model, full, dense, theta = quadratic
    eig = so.eigsh(H, k=2)
    ls = so.landscape(H, "eigen-2d", eig=eig, span=(-1.0, 0.5), steps=5)
    lam = np.linalg.eigvalsh(dense)[::-1][:2]
    V = eig.eigenvectors
    g = model.grad(theta, full)
    A, B = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
    expected = (model.loss(theta, full) + A * (g @ V[:, 0]) + B * (g @ V[:, 1])
                + 0.5 * (lam[0] * A**2 + lam[1] * B**2))
    assert ls.losses.shape == (5, 5) and ls.ndim == 2
    np.testing.assert_allclose(ls.betas, np.linspace(-1.0, 0.5, 5))
    np.testing.assert_allclose(ls.losses, expected, rtol=1e-10)


def test_softmax_landscape_follows_second_order_taylor_near_zero():
    X, y = digits(120)
    model = SoftmaxRegression(64, 10)
    theta = np.random.default_rng(1).standard_normal(640) * 0.05
    H = sn.hessian(model.loss, model.grad, model.hvp, theta, (X, y))
    v = random_directions(H, 1, seed=3)[0]
    v = v / np.linalg.norm(v)
    g = model.grad(theta, (X, y))
    curv = v @ (model.dense_hessian(theta, X) @ v)
    errors = []
    for h in (0.4, 0.2):
        ls = so.landscape(H, [v], span=h, steps=3)        # points -h, 0, h
        taylor = model.loss(theta, (X, y)) + ls.alphas * (g @ v) + 0.5 * curv * ls.alphas**2
        errors.append(np.abs(ls.losses - taylor).max())
        assert ls.losses[1] == pytest.approx(model.loss(theta, (X, y)), rel=1e-12)
    # the remainder is third order: halving the step divides it by about 8
    assert 5 < errors[0] / errors[1] < 12
    assert errors[1] < 1e-2 * 0.5 * curv * 0.2**2


def test_filter_normalization_matches_a_direct_computation():
    rng = np.random.default_rng(2)
    W, b, c = rng.standard_normal((4, 3)), rng.standard_normal(4), rng.standard_normal((2, 2, 3))
    params = {"W": W, "b": b, "conv": c}
    theta = np.concatenate([W.ravel(), b, c.ravel()])
    H = sn.hessian(lambda t, batch: float(t @ t), lambda t, batch: 2 * t, lambda t, batch, V: 2 * V,
                   params, (np.zeros((1, 1)),))
    shapes = {"W": (4, 3), "b": (4,), "conv": (2, 2, 3)}
    for bias in ("zero", "norm"):
        d = filter_normalized_directions(H, 2, seed=7, bias=bias, shapes=shapes)[1]
        raw = _random.probes(theta.size, [1], 7, distribution="normal", stream="landscape-filter")[:, 0]
        expect = np.empty_like(raw)
        for i in range(4):            # rows of W: one filter per output
            r = raw[3 * i : 3 * i + 3]
            expect[3 * i : 3 * i + 3] = r / np.linalg.norm(r) * np.linalg.norm(W[i])
        rb = raw[12:16]
        expect[12:16] = 0.0 if bias == "zero" else rb / np.linalg.norm(rb) * np.linalg.norm(b)
        for i in range(2):            # conv kernel (out=2, ...): filter i holds 6 entries
            r = raw[16 + 6 * i : 22 + 6 * i]
            expect[16 + 6 * i : 22 + 6 * i] = r / np.linalg.norm(r) * np.linalg.norm(c[i])
        np.testing.assert_allclose(d, expect, rtol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        filter_normalized_directions(H, 1, shapes={"W": (5, 3)})
    with pytest.raises(ValueError, match="bias"):
        filter_normalized_directions(H, 1, bias="keep", shapes=shapes)


def test_random_directions_are_seeded_and_2d_strings_work(quadratic):
    H, *_ = quadratic
    d1 = random_directions(H, 2, seed=5)
    d2 = random_directions(H, 2, seed=5)
    d3 = random_directions(H, 2, seed=6)
    np.testing.assert_array_equal(d1[1], d2[1])
    assert not np.allclose(d1[0], d3[0])
    ls = so.landscape(H, "random-2d", seed=5, span=0.5, steps=3)
    np.testing.assert_allclose(ls.losses[2, 0], H.loss_at(d1[0] * 0.5 - d1[1] * 0.5), rtol=1e-12)


def test_parameters_unchanged_and_json_round_trip(quadratic):
    H, *_ = quadratic
    before = H.params_vector().copy()
    loss0 = H.loss_at()
    ls = so.landscape(H, "filter-1d", span=1.0, steps=4, seed=1, bias="norm")
    np.testing.assert_array_equal(H.params_vector(), before)
    assert H.loss_at() == loss0
    back = Landscape.from_json(ls.to_json())
    np.testing.assert_array_equal(back.losses, ls.losses)
    assert back.betas is None and back.directions is None
    assert back.settings == {**ls.settings, "span": 1.0}


def test_torch_model_is_unchanged():
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    data = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,)))
    H = st.hessian(model, torch.nn.CrossEntropyLoss(), data)
    before = [p.detach().clone() for p in model.parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ls = so.landscape(H, "filter-2d", span=0.5, steps=3, shapes=shapes)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert ls.losses.shape == (3, 3)
    with torch.no_grad():
        center = float(torch.nn.CrossEntropyLoss()(model(data[0]), data[1]))
    assert ls.losses[1, 1] == pytest.approx(center)


def test_bad_arguments(quadratic):
    H, *_ = quadratic
    d = random_directions(H, 3)
    with pytest.raises(ValueError, match="one direction"):
        so.landscape(H, d)
    with pytest.raises(ValueError, match="shape"):
        so.landscape(H, [np.ones(3)])
    with pytest.raises(ValueError, match="span"):
        so.landscape(H, d[:1], span=-1)
    with pytest.raises(ValueError, match="eig="):
        so.landscape(H, "eigen-1d")
    with pytest.raises(ValueError, match="filter-2d"):
        so.landscape(H, "filter")
    with pytest.raises(ValueError, match="unknown directions 'hessian'; choose one of: eigen, random, filter"):
        so.landscape(H, "hessian-1d")
    with pytest.raises(ValueError, match="unknown directions 'kind'"):
        make_directions(H, "kind", 1)
    with pytest.raises(TypeError, match="loss_at"):
        so.landscape(so.aslinearoperator(np.eye(3)), [np.ones(3)])
