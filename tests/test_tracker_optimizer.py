"""The tracker's optimizer view (preconditioned sharpness, threshold, loss, gradient alignment).

Each record is checked against independent truth: a dense float64 Hessian from
torch.autograd.functional.hessian, D from the optimizer's state dict by hand, the loss and
gradient from autograd, the alignment from numpy.linalg.eigh, and eigsh with the same seed.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import specops as so
from specops.backends import torch as st

LOSS = torch.nn.CrossEntropyLoss()


def _dense(model, X, y):
    """Hessian, gradient and loss of a float64 copy of the model, in named_parameters order."""
    model = copy.deepcopy(model).double()
    params = dict(model.named_parameters())
    names = list(params)
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        out, i = {}, 0
        for n in names:
            k = params[n].numel()
            out[n] = flat[i:i + k].reshape(params[n].shape)
            i += k
        return LOSS(torch.func.functional_call(model, out, (X.double(),)), y)

    H = torch.autograd.functional.hessian(f, flat0).numpy()
    g = torch.autograd.functional.jacobian(f, flat0).numpy()
    return H, g, float(f(flat0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_records_match_independent_truth(dtype, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    model, X = model.to(dtype), X.to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    k, tol = 2, (1e-8 if dtype == torch.float64 else 1e-4)
    tracker = so.Tracker(lambda: st.hessian(model, LOSS, (X, y)), tmp_path / "log.jsonl", metrics="eigenvalues",
                         k=k, seed=3, eigsh_options={"tol": tol},
                         preconditioner=lambda H: st.preconditioner(opt, H),
                         threshold=lambda: st.stability_threshold(opt))
    for step in range(3):
        opt.zero_grad()
        LOSS(model(X), y).backward()
        opt.step()
        rec = tracker.update(step)
        # truth at the current weights, in float64
        H_true, g_true, loss_true = _dense(model, X, y)
        sd = opt.state_dict()
        d = np.concatenate([(np.sqrt(sd["state"][i]["exp_avg_sq"].double().numpy()
                                     / (1 - 0.999 ** float(sd["state"][i]["step"]))) + 1e-8).ravel()
                            for i in range(4)])
        w, U = np.linalg.eigh(H_true)
        rtol = 1e-7 if dtype == torch.float64 else 2e-3
        np.testing.assert_allclose(rec["eigenvalues"], w[::-1][:k], rtol=rtol)
        pw = np.linalg.eigvalsh(H_true / np.sqrt(np.outer(d, d)))
        np.testing.assert_allclose(rec["preconditioned"]["eigenvalues"], pw[::-1][:k], rtol=rtol)
        assert rec["threshold"] == pytest.approx(38 / 1e-2)
        assert rec["loss"] == pytest.approx(loss_true, rel=1e-12 if dtype == torch.float64 else 1e-5)
        assert rec["gradient_norm"] == pytest.approx(np.linalg.norm(g_true), rel=1e-10 if dtype == torch.float64
                                                     else 1e-4)
        align = np.linalg.norm(U[:, -k:].T @ g_true) / np.linalg.norm(g_true)
        assert rec["alignment"] == pytest.approx(align, rel=1e-6 if dtype == torch.float64 else 1e-2, abs=1e-6)
        # the same eigenvalues as an independent eigsh call with the tracker's seed
        H = st.hessian(model, LOSS, (X, y))
        np.testing.assert_allclose(rec["preconditioned"]["eigenvalues"],
                                   so.eigsh(so.preconditioned(H, st.preconditioner(opt, H)), k=k, seed=3,
                                            tol=tol).eigenvalues, rtol=10 * tol)
        assert rec["warm_start"]["preconditioned"] == (step > 0)
        assert rec["products"]["preconditioned/eigenvalues"] > 0
    log = so.TrackerLog.read(str(tmp_path / "log.jsonl"))
    s = log.sharpness()
    np.testing.assert_allclose(s["preconditioned"], [r["preconditioned"]["eigenvalues"][0] for r in log.records])
    np.testing.assert_allclose(s["threshold"], 3800.0)
    ax = log.plot_sharpness(path=str(tmp_path / "sharpness.png"))
    assert (tmp_path / "sharpness.png").exists() and len(ax.lines) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="need the 'eigenvalues' metric"):
        so.Tracker(lambda: None, metrics="trace", preconditioner=np.ones(3))
    tracker = so.Tracker(lambda: np.diag([3.0, 2.0, 1.0]), metrics="eigenvalues", k=1, threshold=2.5)
    with pytest.raises(TypeError, match="dynamics=False"):
        tracker.update(0)
    rec = so.Tracker(lambda: np.diag([3.0, 2.0, 1.0]), metrics="eigenvalues", k=1, threshold=2.5,
                     preconditioner=np.array([2.0, 1.0, 1.0]), dynamics=False).update(0)
    assert rec["threshold"] == 2.5 and rec["preconditioned"]["eigenvalues"][0] == pytest.approx(2.0)


def test_warm_lag_starts_from_two_updates_ago():
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.normal(size=(60, 60)))[0]
    w = np.linspace(0, 1, 60)
    w[-1], w[-2] = 3.0, 2.9
    A = (Q * w) @ Q.T
    c, s = np.cos(0.7), np.sin(0.7)  # the top eigenvectors turn by 40 degrees and back, step after step,
    R = Q.copy()                     # as GD's at the edge of stability alternate
    R[:, -1], R[:, -2] = c * Q[:, -1] + s * Q[:, -2], -s * Q[:, -1] + c * Q[:, -2]
    B = (R * w) @ R.T
    used = {}
    for lag in (1, 2):
        noise = np.random.default_rng(1)   # the same small change of every step for both lags: no start is exact

        def make(M, noise=noise):
            E = noise.normal(size=(60, 60)) * 1e-6
            return M + E + E.T

        ops = iter([make(M) for M in (A, B, A, B, A, B)])
        tracker = so.Tracker(lambda: next(ops), metrics="eigenvalues", k=1, seed=0, warm_lag=lag,
                             eigsh_options={"tol": 1e-3})
        records = [tracker.update(i) for i in range(6)]
        for r in records:
            assert r["eigenvalues"][0] == pytest.approx(3.0, rel=1e-3) and r["converged"][0]
        used[lag] = [r["num_matvecs"] for r in records]
    # from two updates ago the start is the exact eigenvector: Lanczos stops at once
    assert max(used[2][2:]) <= 3 < min(used[1][1:])
    with pytest.raises(ValueError, match="warm_lag must be an integer >= 1"):
        so.Tracker(lambda: A, warm_lag=0)


def _rotating(angles):
    """Operators whose top two eigenvectors are those of one matrix turned by each angle (tiny noise added)."""
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.normal(size=(60, 60)))[0]
    w = np.linspace(0, 1, 60)
    w[-1], w[-2] = 3.0, 2.9
    noise = np.random.default_rng(1)
    out = []
    for a in angles:
        R = Q.copy()
        R[:, -1], R[:, -2] = np.cos(a) * Q[:, -1] + np.sin(a) * Q[:, -2], -np.sin(a) * Q[:, -1] + np.cos(a) * Q[:, -2]
        E = noise.normal(size=(60, 60)) * 1e-6
        out.append((R * w) @ R.T + E + E.T)
    return out


@pytest.mark.parametrize("pattern", ["alternating", "drifting"])
def test_warm_lag_auto_starts_from_two_updates_ago_only_where_the_vectors_alternate(pattern, monkeypatch):
    # alternating: GD at the edge of stability (two states, step after step); drifting: a steady turn
    angles = [0.7 * (i % 2) for i in range(8)] if pattern == "alternating" else [0.2 * i for i in range(8)]
    import specops.tracker as tracker_module

    starts, found = [], []

    def spy(A, **kwargs):
        starts.append(kwargs.get("v0"))
        res = so.eigsh(A, **kwargs)
        found.append(res.eigenvectors)
        return res

    monkeypatch.setattr(tracker_module, "eigsh", spy)
    ops = iter(_rotating(angles))
    tracker = so.Tracker(lambda: next(ops), metrics="eigenvalues", k=1, seed=0, eigsh_options={"tol": 1e-3})
    records = [tracker.update(i) for i in range(len(angles))]
    assert tracker.warm_lag == "auto" and all(r["converged"][0] for r in records)
    lag = 2 if pattern == "alternating" else 1
    assert starts[0] is None and all(starts[t] is found[t - 1] for t in (1, 2))  # fewer than three kept: the last
    assert all(starts[t] is found[t - lag] for t in range(3, len(angles)))
    if pattern == "alternating":  # there two updates ago is the exact eigenvector: Lanczos stops at once
        assert max(r["num_matvecs"] for r in records[3:]) <= 3
    with pytest.raises(ValueError, match="or 'auto'"):
        so.Tracker(lambda: np.eye(3), warm_lag="two")
