"""Equinox models through the documented recipe, ``eqx.partition(model, eqx.is_inexact_array)``.

Truth: ``jax.hessian`` of the same loss with respect to the flattened partition
(``ravel_pytree``), dense, in float64 and float32. What happens to state that is not a
parameter: batch-norm statistics (``eqx.nn.State``) are outside the partition and never
differentiated; a floating buffer inside the module is a leaf of the partition, so it is
differentiated unless ``wrt=`` leaves it out; read through ``stop_gradient`` and left in, it is
refused at construction (no Hessian exists).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
eqx = pytest.importorskip("equinox")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from specops.backends import jax as sj  # noqa: E402

TOL = {"float32": 2e-5, "float64": 1e-11}


class BatchNormNet(eqx.Module):
    lin: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.lin = eqx.nn.Linear(3, 4, key=k1)
        self.bn = eqx.nn.BatchNorm(4, axis_name="batch", inference=True, mode="ema")
        self.out = eqx.nn.Linear(4, 2, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(jnp.tanh(self.lin(x)), state)
        return self.out(h), state


class BufferNet(eqx.Module):
    lin: eqx.nn.Linear
    scale: jax.Array  # a fixed floating buffer, not meant to be trained
    stop: bool = eqx.field(static=True)

    def __init__(self, key, stop):
        self.lin = eqx.nn.Linear(3, 2, key=key)
        self.scale = jnp.array([0.5, 2.0])
        self.stop = stop

    def __call__(self, x):
        s = jax.lax.stop_gradient(self.scale) if self.stop else self.scale
        return s * jnp.tanh(self.lin(x))


def batch(dtype, n=8):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((n, 3)), dtype=dtype), jnp.asarray(rng.standard_normal((n, 2)), dtype=dtype)


def dense(A):
    return A.to_dense(chunk_size=A.shape[0])


def truth(loss, params, data):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda t: loss(unravel(t), data))(flat), dtype=np.float64)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_partition_of_a_batch_norm_model_matches_jax_hessian_and_leaves_its_state_out(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox's note on BatchNorm's default mode
        model, state = eqx.nn.make_with_state(BatchNormNet)(jax.random.PRNGKey(0))
    model, state = cast(model, dtype), cast(state, dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, b):
        m = eqx.combine(p, static)
        out = jax.vmap(lambda x: m(x, state)[0], axis_name="batch")(b[0])
        return jnp.mean((out - b[1]) ** 2)

    data = batch(dtype)
    H = sj.hessian(loss, params, data)
    # the running statistics live in `state`, outside the partition: 34 parameters, not 42
    assert H.shape[0] == 34 == ravel_pytree(params)[0].size
    assert sum(x.size for x in jax.tree_util.tree_leaves(state) if eqx.is_inexact_array(x)) == 8
    assert set(H.param_blocks) == {"lin.weight", "lin.bias", "bn.weight", "bn.bias", "out.weight", "out.bias"}
    assert rel(dense(H), truth(loss, params, data)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_floating_buffer_is_differentiated_unless_wrt_leaves_it_out(dtype):
    data = batch(dtype)
    model = cast(BufferNet(jax.random.PRNGKey(1), stop=False), dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, b):
        return jnp.mean((jax.vmap(eqx.combine(p, static))(b[0]) - b[1]) ** 2)

    H = sj.hessian(loss, params, data)
    assert H.shape[0] == 8 + 2 and "scale" in H.param_blocks  # the buffer is a leaf of the partition
    M = dense(H)
    assert rel(M, truth(loss, params, data)) < TOL[dtype]
    assert np.abs(M[H.param_blocks["scale"]]).max() > 0.1  # and it is differentiated
    # wrt= holds it fixed: the Hessian of the linear layer alone
    H_lin = sj.hessian(loss, params, data, wrt="lin.*")
    lin, rest = eqx.partition(params, lambda x: x is not params.scale)
    assert H_lin.shape[0] == 8
    assert rel(dense(H_lin), truth(lambda q, b: loss(eqx.combine(q, rest), b), lin, data)) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_stop_gradient_buffer_in_the_partition_is_refused_naming_wrt(dtype):
    """The gradient ignores the buffer but depends on it: no symmetric Hessian exists
    (central differences of the gradient are not symmetric); without the check, ``auto``
    switched to finite differences and returned an operator with |A - A^T| = 1.2."""
    data = batch(dtype)
    model = cast(BufferNet(jax.random.PRNGKey(1), stop=True), dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, b):
        return jnp.mean((jax.vmap(eqx.combine(p, static))(b[0]) - b[1]) ** 2)

    for engine in ("auto", "forward_over_reverse"):
        with pytest.raises(ValueError, match="not the gradient of any function.*wrt="):
            sj.hessian(loss, params, data, engine=engine)
    H = sj.hessian(loss, params, data, wrt="lin.*")  # the recipe the message names
    lin, rest = eqx.partition(params, lambda x: x is not params.scale)
    M = dense(H)
    assert H.engine == "forward_over_reverse" and np.abs(M - M.T).max() <= TOL[dtype] * np.abs(M).max()
    assert rel(M, truth(lambda q, b: loss(eqx.combine(q, rest), b), lin, data)) < TOL[dtype]
