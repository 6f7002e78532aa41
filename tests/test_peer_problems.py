"""The kinds of problems curvlinops' test suite builds, each against its own dense reference.

Reductions "mean" and "sum", unequal batches, extra output axes for cross-entropy
(PyTorch's class axis 1), squared error and binary cross-entropy, a CNN with
segmentation outputs, weight sharing, dict inputs and ``ignore_index``; for the
Hessian, the GGN, the empirical Fisher (per sample, and per loss term as curvlinops'
``EFLinearOperator`` defines it) and the Monte-Carlo Fisher. The references are built on
the concatenated data without specops: the Hessian by double backward
(``torch.autograd.functional.hessian``), the GGN as ``J^T H_out J`` from the explicit
Jacobian and the explicit Hessian of the loss in the outputs, the empirical Fishers as
sums of outer products of per-datum gradients ``J^T dl_d/df`` (each datum's loss
evaluated alone), and the Monte-Carlo Fisher against its expectation (the GGN) over
seeds. float64, except where a test says float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from specops.backends import torch as st  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def dense(A):
    return np.asarray(A.to_dense(chunk_size=A.shape[0]))


class SeqModel(nn.Module):
    """``Linear(6 -> 5) -> tanh -> Linear(5 -> c)`` per position of ``(N, 4, 6)`` inputs."""

    def __init__(self, c: int, classes_first: bool):
        super().__init__()
        self.a, self.b, self.classes_first = nn.Linear(6, 5), nn.Linear(5, c), classes_first

    def forward(self, x):
        out = self.b(torch.tanh(self.a(x)))
        return out.transpose(1, 2) if self.classes_first else out


class Shared(nn.Module):
    """One ``Linear(4, 4)`` applied twice (weight sharing), then ``Linear(4, 3)``."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class DictInputs(nn.Module):
    """A model called with keyword inputs ``model(x=..., scale=...)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x, scale):
        return self.b(torch.tanh(self.a(x))) * scale


@dataclasses.dataclass
class Problem:
    model: nn.Module
    loss: Callable[[str], nn.Module]  # reduction -> loss
    batches: list
    classes_first: bool  # class axis 1 (cross-entropy) or last


def problem(name: str) -> Problem:
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def seq_batches(targets):
        return [(randn(n, 4, 6), targets(n)) for n in (3, 5)]

    if name == "ce_seq":  # issue 22's reproducer: (N, 3, 4) logits
        return Problem(SeqModel(3, True).double(), lambda r: nn.CrossEntropyLoss(reduction=r),
                       seq_batches(lambda n: torch.randint(0, 3, (n, 4), generator=g)), True)
    if name == "mse_seq":
        return Problem(SeqModel(2, False).double(), lambda r: nn.MSELoss(reduction=r),
                       seq_batches(lambda n: randn(n, 4, 2)), False)
    if name == "bce_seq":
        return Problem(SeqModel(2, False).double(), lambda r: nn.BCEWithLogitsLoss(reduction=r),
                       seq_batches(lambda n: torch.randint(0, 2, (n, 4, 2), generator=g).double()), False)
    if name == "ce_cnn":  # segmentation: (N, 3, 5, 5) logits
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)).double()
        return Problem(model, lambda r: nn.CrossEntropyLoss(reduction=r),
                       [(randn(n, 1, 5, 5), torch.randint(0, 3, (n, 5, 5), generator=g)) for n in (2, 3)], True)
    if name == "shared":
        return Problem(Shared().double(), lambda r: nn.CrossEntropyLoss(reduction=r),
                       [(randn(n, 4), torch.randint(0, 3, (n,), generator=g)) for n in (4, 6)], True)
    if name == "dict":
        return Problem(DictInputs().double(), lambda r: nn.MSELoss(reduction=r),
                       [({"x": randn(n, 3), "scale": randn(n, 1)}, randn(n, 3)) for n in (3, 4)], False)
    raise ValueError(name)


def concatenated(batches):
    xs, ys = zip(*batches)
    X = ({k: torch.cat([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else torch.cat(xs))
    return X, torch.cat(ys)


def functional(model):
    """``theta`` and ``f(theta, X)`` of the model's outputs."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t, X):
        params = {n: q.view(s) for n, q, s in zip(names, t.split([s.numel() for s in shapes]), shapes)}
        if isinstance(X, dict):
            return torch.func.functional_call(model, params, (), X)
        return torch.func.functional_call(model, params, (X,))

    return theta, f


