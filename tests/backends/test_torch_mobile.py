"""Mobile networks built by hand (torchvision does not import here): MobileNetV3 blocks with
hardswish and a hardsigmoid squeeze-excitation (PyTorch has no double backward for
hardsigmoid), and an EfficientNet-style block with SiLU and a sigmoid gate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn
from torch_truth import finite_difference_truth, pair_loss, rel

from specops.backends import torch as st

ENGINES = ["auto", "double_backward", "forward_over_reverse"]


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze, gate):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.gate = gate

    def forward(self, x):
        s = self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1))))
        return x * self.gate(s)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, squeeze-excite, project (1x1), residual; batch norm each."""

    def __init__(self, channels=4, expand=8, act=nn.Hardswish, gate=nn.Hardsigmoid):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, expand, 1, bias=False), nn.BatchNorm2d(expand), act())
        self.depthwise = nn.Sequential(nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False),
                                       nn.BatchNorm2d(expand), act())
        self.se = SqueezeExcitation(expand, 4, gate())
        self.project = nn.Sequential(nn.Conv2d(expand, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.se(self.depthwise(self.expand(x))))


def mobile(act, gate):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), act(inplace=True),
        InvertedResidual(act=act, gate=gate), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), act(), nn.Linear(6, 3),
    ).double().eval()
    with torch.no_grad():  # running statistics and affine parameters away from the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("kind", ["mobilenet_v3", "efficientnet"])
def test_mobile_blocks_match_finite_differences_for_every_engine(kind):
    act, gate = (nn.Hardswish, nn.Hardsigmoid) if kind == "mobilenet_v3" else (nn.SiLU, nn.Sigmoid)
    model = mobile(act, gate)
    batch = (torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,)))
    loss_fn = nn.CrossEntropyLoss()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    truth = finite_difference_truth(model, pair_loss(loss_fn, batch), V)
    products = {}
    for engine in ENGINES:
        H = st.hessian(model, loss_fn, batch, engine=engine)
        assert H.adapter.cross_check_error < 1e-12
        products[engine] = H @ V
        assert rel(products[engine], truth) < 1e-6, engine
    assert rel(products["double_backward"], products["forward_over_reverse"]) < 1e-12


def test_hardsigmoid_formula_matches_the_kernel_including_in_place():
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    assert torch.equal(st._hardsigmoid(x), nn.functional.hardsigmoid(x))
    y = x.clone()
    out = st._hardsigmoid(y, inplace=True)
    assert out is y and torch.equal(y, nn.functional.hardsigmoid(x))


def test_without_a_double_backward_the_error_offers_finite_differences(monkeypatch):
    model = mobile(nn.Hardswish, nn.Hardsigmoid)
    batch = (torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,)))
    loss_fn = nn.CrossEntropyLoss()
    monkeypatch.setattr(st.formulas, "_SECOND_ORDER", {})  # PyTorch's own hardsigmoid
    with pytest.raises(RuntimeError, match=r"(?s)hardsigmoid_backward.*engine='finite_difference'"):
        st.hessian(model, loss_fn, batch)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    truth = finite_difference_truth(model, pair_loss(loss_fn, batch), V)
    for richardson, tol in ((False, 1e-4), (True, 1e-6)):
        H = st.hessian(model, loss_fn, batch, engine="finite_difference", richardson=richardson)
        assert H.engine == "finite_difference" and rel(H @ V, truth) < tol
