"""hessian-eigenthings in ``compare.py``: the runners of both workloads."""

from __future__ import annotations

import numpy as np

from compare_problems import EIG_TOL, TRACE_RTOL, count_matvec, pooled, stop


def accuracy(model, X, y):
    """Workload (a) on the MLP: ``{label: {"eig"|"trace"|"density": fn}}``; eig(m, seed) ->
    (values, products) or a list of such points, trace(m, seed) -> (estimate, products),
    density(p, s, seed) -> (nodes, weights, products)."""
    from torch import nn

    loss_fn = nn.CrossEntropyLoss()
    out = {}
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    he_counter = count_matvec(op)

    def he_lanczos(m, seed):
        he_counter.count = 0
        r = he.lanczos(op, k=5, max_iter=max(5, m), which="LA", seed=seed)
        return r.eigenvalues.numpy(), he_counter.count

    def he_power(m, seed):
        he_counter.count = 0
        r = he.deflated_power_iteration(op, k=5, max_iter=max(1, m // 5), tol=0.0, seed=seed)
        return np.sort(r.eigenvalues.numpy())[::-1], he_counter.count

    def he_trace(m, seed):
        he_counter.count = 0
        r = he.trace(op, num_matvecs=m, method="hutch++", seed=seed)
        return r.estimate, he_counter.count

    def he_density(p, s, seed):
        he_counter.count = 0
        r = he.spectral_density(op, num_runs=p, lanczos_steps=s, seed=seed, num_grid_points=16)
        return r.raw_eigenvalues.numpy(), r.raw_weights.numpy(), he_counter.count

    out["hessian-eigenthings"] = {"eig": he_lanczos, "trace": he_trace, "density": he_density}
    out["hessian-eigenthings (power)"] = {"eig": he_power}

    return out


def eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    counter = count_matvec(op)
    r = he.deflated_power_iteration(op, k=k, max_iter=max(1, eig_cap // k), tol=EIG_TOL, seed=seed)
    return {"eigenvalues": r.eigenvalues.tolist(), "matvecs": counter.count, "vectors": r.eigenvectors.T.detach(),
                "reached": bool(r.converged.all()), "how": f"deflated_power_iteration(k={k}, tol=1e-4)"}



def trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    counter = count_matvec(op)
    samples = []
    while len(samples) < trace_cap and not stop(samples):
        samples += he.hutchinson(op, num_samples=10, seed=1000 * seed + len(samples)).samples.tolist()
    est, err = pooled(samples)
    return {"estimate": est, "stderr": err, "matvecs": counter.count, "reached": err <= TRACE_RTOL * abs(est),
                "how": "hutchinson() in rounds of 10 probes until stderr <= 1%"}



def density(model, loss_fn, X, y, *, seed, p, s, **_):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    counter = count_matvec(op)
    r = he.spectral_density(op, num_runs=p, lanczos_steps=s, seed=seed)
    nodes, weights = r.raw_eigenvalues.nan_to_num(0.0), r.raw_weights
    tr = float((nodes * weights).sum(1).mean()) * op.size
    return {"matvecs": counter.count, "trace": tr, "reached": True, "how": f"spectral_density({p}x{s})"}



#: Workload (b): task -> runner(model, loss_fn, X, y, *, seed, ...) -> a dict of results.
TASKS = {"eig": eig, "trace": trace, "density": density}