def output_grad(loss_of_out, out):
    o = out.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of_out(o), o)
    return g.reshape(-1)


def truth(p: Problem, reduction: str):
    """Dense Hessian, GGN, per-sample and per-term (curvlinops) empirical Fishers, concatenated data."""
    theta, f = functional(p.model)
    X, Y = concatenated(p.batches)
    loss = p.loss(reduction)
    H = torch.autograd.functional.hessian(lambda t: loss(f(t, X), Y), theta)
    out = f(theta, X).detach()
    J = torch.autograd.functional.jacobian(lambda t: f(t, X), theta).reshape(-1, theta.numel())
    H_out = torch.autograd.functional.hessian(lambda o: loss(o.view(out.shape), Y), out.reshape(-1))
    G = J.T @ H_out @ J
    N = out.shape[0]
    # per sample: the loss of each sample alone, weight 1/N for a mean
    g = torch.stack([J.T @ output_grad(lambda o, i=i: loss(o[i:i + 1], Y[i:i + 1]),
                                       out) for i in range(N)])
    EF = g.T @ g / (N if reduction == "mean" else 1)
    # per term, from curvlinops' formulas: rows "(batch ...) c" (classes on axis 1 for
    # cross-entropy, the last axis otherwise), each row's loss summed, weight 1/R with R
    # the number of rows (cross-entropy) or of entries (the others) for a mean
    rows = out.movedim(1, -1).reshape(-1, out.shape[1]) if p.classes_first else out.reshape(-1, out.shape[-1])
    y_rows = Y.reshape(-1) if p.classes_first else Y.reshape(-1, Y.shape[-1])
    perm = (lambda o: o.movedim(1, -1).reshape(rows.shape)) if p.classes_first else (lambda o: o.reshape(rows.shape))
    summed = p.loss("sum")
    gt = torch.stack([J.T @ output_grad(lambda o, n=n: summed(perm(o)[n:n + 1], y_rows[n:n + 1]), out)
                      for n in range(rows.shape[0])])
    R = (rows.shape[0] if p.classes_first else rows.numel()) if reduction == "mean" else 1
    EF_term = gt.T @ gt / R
    return {"hessian": H.numpy(), "ggn": G.numpy(), "empirical": EF.numpy(), "term": EF_term.numpy()}


