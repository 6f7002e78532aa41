"""The construction check of the PyTorch engines (specops.checks): defects caught, kinks left alone.

Truths: the dense Hessian of a twin model written with PyTorch's own operations
(``torch.func.hessian``), and the engines' verdicts on a once-differentiable custom
function, a ReLU network and a straight-through estimator.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import specops
from specops import checks
from specops.backends import torch as st


class _Square(torch.autograd.Function):
    """x^2 with a backward that is right for gradients but not differentiable again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Net(nn.Module):
    def __init__(self, custom):
        super().__init__()
        self.a, self.b, self.custom = nn.Linear(4, 5), nn.Linear(5, 3), custom

    def forward(self, x):
        h = self.a(x)
        return self.b(_Square.apply(h) if self.custom else h * h)


def _problem(dtype, custom=True):
    torch.manual_seed(0)
    model = _Net(custom).to(dtype)
    X, y = torch.randn(24, 4, dtype=dtype), torch.randint(0, 3, (24,))
    return model, (X, y)


def _dense_truth(model, batch):
    twin = _Net(False).to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in twin.named_parameters()}
    names = list(params)

    def loss(flat):
        pieces = dict(zip(names, torch.split(flat, [p.numel() for p in params.values()])))
        shaped = {k: pieces[k].view(params[k].shape) for k in names}
        return nn.functional.cross_entropy(torch.func.functional_call(twin, shaped, (batch[0],)), batch[1])

    return torch.func.hessian(loss)(torch.cat([p.reshape(-1) for p in params.values()]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_once_differentiable_function_falls_back_to_finite_differences(dtype):
    model, batch = _problem(dtype)
    with pytest.warns(RuntimeWarning, match="using engine='finite_difference'"):
        H = st.hessian(model, nn.CrossEntropyLoss(), batch)
    check = H.engine_check
    assert H.engine == "finite_difference" and check.verdict == "wrong" and check.requested == "auto"
    assert check.disagreement > 0.1 and check.referee_spread < check.disagreement / 10
    assert "finite_difference" in repr(H) and f"{check.disagreement:.2g}" in repr(H)
    assert H.settings()["engine_check"]["verdict"] == "wrong"
    truth = _dense_truth(model, batch)
    got = H.to_dense()
    rel = float(torch.linalg.norm(torch.as_tensor(got) - truth) / torch.linalg.norm(truth))
    assert rel < (5e-2 if dtype == torch.float32 else 1e-6)


@pytest.mark.parametrize("engine", ["cached_graph", "double_backward"])
def test_an_explicit_engine_found_wrong_raises_naming_finite_differences(engine):
    model, batch = _problem(torch.float32)
    with pytest.raises(ValueError, match="engine='finite_difference'"):
        st.hessian(model, nn.CrossEntropyLoss(), batch, engine=engine)
    H = st.hessian(model, nn.CrossEntropyLoss(), batch, engine=engine, cross_check=False)
    assert H.engine == engine and H.engine_check.verdict == "skipped"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_model_without_the_custom_function_agrees(dtype):
    model, batch = _problem(dtype, custom=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        H = st.hessian(model, nn.CrossEntropyLoss(), batch)
    assert H.engine == "cached_graph" and H.engine_check.verdict == "agree"
    assert H.engine_check.symmetry < H.engine_check.symmetry_threshold


class _StraightThrough(nn.Module):
    def forward(self, x):
        return x + (torch.round(x * 4) / 4 - x).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kink", [nn.ReLU, _StraightThrough])
def test_kinked_models_keep_their_engine(kink, dtype):
    """ReLU networks and straight-through estimators: finite differences cross kinks or jumps and
    disagree with themselves, so they cannot convict the exact engine, which is kept, silently."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), kink(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    batch = (torch.randn(64, 4, dtype=dtype), torch.randint(0, 3, (64,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        H = st.hessian(model, nn.CrossEntropyLoss(), batch)
        assert H.engine == "cached_graph" and H.engine_check.verdict == "agree"  # two exact engines agree
        # the referee alone (as where forward-over-reverse cannot run), on all 64 samples
        H.adapter.engines_agree = None
        check = checks.check_engine(H.adapter, batch)
    assert check.engine == "cached_graph"
    relu64 = kink is nn.ReLU and dtype == torch.float64  # steps of 1e-3 cross no kink here
    assert check.verdict == ("agree" if relu64 else "inconclusive")
    assert (check.referee_spread < checks.CONSISTENT) == relu64


def test_nan_inputs_are_reported_as_nan_data_before_any_engine_comparison():
    model, (X, y) = _problem(torch.float32, custom=False)
    X = X.clone()
    X[2, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning blaming an engine comes first
        with pytest.raises(specops.NonFiniteError, match="loss is not finite for batch 0"):
            st.hessian(model, nn.CrossEntropyLoss(), (X, y))


def test_a_rebuild_reuses_the_verdicts_and_a_switch_carries_over():
    model, batch = _problem(torch.float64)
    with pytest.warns(RuntimeWarning):
        H = st.hessian(model, nn.CrossEntropyLoss(), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # said once, on the first build
        again = st.hessian(model, nn.CrossEntropyLoss(), batch)
    assert again.engine == "finite_difference" and again.engine_check.carried_over
    assert again.num_matvecs == 0 and again.engine_check.disagreement == H.engine_check.disagreement


def test_the_precision_check_installs_no_global_hooks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.modules.module, "register_module_forward_hook",
                        lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch.nn.modules.module, "register_module_forward_pre_hook",
                        lambda *a, **k: calls.append(a))
    model, batch = _problem(torch.float64, custom=False)
    st.hessian(model, nn.CrossEntropyLoss(), batch)
    assert not calls
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
