"""Every PyTorch product engine against dense truth on the layers of today's models.

The truth (``torch_truth.dense_truth``) is PyTorch's plain double backward, column by column,
itself checked against central differences of gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn
from torch_truth import pair_loss, rel
from torch_truth import dense_truth as _dense

from specops.backends import torch as st

ENGINES = ["cached_graph", "double_backward", "forward_over_reverse"]
F64 = torch.float64


def dense_truth(model, loss_fn, batch):
    return _dense(model, pair_loss(loss_fn, batch))


class Attention(nn.Module):
    """Softmax attention written out (no fused kernel), with a norm before it."""

    def __init__(self, d=6, norm=nn.LayerNorm):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.norm = norm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(self.norm(h)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.head((h + att @ v).mean(1))


def conv_net(norm):
    return nn.Sequential(nn.Conv2d(2, 4, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))


MODELS = {
    "layer_norm_attention": lambda: (Attention(norm=nn.LayerNorm), (5, 4, 3)),
    "rms_norm_attention": lambda: (Attention(norm=nn.RMSNorm), (5, 4, 3)),
    "multihead_attention": lambda: (MHA(), (5, 4, 3)),
    "group_norm": lambda: (conv_net(nn.GroupNorm(2, 4)), (5, 2, 5, 5)),
    "batch_norm_eval": lambda: (conv_net(nn.BatchNorm2d(4)).eval(), (5, 2, 5, 5)),
    "batch_norm_train": lambda: (conv_net(nn.BatchNorm2d(4)), (5, 2, 5, 5)),
}


class MHA(nn.Module):
    """``nn.MultiheadAttention`` (scaled_dot_product_attention inside) after a layer norm."""

    def __init__(self, d=6):
        super().__init__()
        self.embed, self.norm = nn.Linear(3, d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.embed(x)
        a = self.norm(h)
        return self.head((h + self.attn(a, a, a, need_weights=False)[0]).mean(1))


def _model(name):
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model = model.double()
    if name == "batch_norm_eval":  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():  # norm affine parameters away from 1 and 0
        for n, p in model.named_parameters():
            if n.startswith("norm") or n.startswith("1."):
                p.add_(0.3 * torch.randn_like(p))
    batch = (torch.randn(*shape, dtype=F64), torch.randint(0, 2, (shape[0],)))
    return model, batch


@pytest.mark.parametrize("name", list(MODELS))
def test_every_engine_matches_dense_truth(name):
    model, batch = _model(name)
    loss_fn = nn.CrossEntropyLoss()
    D = dense_truth(model, loss_fn, batch)
    n = D.shape[0]
    V = torch.randn(n, 3, dtype=F64)
    for engine in ENGINES:
        H = st.hessian(model, loss_fn, batch, engine=engine)
        assert H.adapter.cross_check_error < 1e-10
        assert rel(H @ V, D @ V.numpy()) < 1e-9, engine
        assert rel(H @ V[:, 0], D @ V[:, 0].numpy()) < 1e-9, engine


def test_mse_loss_under_forward_over_reverse():
    """The target gets a materialized zero tangent (mse_loss' backward writes into it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64))
    D = dense_truth(model, nn.MSELoss(), batch)
    V = torch.randn(D.shape[0], 4, dtype=F64)
    H = st.hessian(model, nn.MSELoss(), batch, engine="forward_over_reverse")
    assert rel(H @ V, D @ V.numpy()) < 1e-9


def _jvp_of_jacrev(self, batch, V):
    """The previous forward-over-reverse (jvp of jacrev): PyTorch's layer-norm defect."""
    grad = torch.func.jacrev(lambda theta: self._loss(theta, batch))

    def hv(v):
        return torch.func.jvp(grad, (self._theta,), (v,))[1]

    return torch.func.vmap(hv, in_dims=1, out_dims=1)(V)


def test_jvp_of_jacrev_is_wrong_on_layer_norm():
    """The defect the engine avoids, against the dense truth (so the test above can fail)."""
    model, batch = _model("layer_norm_attention")
    D = dense_truth(model, nn.CrossEntropyLoss(), batch)
    A = st.TorchAdapter(model, nn.CrossEntropyLoss(), engine="forward_over_reverse")
    V = torch.randn(D.shape[0], 2, dtype=F64)
    assert rel(_jvp_of_jacrev(A, A._prepare(batch), V), D @ V.numpy()) > 1e-3


def test_cross_check_falls_back_from_a_wrong_engine_and_names_the_layer(monkeypatch):
    model, batch = _model("layer_norm_attention")
    D = dense_truth(model, nn.CrossEntropyLoss(), batch)
    monkeypatch.setattr(st.TorchAdapter, "_forward_over_reverse", _jvp_of_jacrev)
    # auto with vectorized blocks (as on a GPU): the defective engine is dropped, with a warning
    A = st.TorchAdapter(model, nn.CrossEntropyLoss())
    A._vectorize_columns = True
    with pytest.warns(RuntimeWarning, match=r"norm\.weight \(LayerNorm.*side with reverse_over_reverse.*using cached_graph instead"):
        A.cross_check(batch)
    assert not A._vectorize_columns and A.cross_check_error > 1e-3
    V = torch.randn(D.shape[0], 3, dtype=F64)
    assert rel(A.hvp(0, batch, V), D @ V.numpy()) < 1e-9
    # asked for explicitly: an error naming the engine that agrees with finite differences
    with pytest.raises(ValueError, match="engine='double_backward'"):
        st.hessian(model, nn.CrossEntropyLoss(), batch, engine="forward_over_reverse")
    H = st.hessian(model, nn.CrossEntropyLoss(), batch, engine="forward_over_reverse", cross_check=False)
    assert H.engine == "forward_over_reverse"


def test_cross_check_switches_auto_to_forward_over_reverse_when_double_backward_is_wrong(monkeypatch):
    model, batch = _model("group_norm")
    D = dense_truth(model, nn.CrossEntropyLoss(), batch)
    original = st.TorchAdapter._double_backward

    def wrong(theta, g, V, keep):  # a reverse-over-reverse defect in the first layer's weights
        out = original(theta, g, V, keep)
        out[:10] *= 1.1
        return out

    monkeypatch.setattr(st.TorchAdapter, "_double_backward", staticmethod(wrong))
    with pytest.warns(RuntimeWarning, match=r"0\.weight \(Conv2d.*using forward_over_reverse instead"):
        H = st.hessian(model, nn.CrossEntropyLoss(), batch)
    assert H.engine == "forward_over_reverse"
    V = torch.randn(D.shape[0], 2, dtype=F64)
    assert rel(H @ V, D @ V.numpy()) < 1e-9
    assert H.restrict("4.*").engine == "forward_over_reverse"


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).mean(1))


