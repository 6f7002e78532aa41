"""torch.optim preconditioners and thresholds against D built by hand from the state dict (float64).

The Hessian truth is torch.autograd.functional.hessian of the loss as a function of the
flat parameter vector (not specops); ``D`` comes from ``optimizer.state_dict()`` with the
optimizers' published formulas; thresholds are checked by iterating the optimizer itself
on a 1-D quadratic just below and just above them.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import specops as so
from specops.backends import torch as st


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 4, generator=g, dtype=dtype), torch.randint(0, 3, (24,), generator=g)


LOSS = torch.nn.CrossEntropyLoss()


def _train(model, opt, data, steps=4):
    for _ in range(steps):
        opt.zero_grad()
        LOSS(model(data[0]), data[1]).backward()
        opt.step()


def _dense_hessian(model, data, names):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names]).double()

    def f(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            out[n] = flat[i:i + k].reshape(s)
            i += k
        fixed = {k: v.detach().double() for k, v in params.items() if k not in out}
        return LOSS(torch.func.functional_call(model.double(), {**fixed, **out}, (data[0].double(),)), data[1])

    H = torch.autograd.functional.hessian(f, flat0).numpy()
    return H


def _hand_diagonal(opt, kind, names, model):
    """D from the state dict by the optimizers' formulas, float64, in ``names`` order."""
    sd = opt.state_dict()
    by_id = {id(p): n for n, p in model.named_parameters()}
    order = [by_id[id(p)] for g in opt.param_groups for p in g["params"]]   # state_dict numbers params in this order
    parts = {}
    for g in sd["param_groups"]:
        for idx in g["params"]:
            s = sd["state"].get(idx, {})
            name = order[idx]
            if kind == "SGD":
                parts[name] = np.ones(tuple(dict(model.named_parameters())[name].shape))
            elif kind in ("Adam", "AdamW"):
                v = s["max_exp_avg_sq" if g["amsgrad"] else "exp_avg_sq"].double().numpy()
                t = float(s["step"])
                parts[name] = np.sqrt(v / (1 - g["betas"][1] ** t)) + g["eps"]
            elif kind == "RMSprop":
                v = s["square_avg"].double().numpy()
                if g["centered"]:
                    v = v - s["grad_avg"].double().numpy() ** 2
                parts[name] = np.sqrt(v) + g["eps"]
            else:
                parts[name] = np.sqrt(s["sum"].double().numpy()) + g["eps"]
    return np.concatenate([parts[n].reshape(-1) for n in names])


OPTIMIZERS = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "Adam-amsgrad-groups": lambda p: torch.optim.Adam(
        [{"params": p[:2], "eps": 1e-3, "betas": (0.8, 0.99)}, {"params": p[2:]}], lr=1e-2, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "RMSprop-centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, eps=1e-4),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "SGD-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_preconditioned_matches_dense_truth(which, dtype):
    model, data = _model(dtype), _data(dtype)
    opt = OPTIMIZERS[which](list(model.parameters()))
    _train(model, opt, data)
    kind = type(opt).__name__
    H = st.hessian(model, LOSS, data)
    P = st.preconditioner(opt, H)
    d = _hand_diagonal(opt, kind, H.layout.names, model)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(P.ops.to_numpy(P.diagonal), d, rtol=tol)
    truth = _dense_hessian(model, data, H.layout.names)
    truth = truth / np.sqrt(np.outer(d, d))
    A = so.preconditioned(H, P)
    dense = A.to_dense()
    scale = np.abs(truth).max()
    assert np.abs(dense - truth).max() <= (1e-9 if dtype == torch.float64 else 2e-4) * scale
    # top eigenpair through eigsh, mapped back to an eigenvector of P^-1 H
    r = so.eigsh(A, k=1, tol=1e-8 if dtype == torch.float64 else 1e-4)
    assert r.eigenvalues[0] == pytest.approx(np.linalg.eigvalsh(truth)[-1], rel=1e-7 if dtype == torch.float64 else 1e-3)
    w = A.ops.to_numpy(A.map_back(r.eigenvectors))[:, 0]
    Hd = truth * np.sqrt(np.outer(d, d))
    resid = np.linalg.norm(Hd @ w / d - r.eigenvalues[0] * w) / abs(r.eigenvalues[0])
    assert resid < (1e-6 if dtype == torch.float64 else 1e-2)


def test_wrt_block_and_layout_checks():
    model, data = _model(torch.float64), _data(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, data)
    H = st.hessian(model, LOSS, data)
    Hb = st.hessian(model, LOSS, data, wrt="2.*")
    Pb = st.preconditioner(opt, Hb)
    P = st.preconditioner(opt, H)
    d = P.ops.to_numpy(P.diagonal)
    np.testing.assert_allclose(Pb.ops.to_numpy(Pb.diagonal), d[H.layout.blocks["2.weight"].start:], rtol=0)
    # from the model and wrt= (no operator needed): the same diagonal and layout
    Pm = st.preconditioner(opt, model, wrt="2.*")
    assert Pm.layout == Hb.layout
    np.testing.assert_allclose(Pm.ops.to_numpy(Pm.diagonal), Pb.ops.to_numpy(Pb.diagonal), rtol=0)
    with pytest.raises(TypeError, match="wrt= goes to hessian"):
        st.preconditioner(opt, H, wrt="2.*")
    # a block of the preconditioned operator, by name, equals the preconditioned block
    block = so.preconditioned(H, P).restrict("2.*").to_dense()
    np.testing.assert_allclose(block, so.preconditioned(Hb, Pb).to_dense(), rtol=1e-10, atol=1e-14)
    from specops.layout import ParamLayout

    other = so.DiagonalPreconditioner(Pb.diagonal, Pb.ops, layout=ParamLayout(["a", "b"], [(15,), (3,)]))
    with pytest.raises(ValueError, match="read it with the operator"):
        so.preconditioned(Hb, other)
    with pytest.raises(ValueError, match="entries but the operator"):
        so.preconditioned(Hb, d)
    with pytest.raises(ValueError, match="positive and finite"):
        so.preconditioned(H, -np.ones(H.shape[0]))
    # a bare array by hand equals the optimizer's
    np.testing.assert_allclose(so.preconditioned(H, d).to_dense(), so.preconditioned(H, P).to_dense(), rtol=1e-12)


def test_bad_input():
    model, data = _model(torch.float64), _data(torch.float64)
    H = st.hessian(model, LOSS, data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="has not stepped"):
        st.preconditioner(opt, H)
    other = torch.optim.Adam(_model(torch.float64).parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="does not hold the parameter"):
        st.preconditioner(other, H)
    with pytest.raises(TypeError, match=r"Adamax.*Adam, AdamW.*preconditioned\(H, P\)"):
        st.preconditioner(torch.optim.Adamax(model.parameters()), H)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    with pytest.raises(TypeError, match="scheduler.optimizer"):
        st.preconditioner(sched, H)
    with pytest.raises(TypeError, match="scheduler.optimizer"):
        st.stability_threshold(sched)
    groups = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}],
                             lr=0.01)
    with pytest.raises(ValueError, match="differ in lr.*group=i"):
        st.stability_threshold(groups)
    assert st.stability_threshold(groups, group=0) == pytest.approx(20.0)


