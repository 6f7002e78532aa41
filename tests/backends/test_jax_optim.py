"""optax preconditioners and thresholds against D built by hand from the state (float64 NumPy).

The Hessian truth is ``jax.hessian`` of the loss of the raveled parameters; ``D`` is computed
from the state's moments with optax's formulas; thresholds by iterating optax on a 1-D quadratic.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import specops as so
from specops.backends import jax as sj


def loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logp = jax.nn.log_softmax(h @ params["w2"] + params["b2"])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _problem(dtype):
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(4, 5)), "b1": rng.normal(size=5) * 0.1, "w2": rng.normal(size=(5, 3)),
              "b2": np.zeros(3)}
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    batch = (jnp.asarray(rng.normal(size=(24, 4)), dtype), jnp.asarray(rng.integers(0, 3, 24)))
    return params, batch


def _train(opt, params, batch, steps=4):
    state = opt.init(params)
    update = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p, batch), s, p))
    for _ in range(steps):
        updates, state = update(params, state)
        params = optax.apply_updates(params, updates)
    return params, state


def _flat(tree):
    return np.asarray(ravel_pytree(jax.tree.map(lambda a: np.asarray(a, np.float64), tree))[0])


def _find(state, name):
    if type(state).__name__ == name:
        return state
    for part in (state if isinstance(state, tuple) else ()):
        hit = _find(part, name)
        if hit is not None:
            return hit
    return getattr(state, "inner_state", None) and _find(state.inner_state, name)


CASES = {  # name: (optimizer, hyperparameters passed, hand formula of D from the state)
    "adam": (optax.adam(1e-2, b2=0.99, eps=1e-6), {"b2": 0.99, "eps": 1e-6},
             lambda s: np.sqrt(_flat(_find(s, "ScaleByAdamState").nu) / (1 - 0.99 ** 4)) + 1e-6),
    "adamw-eps_root": (optax.adamw(1e-2, eps=1e-7, eps_root=1e-9, weight_decay=0.1),
                       {"b2": 0.999, "eps": 1e-7, "eps_root": 1e-9},
                       lambda s: np.sqrt(_flat(_find(s, "ScaleByAdamState").nu) / (1 - 0.999 ** 4) + 1e-9) + 1e-7),
    "amsgrad": (optax.amsgrad(1e-2), {"b2": 0.999, "eps": 1e-8},
                lambda s: np.sqrt(_flat(_find(s, "ScaleByAmsgradState").nu_max)) + 1e-8),
    "rmsprop": (optax.rmsprop(1e-3, eps=1e-6, momentum=0.5), {"eps": 1e-6, "eps_in_sqrt": True},
                lambda s: np.sqrt(_flat(_find(s, "ScaleByRmsState").nu) + 1e-6)),
    "rmsprop-centered": (optax.rmsprop(1e-3, eps=1e-4, centered=True, eps_in_sqrt=False),
                         {"eps": 1e-4, "eps_in_sqrt": False},
                         lambda s: np.sqrt(_flat(_find(s, "ScaleByRStdDevState").nu)
                                           - _flat(_find(s, "ScaleByRStdDevState").mu) ** 2) + 1e-4),
    "rmsprop-bias-corrected": (optax.rmsprop(1e-3, decay=0.8, eps=1e-6, bias_correction=True),
                               {"eps": 1e-6, "eps_in_sqrt": True, "decay": 0.8},
                               lambda s: np.sqrt(_flat(_find(s, "ScaleByRmsWithCountState").nu) / (1 - 0.8 ** 4)
                                                 + 1e-6)),
    "adagrad": (optax.adagrad(1e-2), {"eps": 1e-7},
                lambda s: np.sqrt(_flat(_find(s, "ScaleByRssState").sum_of_squares) + 1e-7)),
    "sgd-momentum": (optax.sgd(1e-2, momentum=0.9), {}, lambda s: None),
    "injected-adam": (optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b2=0.95, eps=1e-5), {},
                      lambda s: np.sqrt(_flat(_find(s, "ScaleByAdamState").nu) / (1 - 0.95 ** 4)) + 1e-5),
}


@pytest.fixture(scope="module", params=[jnp.float64, jnp.float32], ids=["float64", "float32"])
def problem(request):
    """The operator and its dense truth, once per dtype; the optimizers train from the same params."""
    params, batch = _problem(request.param)
    H = sj.hessian(loss, params, batch)
    flat, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params))
    Hd = np.asarray(jax.hessian(lambda f: loss(unravel(f), (batch[0].astype(jnp.float64), batch[1])))(flat))
    return request.param, params, batch, H, Hd


@pytest.mark.parametrize("which", list(CASES))
def test_preconditioned_matches_dense_truth(which, problem):
    dtype, params, batch, H, Hd = problem
    opt, hyper, hand = CASES[which]
    _, state = _train(opt, params, batch)
    P = sj.preconditioner(state, H, **hyper)
    d = hand(state)
    d = np.ones(H.shape[0]) if d is None else d
    f64 = dtype == jnp.float64
    np.testing.assert_allclose(P.ops.to_numpy(P.diagonal), d, rtol=1e-12 if f64 else 1e-5)
    truth = Hd / np.sqrt(np.outer(d, d))
    dense = so.preconditioned(H, P).to_dense()
    assert np.abs(dense - truth).max() <= (1e-9 if f64 else 2e-4) * np.abs(truth).max()


def test_wrt_and_bad_input():
    params, batch = _problem(jnp.float64)
    opt = optax.adam(1e-2)
    params1, state = _train(opt, params, batch)
    H = sj.hessian(loss, params1, batch, wrt=["w2", "b2"])
    P = sj.preconditioner(state, H, b2=0.999, eps=1e-8)
    nu = _find(state, "ScaleByAdamState").nu
    want = np.sqrt(np.concatenate([np.ravel(nu["b2"]), np.ravel(nu["w2"])]) / (1 - 0.999 ** 4)) + 1e-8
    np.testing.assert_allclose(P.ops.to_numpy(P.diagonal), want, rtol=1e-12)
    with pytest.raises(ValueError, match=r"does not hold b2, eps.*b2=0.999, eps=1e-8.*inject_hyperparams"):
        sj.preconditioner(state, H)
    with pytest.raises(ValueError, match="has not stepped"):
        sj.preconditioner(opt.init(params), H, b2=0.999, eps=1e-8)
    with pytest.raises(TypeError, match="pass its state"):
        sj.preconditioner(opt, H, b2=0.999, eps=1e-8)
    with pytest.raises(TypeError, match=r"optax adam, adamw.*preconditioned\(H, P\)"):
        sj.preconditioner(optax.lion(1e-3).init(params), H)
    other = {"a": params["w1"], "b": params["b1"]}
    with pytest.raises(ValueError, match="holds no moments for b2"):
        sj.preconditioner(_count1(optax.adam(1e-2).init(other)), H, b2=0.999, eps=1e-8)
    with pytest.raises(TypeError, match="schedule"):
        sj.stability_threshold(state, learning_rate=optax.constant_schedule(1e-2), b1=0.9)


def _count1(state):
    adam = state[0]
    return (adam._replace(count=jnp.asarray(1, jnp.int32)), *state[1:])


def test_thresholds_closed_form():
    p = {"x": jnp.zeros(1)}
    assert sj.stability_threshold(optax.adam(1e-3).init(p), learning_rate=1e-3, b1=0.9) == pytest.approx(38e3)
    assert sj.stability_threshold(optax.sgd(0.1).init(p), learning_rate=0.1) == pytest.approx(20)
    assert sj.stability_threshold(optax.sgd(0.1, momentum=0.9).init(p), learning_rate=0.1, momentum=0.9,
                                  nesterov=False) == pytest.approx(38)
    assert sj.stability_threshold(optax.sgd(0.1, momentum=0.9, nesterov=True).init(p), learning_rate=0.1,
                                  momentum=0.9, nesterov=True) == pytest.approx(3.8 / 0.28)
    assert sj.stability_threshold(optax.nadam(1e-3).init(p), learning_rate=1e-3, b1=0.9,
                                  nesterov=True) == pytest.approx(3.8 / (2.8 * 0.1 * 1e-3))
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.8).init(p)
    assert sj.stability_threshold(injected) == pytest.approx(3.6 / (0.2 * 1e-2))
    with pytest.raises(ValueError, match="momentum=..., nesterov=..."):
        sj.stability_threshold(optax.sgd(0.1, momentum=0.9).init(p), learning_rate=0.1)


@pytest.mark.parametrize("opt, kw", [
    (optax.sgd(0.1), {"learning_rate": 0.1}),
    (optax.sgd(0.1, momentum=0.9, nesterov=True), {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    (optax.adam(0.1, eps=1e3), {"learning_rate": 0.1, "b1": 0.9}),
    (optax.nadam(0.1, eps=1e3), {"learning_rate": 0.1, "b1": 0.9, "nesterov": True}),
], ids=["sgd", "nesterov", "adam", "nadam"])
def test_threshold_separates_stable_from_divergent_on_a_quadratic(opt, kw):
    scale = 1e3 if "b1" in kw else 1.0   # P ~ eps: |g| stays far below it
    thr = sj.stability_threshold(opt.init({"x": jnp.zeros(1)}), **kw) * scale

    def growth(lam):
        x = {"x": jnp.full(1, 1e-60)}
        s = opt.init(x)
        xs = []
        step = jax.jit(lambda x, s: opt.update(jax.tree.map(lambda a: lam * a, x), s))
        for _ in range(500):
            u, s = step(x, s)
            x = optax.apply_updates(x, u)
            xs.append(abs(float(x["x"][0])))
            if xs[-1] > 1e-6:
                return np.inf
        return max(xs[-50:]) / max(xs[150:200])

    assert growth(0.97 * thr) < 1e-2
    assert growth(1.03 * thr) > 1e2
