"""JAX: the core's engine check (engine=, cross_check=) and state that is not a parameter.

Truths: ``jax.hessian`` of a twin loss written with JAX's own operations, and of the loss
with respect to the parameters alone (Flax NNX ``nnx.Param`` leaves, linen ``params``).
"""

import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from specops.backends import jax as sj

jax.config.update("jax_enable_x64", True)


@jax.custom_vjp
def _square(x):
    return x * x


def _square_fwd(x):
    return x * x, x


def _square_bwd(x, g):
    # right for gradients; its own derivative loses the d/dx of x (a stop_gradient inside)
    return (2 * jax.lax.stop_gradient(x) * g,)


_square.defvjp(_square_fwd, _square_bwd)


def _problem(dtype, square):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"a": jax.random.normal(k1, (4, 5), dtype) * 0.5, "b": jax.random.normal(k2, (5, 3), dtype) * 0.5}
    batch = (jax.random.normal(k3, (24, 4), dtype), jnp.arange(24) % 3)

    def loss(p, b):
        X, y = b
        logits = square(X @ p["a"]) @ p["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    return loss, params, batch


def _dense(loss, params, batch):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return np.asarray(jax.hessian(lambda f: loss(unravel(f), batch))(flat))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_custom_vjp_not_differentiable_again_is_caught(dtype):
    loss, params, batch = _problem(dtype, _square)
    with pytest.warns(RuntimeWarning, match="using engine='finite_difference'"):
        H = sj.hessian(loss, params, batch)
    assert H.engine == "finite_difference" and H.engine_check.verdict == "wrong"
    assert "finite_difference" in repr(H)
    choice = H.adapter.choice  # the auto policy says what it chose and why
    assert (choice.requested, choice.engine) == ("auto", "finite_difference")
    assert "construction check found forward_over_reverse wrong" in choice.reason
    truth_loss, _, _ = _problem(dtype, lambda x: x * x)
    truth = _dense(truth_loss, params, batch)
    got = np.asarray(H.to_dense())
    assert np.linalg.norm(got - truth) / np.linalg.norm(truth) < (5e-2 if dtype == jnp.float32 else 1e-6)
    with pytest.raises(ValueError, match="engine='finite_difference'"):
        sj.hessian(loss, params, batch, engine="forward_over_reverse")
    H = sj.hessian(loss, params, batch, engine="forward_over_reverse", cross_check=False)
    assert H.engine == "forward_over_reverse" and H.engine_check.verdict == "skipped"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_plain_model_agrees_and_finite_differences_can_be_asked_for(dtype):
    loss, params, batch = _problem(dtype, lambda x: x * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        H = sj.hessian(loss, params, batch)
    assert H.engine == "forward_over_reverse" and H.engine_check.verdict == "agree"
    assert (H.adapter.choice.engine, H.adapter.choice.reason[:5]) == ("forward_over_reverse", "auto:")
    truth = _dense(loss, params, batch)
    F = sj.hessian(loss, params, batch, engine="finite_difference")
    assert F.engine_check.verdict == "skipped"
    assert np.linalg.norm(np.asarray(F.to_dense()) - truth) / np.linalg.norm(truth) < (
        5e-2 if dtype == jnp.float32 else 1e-6)
    with pytest.raises(ValueError, match="unknown engine 'cached_graph'; choose one of: auto, forward_over_reverse, finite_difference"):
        sj.hessian(loss, params, batch, engine="cached_graph")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        sj.hessian(loss, params, batch, chunk_size=0)


def _nnx_net():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            kw = dict(rngs=rngs, param_dtype=jnp.float64)
            self.a, self.bn, self.b = nnx.Linear(3, 4, **kw), nnx.BatchNorm(4, **kw), nnx.Linear(4, 2, **kw)

        def __call__(self, x):
            return self.b(jnp.tanh(self.bn(self.a(x))))

    model = Net(nnx.Rngs(0))
    model.eval()
    return model


def test_flax_nnx_state_differentiates_only_parameters():
    from flax import nnx

    model = _nnx_net()
    X, y = jax.random.normal(jax.random.PRNGKey(1), (8, 3), jnp.float64), jnp.arange(8) % 2

    def ce(out, labels):
        return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(len(labels)), labels])

    graphdef, state = nnx.split(model)  # the whole state: parameters and batch statistics
    H = sj.hessian(lambda s, b: ce(nnx.merge(graphdef, s)(b[0]), b[1]), state, (X, y))
    # the documented recipe
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = sj.model_loss(lambda p, x: nnx.merge(graphdef, p, rest)(x), ce)
    R = sj.hessian(loss, params, (X, y))
    truth = _dense(loss, params, (X, y))
    assert H.shape == R.shape == truth.shape == (34, 34)  # 38 with the batch statistics
    assert "bn.mean" not in H.param_blocks and "bn.scale" in H.param_blocks
    for A in (H, R):
        assert np.linalg.norm(np.asarray(A.to_dense()) - truth) / np.linalg.norm(truth) < 1e-10
    with pytest.raises(TypeError, match=r"nnx.split\(model, nnx.Param, ...\)"):
        sj.hessian(lambda s, b: ce(nnx.merge(graphdef, s)(b[0]), b[1]), nnx.state(model), (X, y), wrt="bn.*")


def test_flax_linen_batch_stats_are_held_fixed():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, param_dtype=jnp.float64)(x)
            x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
            return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(x))

    net = Net()
    X, y = jax.random.normal(jax.random.PRNGKey(1), (8, 3), jnp.float64), jnp.arange(8) % 2
    variables = net.init(jax.random.PRNGKey(0), X)
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree_util.tree_map(lambda a: a + 0.3, variables["batch_stats"])}

    def loss(v, b):
        return -jnp.mean(jax.nn.log_softmax(net.apply(v, b[0]))[jnp.arange(8), b[1]])

    H = sj.hessian(loss, variables, (X, y))
    assert all(name.startswith("params.") for name in H.param_blocks)
    truth = _dense(lambda p, b: loss({"params": p, "batch_stats": variables["batch_stats"]}, b),
                   variables["params"], (X, y))
    assert np.linalg.norm(np.asarray(H.to_dense()) - truth) / np.linalg.norm(truth) < 1e-10