@pytest.mark.parametrize("engine", ENGINES)
def test_embedding_padding_row_is_frozen_and_products_are_symmetric(engine):
    """PyTorch's gradient leaves padding_idx's row out; double backward alone is then asymmetric."""
    torch.manual_seed(0)
    model = Tokens().double()
    with torch.no_grad():
        model.embed.weight[0] = 0.5  # a padding row the loss depends on
    batch = (torch.tensor([[0, 1, 2], [3, 0, 4], [1, 1, 0]]), torch.tensor([0, 1, 1]))
    D = dense_truth(model, nn.CrossEntropyLoss(), batch)
    assert np.abs(D[:3]).max() == 0 and np.abs(D[:, :3]).max() == 0
    H = st.hessian(model, nn.CrossEntropyLoss(), batch, engine=engine)
    V = torch.randn(D.shape[0], 2, dtype=F64)
    HV = H @ V
    assert rel(HV, D @ V.numpy()) < 1e-12
    assert float(V[:, 0] @ HV[:, 1]) == pytest.approx(float(V[:, 1] @ HV[:, 0]), rel=1e-12)


def test_cross_check_keeps_reverse_over_reverse_when_finite_differences_cannot_tell(monkeypatch):
    model, batch = _model("group_norm")
    original = st.TorchAdapter._forward_over_reverse

    def off(self, batch, V):
        return original(self, batch, V) * 1.01

    def halfway(self, batch, V, richardson=False, step_factor=1.0):  # a referee between the two
        return (self._reverse_over_reverse(batch, V) + off(self, batch, V)) / 2, None

    monkeypatch.setattr(st.TorchAdapter, "_forward_over_reverse", off)
    monkeypatch.setattr(st.TorchAdapter, "_finite_difference", halfway)
    A = st.TorchAdapter(model, nn.CrossEntropyLoss())
    A._vectorize_columns = True
    with pytest.warns(RuntimeWarning, match="cannot tell which is right"):
        A.cross_check(batch)
    assert A.engine == "cached_graph" and not A._vectorize_columns