def test_thresholds_closed_form():
    p = [torch.nn.Parameter(torch.zeros(1))]
    cases = [
        (torch.optim.SGD(p, lr=0.1), 2 / 0.1),
        (torch.optim.SGD(p, lr=0.1, momentum=0.9), 3.8 / 0.1),
        (torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 3.8 / 0.05),
        (torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / (2.8 * 0.1)),
        (torch.optim.Adam(p, lr=1e-3), 38 / 1e-3),
        (torch.optim.AdamW(p, lr=1e-3, betas=(0.5, 0.99)), 3 / (0.5 * 1e-3)),
        (torch.optim.RMSprop(p, lr=1e-3, momentum=0.5), 3 / 1e-3),
        (torch.optim.Adagrad(p, lr=1e-2), 200),
    ]
    for opt, want in cases:
        assert st.stability_threshold(opt) == pytest.approx(want, rel=1e-12), opt


def test_threshold_after_scheduler_uses_current_lr():
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(p, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p[0].grad = torch.zeros(1)
    opt.step()
    sched.step()
    assert st.stability_threshold(opt) == pytest.approx(2 / 0.05)


def _growth(make_opt, curvature, steps=500, x0=1e-60):
    """max |x| over the last 50 steps / over steps 150-200.

    Adam's bias correction of m makes its first steps up to 10x longer, a transient that grows
    x by many orders even below the threshold; by step 150 it has decayed (0.9^150 ~ 1e-7).

    x stays tiny (|g| far below eps), so an adaptive P = sqrt(v_hat) + eps stays ~eps: the fixed
    linear recurrence the threshold is about. A run that leaves that regime counts as divergent.
    """
    x = torch.nn.Parameter(torch.full((1,), x0, dtype=torch.float64))
    opt = make_opt([x])
    xs = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x ** 2).sum().backward()
        opt.step()
        xs.append(abs(x.item()))
        if xs[-1] > 1e-6:
            return np.inf
    return max(xs[-50:]) / max(xs[150:200])


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, dampening=0.5),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    # eps far above sqrt(v): P ~ eps stays fixed, the linear recurrence the threshold is about
    lambda p: torch.optim.Adam(p, lr=0.1, eps=1e3),
    lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.7, eps=1e3),
], ids=["sgd", "heavy-ball", "dampened", "nesterov", "adam", "rmsprop-momentum"])
def test_threshold_separates_stable_from_divergent_on_a_quadratic(make_opt):
    opt = make_opt([torch.nn.Parameter(torch.zeros(1))])
    P = opt.param_groups[0].get("eps", 1.0) if not isinstance(opt, torch.optim.SGD) else 1.0  # sqrt(v) << eps
    thr = st.stability_threshold(opt) * P  # a curvature lambda with lambda / P at the threshold
    below = _growth(make_opt, 0.97 * thr)
    above = _growth(make_opt, 1.03 * thr)
    assert below < 1e-2, below
    assert above > 1e2, above


def test_ggn_takes_the_same_preconditioner():
    model, data = _model(torch.float64), _data(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, data)
    G = st.ggn(model, LOSS, data)
    P = st.preconditioner(opt, G)
    d = _hand_diagonal(opt, "Adam", G.layout.names, model)
    np.testing.assert_allclose(P.ops.to_numpy(P.diagonal), d, rtol=1e-12)
    np.testing.assert_allclose(so.preconditioned(G, P).to_dense(), G.to_dense() / np.sqrt(np.outer(d, d)),
                               rtol=1e-10, atol=1e-14)
