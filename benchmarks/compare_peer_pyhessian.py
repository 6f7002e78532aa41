"""PyHessian in ``compare.py``: the runners of both workloads. PyHessian makes its random vectors
in the default dtype, so its float64 runs set ``torch.set_default_dtype(torch.float64)``."""

from __future__ import annotations

import numpy as np

import _common
from compare_problems import EIG_TOL, TRACE_RTOL, Reached, pooled, stop


def accuracy(model, X, y):
    """Workload (a) on the MLP: ``{label: {"eig"|"trace"|"density": fn}}``; eig(m, seed) ->
    (values, products) or a list of such points, trace(m, seed) -> (estimate, products),
    density(p, s, seed) -> (nodes, weights, products)."""
    import contextlib

    import torch
    from torch import nn

    loss_fn = nn.CrossEntropyLoss()
    out = {}
    from pyhessian import hessian as PyHessian

    @contextlib.contextmanager
    def f64():
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            yield
        finally:
            torch.set_default_dtype(old)

    with f64():
        ph = PyHessian(model, loss_fn, data=(X, y), cuda=False)

    def ph_eig(m, seed):
        torch.manual_seed(seed)
        with f64(), _common.PyHessianCounter(ph) as c:
            vals, _ = ph.eigenvalues(maxIter=max(1, m // 5), tol=float("-inf"), top_n=5)
        return np.sort(vals)[::-1], c.count

    def ph_trace(m, seed):
        torch.manual_seed(seed)
        with f64(), _common.PyHessianCounter(ph) as c:
            samples = ph.trace(maxIter=m, tol=float("-inf"))
        return float(np.mean(samples)), c.count

    def ph_density(p, s, seed):
        torch.manual_seed(seed)
        with f64(), _common.PyHessianCounter(ph) as c:
            nodes, weights = ph.density(iter=s, n_v=p)
        return np.array(nodes), np.array(weights), c.count

    out["PyHessian"] = {"eig": ph_eig, "trace": ph_trace, "density": ph_density}

    return out


def eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
    import torch
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    ph = PyHessian(model, loss_fn, data=(X, y), cuda=False)
    if k == 1:
        # PyHessian stops when the eigenvalue stops moving (tol=1e-3 by default); to measure the
        # products it needs for a 1e-4 residual, an observer stops it at the first such iterate.
        def observe(v, hv):
            vn = float(sum((a * a).sum() for a in v)) ** 0.5
            lam = float(sum((a * b).sum() for a, b in zip(v, hv))) / vn**2
            r = float(sum(((b - lam * a) ** 2).sum() for a, b in zip(v, hv))) ** 0.5 / vn
            if r <= EIG_TOL * abs(lam):
                raise Reached((lam, [a.detach() / vn for a in v]))
            if counter.count >= eig_cap:
                raise Reached(None)

        with _common.PyHessianCounter(ph, observe) as counter:
            try:
                ph.eigenvalues(maxIter=eig_cap, tol=0.0, top_n=1)
                found = None
            except Reached as stop:
                found = stop.args[0]
        if found is None:
            return {"eigenvalues": [float("nan")], "matvecs": counter.count, "reached": False,
                        "how": "power iteration, stopped at 1e-4 residual by the benchmark"}
        lam, v = found
        vec = torch.cat([t.reshape(-1) for t in v])[:, None]
        return {"eigenvalues": [lam], "matvecs": counter.count, "vectors": vec, "reached": True,
                    "how": "power iteration, stopped at 1e-4 residual by the benchmark"}
    with _common.PyHessianCounter(ph) as counter:
        vals, vecs = ph.eigenvalues(maxIter=max(1, eig_cap // k), tol=1e-6, top_n=k)
    V = torch.stack([torch.cat([t.reshape(-1) for t in vec]) for vec in vecs], dim=1)
    return {"eigenvalues": list(vals), "matvecs": counter.count, "vectors": V, "reached": None,
                "how": f"eigenvalues(top_n={k}, tol=1e-6)"}



def trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import torch
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    ph = PyHessian(model, loss_fn, data=(X, y), cuda=False)
    samples = []
    with _common.PyHessianCounter(ph) as counter:
        while len(samples) < trace_cap and not stop(samples):
            samples += ph.trace(maxIter=10, tol=float("-inf"))
    est, err = pooled(samples)
    return {"estimate": est, "stderr": err, "matvecs": counter.count, "reached": err <= TRACE_RTOL * abs(est),
                "how": "trace() in rounds of 10 probes until stderr <= 1%"}



def density(model, loss_fn, X, y, *, seed, p, s, **_):
    import torch
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    ph = PyHessian(model, loss_fn, data=(X, y), cuda=False)
    with _common.PyHessianCounter(ph) as counter:
        nodes, weights = ph.density(iter=s, n_v=p)
    tr = float(np.mean([np.dot(n, w) for n, w in zip(nodes, weights)]))
    return {"matvecs": counter.count, "trace": tr * sum(q.numel() for q in model.parameters()), "reached": True,
                "how": f"density(iter={s}, n_v={p})"}



#: Workload (b): task -> runner(model, loss_fn, X, y, *, seed, ...) -> a dict of results.
TASKS = {"eig": eig, "trace": trace, "density": density}
