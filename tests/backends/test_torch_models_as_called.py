"""Models as users call them: a forward taking the input dict whole, functional models, torch.compile.

Truth: ``torch.func.hessian`` of the loss written directly in the parameters.
"""

import warnings

import pytest
import torch
from torch import nn

from specops.backends import torch as st

F64 = torch.float64


def _dense(loss, params):
    names = list(params)
    sizes = [p.numel() for p in params.values()]

    def flat_loss(flat):
        pieces = dict(zip(names, torch.split(flat, sizes)))
        return loss({n: pieces[n].view(params[n].shape) for n in names})

    return torch.func.hessian(flat_loss)(torch.cat([p.detach().reshape(-1) for p in params.values()]))


def _rel(H, truth):
    return float(torch.linalg.norm(torch.as_tensor(H.to_dense()) - truth) / torch.linalg.norm(truth))


class _DictForward(nn.Module):
    """curvlinops' convention: forward(X) with X a dict."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, X):
        return torch.tanh(self.lin(X["x"])) * X["scale"]


class _KeywordForward(_DictForward):
    """Hugging Face's convention: forward(x=..., scale=...)."""

    def forward(self, x, scale=None):
        return torch.tanh(self.lin(x)) * scale


@pytest.mark.parametrize("cls", [_DictForward, _KeywordForward])
def test_a_dict_of_inputs_reaches_forward_as_its_signature_takes_it(cls):
    torch.manual_seed(0)
    model = cls().to(F64)
    X = {"x": torch.randn(10, 4, dtype=F64), "scale": torch.rand(10, 1, dtype=F64) + 0.5}
    y = torch.randint(0, 3, (10,))
    H = st.hessian(model, nn.CrossEntropyLoss(), (X, y))
    params = dict(model.named_parameters())

    def loss(p):
        out = torch.tanh(X["x"] @ p["lin.weight"].T + p["lin.bias"]) * X["scale"]
        return nn.functional.cross_entropy(out, y)

    assert _rel(H, _dense(loss, params)) < 1e-12


def test_a_functional_model_with_a_parameter_dict():
    torch.manual_seed(1)
    params = {"w": torch.randn(4, 5, dtype=F64), "v": torch.randn(5, 3, dtype=F64)}
    before = {k: t.clone() for k, t in params.items()}
    X, y = torch.randn(12, 4, dtype=F64), torch.randint(0, 3, (12,))

    def f(p, inputs):
        return torch.tanh(inputs @ p["w"]) @ p["v"]

    H = st.hessian(f, nn.CrossEntropyLoss(), (X, y), params=params)
    assert list(H.param_blocks) == ["w", "v"]
    assert _rel(H, _dense(lambda p: nn.functional.cross_entropy(f(p, X), y), params)) < 1e-12
    assert all(torch.equal(params[k], before[k]) for k in params)
    with pytest.raises(TypeError, match=r"params=\{name: tensor\}"):
        st.hessian(f, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="cannot hold dots"):
        st.hessian(f, nn.CrossEntropyLoss(), (X, y), params={"a.w": params["w"]})


@pytest.mark.parametrize("engine", ["cached_graph", "auto", "forward_over_reverse"])
def test_a_compiled_model_gets_the_engine_asked_for_whatever_ran_before(engine):
    """torch.compile'd modules are differentiated through the module they wrap: an explicit
    cached_graph used to fail in a fresh process ("compiled with non-empty donated buffers",
    or no double backward under aot_autograd) and work after an auto build."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    X, y = torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "global hooks" warning
        warnings.simplefilter("error", RuntimeWarning)  # no engine warning
        H = st.hessian(torch.compile(model), nn.CrossEntropyLoss(), (X, y), engine=engine)
    assert H.engine == ("cached_graph" if engine == "auto" else engine)
    eager = st.hessian(model, nn.CrossEntropyLoss(), (X, y))
    assert list(H.param_blocks) == list(eager.param_blocks)
    truth = torch.as_tensor(eager.to_dense())
    assert float(torch.linalg.norm(torch.as_tensor(H.to_dense()) - truth) / torch.linalg.norm(truth)) < 1e-12
