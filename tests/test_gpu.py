"""GPU checks: the same operator on the GPU and on the CPU gives the same results.

Skipped on machines without a CUDA device (CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py``. Vectors must stay on the device and the seeded
algorithms must agree with the CPU run to float64 rounding.
"""

import numpy as np
import pytest

from numpy_models import digits

torch = pytest.importorskip("torch")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _torch_problem(device):
    import specops as so  # noqa: F401
    from specops.backends import torch as st

    X, y = digits(256)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.Tanh(), torch.nn.Linear(24, 10)).double()
    model = model.to(device).eval()
    Xt = torch.tensor(X, dtype=torch.float64)
    yt = torch.tensor(y)
    data = [(Xt[:100], yt[:100]), (Xt[100:], yt[100:])]
    return st.hessian(model, torch.nn.functional.cross_entropy, data)


@cuda
def test_torch_cuda_matches_cpu():
    import specops as so

    Hg, Hc = _torch_problem("cuda"), _torch_problem("cpu")
    assert Hg.device.startswith("cuda")
    V = torch.randn(Hc.shape[0], 4, dtype=torch.float64)
    np.testing.assert_allclose((Hg @ V.cuda()).cpu().numpy(), (Hc @ V).numpy(), rtol=1e-9, atol=1e-12)
    rg, rc = so.eigsh(Hg, k=3, tol=1e-10), so.eigsh(Hc, k=3, tol=1e-10)
    assert rg.eigenvectors.device.type == "cuda"
    np.testing.assert_allclose(rg.eigenvalues, rc.eigenvalues, rtol=1e-9)
    tg, tc = so.trace(Hg, max_matvecs=30, seed=3), so.trace(Hc, max_matvecs=30, seed=3)
    assert tg.estimate == pytest.approx(tc.estimate, rel=1e-9)
    dg, dc = so.spectral_density(Hg, 4, 20, seed=1), so.spectral_density(Hc, 4, 20, seed=1)
    np.testing.assert_allclose(dg.nodes, dc.nodes, rtol=1e-7, atol=1e-9)


@cuda
def test_torch_cuda_float32_converges():
    import specops as so
    from specops.backends import torch as st

    X, y = digits(512)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).cuda().eval()
    data = (torch.tensor(X, dtype=torch.float32), torch.tensor(y))
    H = st.hessian(model, torch.nn.functional.cross_entropy, data)
    res = so.eigsh(H, k=5, tol=1e-4)
    assert res.all_converged
    dense = torch.func.hessian(lambda th: H.adapter._loss(th, H.adapter._prepare(data)))(H.params_vector())
    top = torch.linalg.eigvalsh(dense.double()).cpu().numpy()[::-1][:5]
    np.testing.assert_allclose(res.eigenvalues, top, rtol=1e-3)


def _jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        return [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:
        return []


def test_jax_gpu_matches_cpu():
    gpus = _jax_gpu()
    if not gpus:
        pytest.skip("no JAX GPU device")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import specops as so
    from specops.backends import jax as sj

    X, y = digits(256)
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(0, 0.3, (64, 24)), "b1": np.zeros(24), "w2": rng.normal(0, 0.3, (24, 10))}

    def loss(p, batch):
        xb, yb = batch
        logits = jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(yb.shape[0]), yb])

    ops = {}
    for name, dev in (("gpu", gpus[0]), ("cpu", jax.devices("cpu")[0])):
        p = jax.device_put(jax.tree_util.tree_map(jnp.asarray, params), dev)
        data = jax.device_put((jnp.asarray(X), jnp.asarray(y)), dev)
        ops[name] = sj.hessian(loss, p, data)
    assert ops["gpu"].device.startswith("gpu") or ops["gpu"].device.startswith("cuda")
    rg, rc = so.eigsh(ops["gpu"], k=3, tol=1e-10), so.eigsh(ops["cpu"], k=3, tol=1e-10)
    np.testing.assert_allclose(rg.eigenvalues, rc.eigenvalues, rtol=1e-8)
    tg, tc = so.trace(ops["gpu"], max_matvecs=30, seed=3), so.trace(ops["cpu"], max_matvecs=30, seed=3)
    assert tg.estimate == pytest.approx(tc.estimate, rel=1e-8)
