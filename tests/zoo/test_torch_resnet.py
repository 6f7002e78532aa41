"""The CIFAR ResNet family: architecture, toggles, and its Hessian blocks against dense truth."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn

from specops.backends import torch as st
from specops.zoo.torch_resnet import resnet


def test_resnet20_layout():
    model = resnet(20)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # + the linear head = 20 weighted layers
    assert [len(getattr(model, f"stage{s}")) for s in (1, 2, 3)] == [3, 3, 3]
    assert [getattr(model, f"stage{s}")[0].conv1.out_channels for s in (1, 2, 3)] == [16, 32, 64]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_toggles(batch_norm, residual):
    model = resnet(8, batch_norm=batch_norm, residual=residual, in_channels=1, num_classes=4, width=4)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    has_projection = any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert has_bn == batch_norm and has_projection == residual
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 4)


def test_residual_toggle_changes_the_function():
    torch.manual_seed(0)
    a = resnet(8, residual=True, width=4).eval()
    b = resnet(8, residual=False, width=4).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "shortcut" not in k})
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(a(x), b(x))


def test_bad_depth():
    with pytest.raises(ValueError, match="6 n \\+ 2"):
        resnet(21)


def test_stage_block_of_the_hessian_matches_dense():
    torch.manual_seed(0)
    model = resnet(8, width=2, in_channels=1, num_classes=3).double()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8, dtype=torch.float64))  # non-default running statistics
    model.eval()
    X = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    H = st.hessian(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])])
    block = H.restrict("stage3")
    names = list(block.param_blocks)
    assert names and all(n.startswith("stage3.") for n in names)

    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        pieces = flat.split([params[n].numel() for n in names])
        state = {n: p.detach() for n, p in params.items()}
        state.update({n: t.reshape(params[n].shape) for n, t in zip(names, pieces)})
        state.update(dict(model.named_buffers()))
        return loss_fn(torch.func.functional_call(model, state, (X,)), y)

    dense = torch.func.hessian(f)(theta).numpy()
    V = torch.randn(theta.numel(), 3, dtype=torch.float64)
    err = np.linalg.norm((block @ V).numpy() - dense @ V.numpy()) / np.linalg.norm(dense @ V.numpy())
    assert err < 1e-6
    assert list(st.hessian(model, loss_fn, (X, y), wrt="stage3").param_blocks) == names
