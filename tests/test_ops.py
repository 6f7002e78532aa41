"""Every backend's vector operations against NumPy: one test for the whole protocol."""

import importlib

import numpy as np
import pytest

import specops.random


def _ops(name):
    if name == "numpy":
        from specops.backends.numpy import NumpyOps

        return NumpyOps(np.float64)
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
    else:
        pytest.importorskip(name)
    module = importlib.import_module(f"specops.backends.{name}")
    cls = {"torch": "TorchOps", "jax": "JaxOps", "tensorflow": "TFOps"}[name]
    return getattr(module, cls)(np.float64)


@pytest.fixture(params=["numpy", "torch", "jax", "tensorflow"])
def ops(request):
    return _ops(request.param)


def close(a, b, tol=1e-13):
    a = np.asarray(a, dtype=np.float64)
    return np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_protocol_matches_numpy(ops):
    rng = np.random.default_rng(5)
    X, Y, C = rng.normal(size=(9, 3)), rng.normal(size=(9, 2)), rng.normal(size=(3, 2))
    nX, nY = ops.from_numpy(X), ops.from_numpy(Y)
    assert ops.is_native(nX) and (ops.name == "numpy" or not ops.is_native(X))
    assert close(ops.to_numpy(nX), X)
    assert close(ops.to_numpy(ops.inner(nX, nY)), X.T @ Y)
    assert close(ops.to_numpy(ops.combine(nX, C)), X @ C)
    assert close(ops.column_norms(nX), np.linalg.norm(X, axis=0))
    assert close(ops.column_dots(nX, nX), (X * X).sum(0))
    assert close(ops.to_numpy(ops.row_sums(nX)), X.sum(1))
    assert close(ops.to_numpy(ops.scale_columns(nX, [1.0, 2.0, 3.0])), X * [1, 2, 3])
    assert ops.dot(nX[:, 0], nX[:, 1]) == pytest.approx(X[:, 0] @ X[:, 1], rel=1e-13)
    assert ops.norm(nX[:, 0]) == pytest.approx(np.linalg.norm(X[:, 0]), rel=1e-13)
    assert close(ops.to_numpy(ops.einsum("ij,ij->j", nX, nX)), (X * X).sum(0))
    assert ops.to_numpy(ops.concat([ops.zeros((2, 3)), nX], axis=0)).shape == (11, 3)
    assert close(ops.to_numpy(ops.identity_columns(4, 1, 3)), np.eye(4)[:, 1:3])
    # QR, orthonormalization and CGS2 orthogonalization
    Q, R = ops.qr(nX)
    assert close(ops.to_numpy(Q) @ ops.to_numpy(R), X, 1e-12)
    Q1, R1 = ops.orthonormalize(nX[:, :1])
    assert close(ops.to_numpy(Q1)[:, 0] * R1[0, 0], X[:, 0], 1e-12)
    W, coef = ops.orthogonalize(nY, Q)
    assert np.abs(ops.to_numpy(ops.inner(Q, W))).max() < 1e-13
    assert close(coef, ops.to_numpy(Q).T @ Y, 1e-12)
    # finiteness, seeded probes identical on every backend
    assert ops.all_finite(nX) and not ops.all_finite(ops.from_numpy([1.0, np.inf]))
    assert np.array_equal(ops.to_numpy(ops.random(9, range(2), 7)), specops.random.probes(9, range(2), 7))
    assert np.array_equal(ops.to_numpy(ops.random(9, [1], 7, distribution="normal")),
                          specops.random.probes(9, [1], 7, distribution="normal"))


def test_write_block_along_both_axes(ops):
    buf = ops.zeros((4, 5))
    buf = ops.write_block(buf, 2, ops.from_numpy(np.ones((4, 2))))
    expected = np.zeros((4, 5))
    expected[:, 2:4] = 1
    assert close(ops.to_numpy(buf), expected)
    cube = ops.write_block(ops.zeros((3, 4, 2)), 1, ops.from_numpy(np.full((1, 4, 2), 7.0)), axis=0)
    expected = np.zeros((3, 4, 2))
    expected[1] = 7
    assert close(ops.to_numpy(cube), expected)


def test_only_float32_and_float64():
    from specops.backends.numpy import NumpyOps

    with pytest.raises(TypeError, match="float32 or float64"):
        NumpyOps(np.int64)


def test_free_memory_is_the_host_s_unless_a_backend_overrides_it(monkeypatch):
    """The core asks no backend name: TorchOps overrides free_memory for CUDA devices."""
    torch = pytest.importorskip("torch")
    from specops.backends.torch import TorchOps
    from specops.backends.numpy import NumpyOps

    monkeypatch.setattr("specops.ops.host_free_memory", lambda: 777)
    assert NumpyOps(np.float64).free_memory() == 777
    cpu = TorchOps(torch.float32, "cpu")
    assert cpu.free_memory() == 777
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (123, 456))
    cuda = TorchOps(torch.float32, "cuda:0")   # no CUDA needed to build it: nothing is allocated
    assert cuda.free_memory() == 123
