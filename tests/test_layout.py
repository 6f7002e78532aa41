"""The shared parameter layout: offsets, selection, flatten / unflatten of vectors and
blocks, and each backend's parameter structure (``H.as_params``), checked against the
frameworks' own flattening (``ravel_pytree``, ``named_parameters``, ``trainable_variables``)."""

import numpy as np
import pytest

from specops.layout import ParamLayout

from specops.backends.numpy import NumpyOps


def test_offsets_and_sizes():
    layout = ParamLayout(["a", "b", "c"], [(2, 3), (), (4,)])
    assert layout.blocks == {"a": slice(0, 6), "b": slice(6, 7), "c": slice(7, 11)}
    assert layout.num_params == 11 and layout.sizes == [6, 1, 4]
    assert layout.subset(["c", "a"]).names == ["a", "c"]  # layout order kept
    assert layout.select("a*") == ["a"]


def test_bad_layouts_and_arrays():
    with pytest.raises(ValueError, match="repeat"):
        ParamLayout(["a", "a"], [(1,), (2,)])
    with pytest.raises(ValueError, match="2 names but 1 shapes"):
        ParamLayout(["a", "b"], [(1,)])
    layout, ops = ParamLayout(["w", "b"], [(2, 2), (2,)]), NumpyOps()
    with pytest.raises(KeyError, match="missing parameters: b"):
        layout.flatten({"w": np.zeros((2, 2))}, ops)
    with pytest.raises(KeyError, match="not parameters of this operator: bias"):
        layout.flatten({"w": np.zeros((2, 2)), "b": np.zeros(2), "bias": np.zeros(2)}, ops)
    with pytest.raises(ValueError, match="'b': expected shape \\(2,\\), got \\(3,\\)"):
        layout.flatten({"w": np.zeros((2, 2)), "b": np.zeros(3)}, ops)
    with pytest.raises(ValueError, match="expected a flat vector \\(6,\\)"):
        layout.unflatten(np.zeros(5), ops)
    with pytest.raises(KeyError, match="unknown parameters: x"):
        layout.subset(["x"])


def test_vector_and_block_round_trip():
    rng = np.random.default_rng(0)
    layout, ops = ParamLayout(["w", "s", "b"], [(3, 2), (), (4,)]), NumpyOps()
    V = rng.standard_normal((11, 5))
    pieces = layout.unflatten(V, ops)
    assert {n: p.shape for n, p in pieces.items()} == {"w": (5, 3, 2), "s": (5,), "b": (5, 4)}
    for j in range(5):  # column j of the block is the unflattened column j
        col = layout.unflatten(V[:, j], ops)
        for n in layout.names:
            np.testing.assert_array_equal(pieces[n][j], col[n])
    np.testing.assert_array_equal(pieces["w"][2], V[0:6, 2].reshape(3, 2))
    np.testing.assert_array_equal(layout.flatten(pieces, ops), V)
    np.testing.assert_array_equal(layout.flatten(list(pieces.values()), ops), V)
    np.testing.assert_array_equal(layout.flatten(layout.unflatten(V[:, 0], ops), ops), V[:, 0])


def test_torch_parameter_structure():
    torch = pytest.importorskip("torch")
    from specops.backends import torch as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    H = st.hessian(model, torch.nn.CrossEntropyLoss(), (X, y))
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    pieces = H.as_params(V)
    offset = 0
    for name, p in model.named_parameters():  # torch's own order and shapes
        block = V[offset: offset + p.numel()]
        assert torch.equal(pieces[name], block.T.reshape(3, *p.shape))
        offset += p.numel()
    assert torch.equal(H.flatten(pieces), V)
    assert torch.equal(H.flatten(H.unflatten(V[:, 1])), V[:, 1])
    sub = st.hessian(model, torch.nn.CrossEntropyLoss(), (X, y), wrt="2.*")
    assert list(sub.param_blocks) == ["2.weight", "2.bias"]
    with pytest.raises(TypeError, match="with an nn.Module, select the parameters differentiated with wrt="):
        st.hessian(model, torch.nn.CrossEntropyLoss(), (X, y), params="2.*")
    with pytest.raises(TypeError, match="hvp"):  # the former name of engine=: gone, Python's own error
        st.hessian(model, torch.nn.CrossEntropyLoss(), (X, y), hvp="auto")  # vocab: keep


