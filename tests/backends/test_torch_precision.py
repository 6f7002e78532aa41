"""Half-precision models and autocast: products in the low precision, float32 vectors, against
the float64 Hessian of the same model."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F
from torch import nn
from torch_truth import dense_truth, pair_loss, rel

import specops
from specops.backends import torch as st


def upcast_ce(outputs, targets):
    return F.cross_entropy(outputs.to(torch.promote_types(outputs.dtype, torch.float32)), targets)


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    batch = (torch.randn(32, 6), torch.randint(0, 4, (32,)))
    m64 = copy.deepcopy(model).double()
    D = dense_truth(m64, pair_loss(upcast_ce, (batch[0].double(), batch[1])))
    return model, batch, D


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_model_products_and_top_eigenvalue(dtype, tol):
    model, batch, D = setup()
    H = st.hessian(model.to(dtype), upcast_ce, batch)
    assert H.adapter.param_dtype == dtype and str(H.dtype) == "float32"
    V = torch.randn(D.shape[0], 3)
    HV = H @ V
    assert HV.dtype == torch.float32
    err = rel(HV, D @ V.double().numpy())
    assert 1e-5 < err < tol  # the half precision shows, within its rounding
    assert H.adapter.cross_check_error < 10 * tol
    top = specops.eigsh(H, k=1, tol=1e-2)
    exact = float(torch.linalg.eigvalsh(torch.as_tensor(D))[-1])
    assert abs(float(top.eigenvalues[0]) - exact) <= tol * abs(exact)


def test_autocast_runs_products_in_bfloat16():
    model, batch, D = setup()
    V = torch.randn(D.shape[0], 2)
    exact = D @ V.double().numpy()
    full = rel(st.hessian(model, upcast_ce, batch) @ V, exact)
    mixed = st.hessian(model, upcast_ce, batch, autocast=torch.bfloat16)
    assert mixed.adapter.compute_dtype == torch.bfloat16
    err = rel(mixed @ V, exact)
    assert full < 1e-5 < err < 3e-2
    with pytest.raises(ValueError, match="already torch.bfloat16"):
        st.hessian(model.to(torch.bfloat16), upcast_ce, batch, autocast=torch.bfloat16)