PROBLEMS = ["ce_seq", "mse_seq", "bce_seq", "ce_cnn", "shared", "dict"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", PROBLEMS)
def test_hessian_ggn_and_empirical_fishers_match_dense_references(name, reduction):
    p = problem(name)
    T = truth(p, reduction)
    loss = p.loss(reduction)  # the reduction is read from the loss object
    H = st.hessian(p.model, loss, p.batches)
    assert H.reduction == reduction
    G = st.ggn(p.model, loss, p.batches, check_deterministic=False)
    assert "closed form" in G.engine and G.adapter.output_check_error < 1e-12
    got = {"hessian": dense(H), "ggn": dense(G),
           "empirical": dense(st.fisher(p.model, loss, p.batches, check_deterministic=False)),
           "term": dense(st.fisher(p.model, loss, p.batches, datum="term", check_deterministic=False))}
    for key, value in got.items():
        assert rel(value, T[key]) < 1e-10, (key, rel(value, T[key]))
    # the same operators by autodiff of a plain function of the outputs
    G_auto = st.ggn(p.model, lambda o, y: loss(o, y), p.batches, reduction=reduction, check_deterministic=False)
    assert "autodiff" in G_auto.engine and rel(dense(G_auto), T["ggn"]) < 1e-10


def test_issue_22_reproducer_in_float32():
    p = problem("ce_seq")
    T = truth(p, "mean")
    model32 = p.model.float()
    batches32 = [(x.float(), y) for x, y in p.batches]
    G = st.ggn(model32, nn.CrossEntropyLoss(), batches32)
    assert rel(dense(G), T["ggn"]) < 1e-5
    EF = st.fisher(model32, nn.CrossEntropyLoss(), batches32, datum="term")
    assert rel(dense(EF), T["term"]) < 1e-5


def test_empirical_fisher_conventions_differ_from_curvlinops_as_documented():
    # docs/curvature.md: squared error with "mean" over C outputs: curvlinops' EF is C times specops'
    p = problem("dict")  # (N, 3) outputs: C = 3, one term per sample
    T = truth(p, "mean")
    assert rel(T["term"], 3 * T["empirical"]) < 1e-12
    # cross-entropy on (N, C): a term is a sample, the two agree
    p = problem("shared")
    T = truth(p, "mean")
    assert rel(T["term"], T["empirical"]) < 1e-12
    # extra output axes: per sample is not per position (d = 4 positions)
    T = truth(problem("ce_seq"), "mean")
    assert rel(T["term"], T["empirical"]) > 0.1


def test_ignore_index_is_left_out_as_pytorch_does():
    p = problem("ce_seq")
    batches = []
    for x, y in p.batches:
        y = y.clone()
        y[:, 1] = -100  # one position of every sample ignored
        y[0, 2] = -100
        batches.append((x, y))
    theta, f = functional(p.model)
    loss = nn.CrossEntropyLoss()
    # the data loss: batch means (over their kept positions) weighted by sample count
    N = sum(len(y) for _, y in batches)

    def data_loss(t):
        return sum(len(y) / N * loss(f(t, x), y) for x, y in batches)

    def ggn_ref():
        total = 0
        for x, y in batches:
            out = f(theta, x).detach()
            J = torch.autograd.functional.jacobian(lambda t, x=x: f(t, x), theta).reshape(-1, theta.numel())
            H_out = torch.autograd.functional.hessian(lambda o, y=y, s=out.shape: loss(o.view(s), y), out.reshape(-1))
            total = total + len(y) / N * (J.T @ H_out @ J)
        return total.numpy()

    assert rel(dense(st.hessian(p.model, loss, batches)),
               torch.autograd.functional.hessian(data_loss, theta).numpy()) < 1e-10
    G = st.ggn(p.model, loss, batches)
    assert "closed form" in G.engine and rel(dense(G), ggn_ref()) < 1e-10


def mc_mean(make, seeds):
    return np.mean([dense(make(s)) for s in seeds], axis=0)


@pytest.mark.parametrize("name", ["ce_seq", "bce_seq", "mse_seq"])
def test_mc_fisher_averages_to_the_ggn(name):
    # E[MC Fisher] = GGN for these exponential-family losses; the average of 4 x 200
    # samples is within a few percent (one sample: 30-60 % off)
    p = problem(name)
    T = truth(p, "mean")
    loss = p.loss("mean")
    mean = mc_mean(lambda s: st.fisher(p.model, loss, p.batches, estimator="mc", num_samples=200, seed=s,
                                       check_deterministic=False), range(4))
    one = dense(st.fisher(p.model, loss, p.batches, estimator="mc", num_samples=1, seed=0, check_deterministic=False))
    assert rel(mean, T["ggn"]) < 0.05 and rel(one, T["ggn"]) > 3 * rel(mean, T["ggn"])
    if name == "ce_seq":  # the sampled labels ignore the targets: one-hot class probabilities give the same
        onehot = [(x, torch.nn.functional.one_hot(y, 3).movedim(-1, 1).double()) for x, y in p.batches]
        same = dense(st.fisher(p.model, loss, onehot, estimator="mc", num_samples=1, seed=0, check_deterministic=False))
        assert rel(same, one) < 1e-12