def test_jax_parameter_structure():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from specops.backends import jax as sj

    key = jax.random.PRNGKey(0)
    params = {"dense": {"w": jax.random.normal(key, (3, 4)), "b": jnp.zeros(4)}, "out": jnp.ones((4, 2))}
    X, y = jax.random.normal(key, (6, 3)), jax.random.normal(key, (6, 2))

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["dense"]["w"] + p["dense"]["b"]) @ p["out"] - batch[1]) ** 2)

    H = sj.hessian(loss, params, (X, y))
    v = jax.random.normal(key, (H.shape[0],))
    _, unravel = ravel_pytree(params)  # JAX's own flattening, the same leaf order
    tree = H.as_params(v)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(unravel(v))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    V = jax.random.normal(key, (H.shape[0], 2))
    block = H.as_params(V)
    assert block["dense"]["w"].shape == (2, 3, 4)
    np.testing.assert_array_equal(np.asarray(block["out"][1]), np.asarray(unravel(V[:, 1])["out"]))
    # a selection: the other leaves are zeros in the full structure
    Hs = sj.hessian(loss, params, (X, y), wrt="out")
    ts = Hs.as_params(jnp.arange(8.0))
    np.testing.assert_array_equal(np.asarray(ts["dense"]["w"]), np.zeros((3, 4)))
    np.testing.assert_array_equal(np.asarray(ts["out"]), np.arange(8.0).reshape(4, 2))


def test_keras_parameter_structure():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from specops.backends import tensorflow as stf

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.Dense(2, dtype="float64")])
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    loss = keras.losses.MeanSquaredError(dtype="float64")
    H = stf.hessian(model, loss, (X, y))
    V = tf.constant(rng.standard_normal((H.shape[0], 2)))
    out = H.as_params(V)
    assert [tuple(t.shape) for t in out] == [(2, *v.shape) for v in model.trainable_variables]
    offset = 0
    for t, var in zip(out, model.trainable_variables):
        size = int(np.prod(var.shape))
        np.testing.assert_array_equal(t.numpy()[1], V.numpy()[offset: offset + size, 1].reshape(var.shape))
        offset += size
    Hs = stf.hessian(model, loss, (X, y), wrt=model.layers[1])
    single = Hs.as_params(tf.ones(Hs.shape[0], dtype=tf.float64))
    assert len(single) == len(model.trainable_variables)
    assert np.all(single[0].numpy() == 0) and np.all(single[2].numpy() == 1)


def test_single_vector_products_equal_one_column_blocks():
    """``H @ v`` goes through the adapter's single-vector product (compiled without reshapes
    in JAX); it equals the block product and counts one product, for the Hessian and a GGN."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from specops.backends import jax as sj

    key = jax.random.PRNGKey(1)
    params = {"w": jax.random.normal(key, (3, 2)), "b": jnp.zeros(2)}
    X, y = jax.random.normal(key, (5, 3)), jax.random.normal(key, (5, 2))

    def apply(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    def loss(p, batch):
        return jnp.mean((apply(p, batch[0]) - batch[1]) ** 2)

    batches = [(X[:3], y[:3]), (X[3:], y[3:])]  # weights 3/5 and 2/5
    for H in (sj.hessian(loss, params, batches),
              sj.ggn(apply, lambda out, t: jnp.mean((out - t) ** 2), params, batches)):
        v = jax.random.normal(key, (H.shape[0],))
        before = H.num_matvecs
        hv = H @ v
        assert H.num_matvecs == before + 1 and hv.shape == v.shape
        np.testing.assert_allclose(np.asarray(hv), np.asarray(H.matmat(v[:, None])[:, 0]), rtol=1e-6, atol=1e-7)
        dense = H.to_dense()
        np.testing.assert_allclose(np.asarray(hv), dense @ np.asarray(v), rtol=1e-5, atol=1e-6)
