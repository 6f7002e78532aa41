"""One model, three frameworks, one spectrum.

The same MLP (64 -> 8 tanh -> 10, the same float64 weights) on the same scikit-learn
digits, built in PyTorch, JAX and Keras/TensorFlow. The three Hessian operators must
give the same products, the same top eigenvalues and, with the same seed, the same
trace estimate, and each must match the dense Hessian (``jax.hessian`` of the loss on
the concatenated full batch).

All three flatten the parameters in one layout (kernel (in, out), then bias, per
layer: Keras' own), so the same seed draws the same probes in the same coordinates;
the PyTorch model therefore keeps its weights as (in, out) kernels.
"""

import itertools
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("sklearn")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp

import specops
from specops.backends import jax as sj
from specops.backends import tensorflow as stf
from specops.backends import torch as st
from specops.zoo.data import digits

SIZES = (64, 8, 10)
BATCHES = (64, 64, 64, 8)  # unequal last batch


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def weights():
    rng = np.random.default_rng(0)
    out = []
    for fan_in, fan_out in itertools.pairwise(SIZES):
        out += [rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in), 0.1 * rng.normal(size=fan_out)]
    return out


def data():
    X, y = digits(n=sum(BATCHES))
    X = X.reshape(len(X), -1).astype(np.float64)
    edges = np.cumsum((0,) + BATCHES)
    return X, y, [(X[a:b], y[a:b]) for a, b in itertools.pairwise(edges)]


# --- the model in each framework ------------------------------------------------------
def jax_loss(params, batch):
    (w0, b0), (w1, b1) = params
    x, y = batch
    logits = jnp.tanh(x @ w0 + b0) @ w1 + b1
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


class TorchMLP(torch.nn.Module):
    """The MLP with Keras-layout (in, out) kernels, so the flat vectors line up."""

    def __init__(self, ws):
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(w)) for w in ws])

    def forward(self, x):
        w0, b0, w1, b1 = self.params
        return torch.tanh(x @ w0 + b0) @ w1 + b1


def keras_mlp(ws):
    model = keras.Sequential([
        keras.Input((SIZES[0],), dtype="float64"),
        keras.layers.Dense(SIZES[1], activation="tanh", dtype="float64"),
        keras.layers.Dense(SIZES[2], dtype="float64"),
    ])
    model.set_weights(ws)
    return model


@pytest.fixture(scope="module")
def operators():
    ws = weights()
    X, y, batches = data()
    params = [(jnp.asarray(ws[0]), jnp.asarray(ws[1])), (jnp.asarray(ws[2]), jnp.asarray(ws[3]))]
    flat = jnp.concatenate([jnp.ravel(w) for w in ws])
    sizes = [w.size for w in ws]

    def unflatten(f):
        pieces = jnp.split(f, np.cumsum(sizes)[:-1])
        return [(pieces[0].reshape(ws[0].shape), pieces[1]), (pieces[2].reshape(ws[2].shape), pieces[3])]

    dense = np.asarray(jax.jit(jax.hessian(lambda f: jax_loss(unflatten(f), (X, y))))(flat))
    torch_batches = [(torch.tensor(a), torch.tensor(b)) for a, b in batches]
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    ops = {
        "torch": st.hessian(TorchMLP(ws), torch.nn.CrossEntropyLoss(), torch_batches),
        "jax": sj.hessian(jax_loss, params, batches, chunk_size=32),
        "tensorflow": stf.hessian(keras_mlp(ws), cross_entropy, batches, chunk_size=32),
    }
    return ops, dense


FRAMEWORKS = ["torch", "jax", "tensorflow"]


def test_same_layout_and_parameters(operators):
    ops, dense = operators
    vectors = [ops[f].ops.to_numpy(ops[f].params_vector()) for f in FRAMEWORKS]
    assert all(H.shape == dense.shape == (610, 610) for H in ops.values())
    assert all(np.array_equal(v, vectors[0]) for v in vectors)


def test_products_agree_and_match_dense(operators):
    ops, dense = operators
    V = np.random.default_rng(1).normal(size=(dense.shape[0], 4))
    products = {f: ops[f].ops.to_numpy(ops[f] @ ops[f].ops.from_numpy(V)) for f in FRAMEWORKS}
    for f in FRAMEWORKS:
        assert rel(products[f], dense @ V) < 1e-10, f
        assert rel(products[f], products["torch"]) < 1e-10, f


def test_top_eigenvalues_agree_and_match_dense(operators):
    ops, dense = operators
    truth = np.linalg.eigvalsh(dense)[::-1][:3]
    found = {}
    for f in FRAMEWORKS:
        result = specops.eigsh(ops[f], k=3, which="LA", tol=1e-9, seed=0)
        assert result.converged.all(), f
        found[f] = np.asarray(result.eigenvalues)
        assert np.max(np.abs(found[f] - truth) / np.abs(truth)) < 1e-8, f
    for f in FRAMEWORKS:
        assert np.max(np.abs(found[f] - found["torch"]) / np.abs(truth)) < 1e-8, f


def test_trace_with_the_same_seed_agrees_and_matches_dense(operators):
    ops, dense = operators
    reference = specops.trace(specops.aslinearoperator(dense), method="hutch++", max_matvecs=30, seed=7)
    for f in FRAMEWORKS:
        estimate = specops.trace(ops[f], method="hutch++", max_matvecs=30, seed=7).estimate
        assert abs(estimate - reference.estimate) < 1e-8 * abs(reference.estimate), f
    assert abs(reference.estimate - np.trace(dense)) < 5 * reference.stderr + 1e-12


def test_flat_vectors_convert_to_per_parameter_arrays_in_every_framework(operators):
    for H in operators[0].values():
        v = H.params_vector()
        arrays = H.unflatten(v)
        assert list(arrays) == list(H.param_blocks)
        for name, a in arrays.items():
            assert tuple(a.shape) == tuple(H.param_shapes[name])
        back = H.flatten(arrays)
        assert np.array_equal(H.ops.to_numpy(back), H.ops.to_numpy(v))
