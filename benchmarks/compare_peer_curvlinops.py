"""curvlinops in ``compare.py``: the runners of both workloads. Its eigenvalues come from ARPACK
(SciPy's ``eigsh`` on ``to_scipy()``), which takes no product budget."""

from __future__ import annotations

import numpy as np

from compare_problems import EIG_TOL, TRACE_RTOL, Reached, count_matmat, pooled, stop


def accuracy(model, X, y):
    """Workload (a) on the MLP: ``{label: {"eig"|"trace"|"density": fn}}``; eig(m, seed) ->
    (values, products) or a list of such points, trace(m, seed) -> (estimate, products),
    density(p, s, seed) -> (nodes, weights, products)."""
    import torch
    from torch import nn

    loss_fn = nn.CrossEntropyLoss()
    out = {}
    from curvlinops import HessianLinearOperator, hutchinson_trace, hutchpp_trace
    from curvlinops.papyan2020traces.spectrum import fast_lanczos
    from scipy.sparse.linalg import eigsh as arpack

    params = [p for p in model.parameters() if p.requires_grad]
    A = HessianLinearOperator(model, loss_fn, params, [(X, y)])
    cl_counter = count_matmat(A)
    A_scipy = A.to_scipy()

    def cl_eig(m, seed):
        # ARPACK has no product budget: a ladder of tolerances gives (products, values) points
        points = []
        for tol in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8):
            cl_counter.count = 0
            v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
            vals = arpack(A_scipy, k=5, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
            points.append((np.sort(vals)[::-1], cl_counter.count))
        return points

    def cl_trace(m, seed):
        torch.manual_seed(seed)
        cl_counter.count = 0
        est = hutchpp_trace(A, max(3, m - m % 3))
        return float(est), cl_counter.count

    def cl_hutchinson(m, seed):
        torch.manual_seed(seed)
        cl_counter.count = 0
        return float(hutchinson_trace(A, m)), cl_counter.count

    def cl_density(p, s, seed):
        torch.manual_seed(seed)
        cl_counter.count = 0
        nodes, weights = [], []
        for _ in range(p):
            evals, evecs = fast_lanczos(A, s)
            nodes.append(evals.numpy())
            weights.append(evecs[0].numpy() ** 2)
        return np.array(nodes), np.array(weights), cl_counter.count

    out["curvlinops"] = {"eig": cl_eig, "trace": cl_trace, "density": cl_density}
    out["curvlinops (hutchinson)"] = {"trace": cl_hutchinson}

    return out


def _operator(model, loss_fn, X, y):
    from curvlinops import HessianLinearOperator

    A = HessianLinearOperator(model, loss_fn, [q for q in model.parameters() if q.requires_grad], [(X, y)])
    return A, count_matmat(A)



def eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
    from scipy.sparse.linalg import eigsh as arpack

    A, counter = _operator(model, loss_fn, X, y)
    counter.count, counter.limit = 0, eig_cap
    v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
    try:
        vals, vecs = arpack(A.to_scipy(), k=k, which="LA", tol=EIG_TOL, v0=v0)
    except Reached:
        return {"eigenvalues": [float("nan")] * k, "matvecs": counter.count, "reached": False,
                    "how": f"scipy eigsh(to_scipy(), k={k}, tol=1e-4): product cap"}
    order = np.argsort(vals)[::-1]
    return {"eigenvalues": vals[order].tolist(), "matvecs": counter.count, "vectors": vecs[:, order], "reached": None,
                "how": f"scipy eigsh(to_scipy(), k={k}, tol=1e-4) (ARPACK)"}



def trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import torch
    from curvlinops import hutchinson_trace

    torch.manual_seed(seed)
    A, counter = _operator(model, loss_fn, X, y)
    counter.count = 0
    means = []  # hutchinson_trace returns only the mean: pool rounds of 10 (at least 3 rounds)
    while 10 * len(means) < trace_cap and not stop(means, minimum=3):
        means.append(float(hutchinson_trace(A, 10)))
    est, err = pooled(means)
    return {"estimate": est, "stderr": err, "matvecs": counter.count, "reached": err <= TRACE_RTOL * abs(est),
                "how": "hutchinson_trace(A, 10) rounds until stderr <= 1% (>= 3 rounds)"}



def density(model, loss_fn, X, y, *, seed, p, s, **_):
    import torch
    from curvlinops import lanczos_approximate_spectrum

    torch.manual_seed(seed)
    A, counter = _operator(model, loss_fn, X, y)
    counter.count = 0
    lanczos_approximate_spectrum(A, ncv=s, num_repeats=p)
    return {"matvecs": counter.count, "trace": None, "reached": True,
                "how": f"lanczos_approximate_spectrum(ncv={s}, num_repeats={p}) incl. ARPACK boundaries"}



#: Workload (b): task -> runner(model, loss_fn, X, y, *, seed, ...) -> a dict of results.
TASKS = {"eig": eig, "trace": trace, "density": density}
