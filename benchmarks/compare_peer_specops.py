"""specops in ``compare.py``: the runners of both workloads."""

from __future__ import annotations

from compare_problems import EIG_TOL, TRACE_RTOL


def accuracy(model, X, y):
    """Workload (a) on the MLP: ``{label: {"eig"|"trace"|"density": fn}}``; eig(m, seed) ->
    (values, products) or a list of such points, trace(m, seed) -> (estimate, products),
    density(p, s, seed) -> (nodes, weights, products)."""
    from torch import nn

    import specops
    from specops.backends import torch as st

    H = st.hessian(model, nn.CrossEntropyLoss(), (X, y))
    out = {}

    def so_eig(m, seed):
        r = specops.eigsh(H, k=5, tol=1e-12, max_matvecs=m, seed=seed)
        return r.eigenvalues, r.num_matvecs

    def so_trace(method):
        def run(m, seed):
            r = specops.trace(H, method=method, max_matvecs=m, seed=seed)
            return r.estimate, r.num_matvecs
        return run

    def so_density(p, s, seed):
        r = specops.spectral_density(H, num_probes=p, num_steps=s, seed=seed)
        return r.nodes, r.weights, r.num_matvecs

    def so_eig_block(m, seed):
        r = specops.eigsh(H, k=5, tol=1e-12, max_matvecs=m, seed=seed, block_size=5)
        return r.eigenvalues, r.num_matvecs

    out["specops"] = {"eig": so_eig, "trace": so_trace("auto"), "density": so_density}
    out["specops (block_size=5)"] = {"eig": so_eig_block}

    return out


def eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.eigsh(H, k=k, tol=EIG_TOL, max_matvecs=eig_cap, seed=seed)
    return {"eigenvalues": r.eigenvalues.tolist(), "matvecs": r.num_matvecs, "vectors": r.eigenvectors.detach(),
                "reached": bool(r.all_converged), "how": f"eigsh(k={k}, tol={EIG_TOL}) Lanczos"
                + (f" + multiplicity check ({r.settings['multiplicity_check']['products']} products)"
                   if "multiplicity_check" in r.settings else "")}



def trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.trace(H, method="hutchinson", max_matvecs=trace_cap, rtol=TRACE_RTOL, seed=seed)
    return {"estimate": r.estimate, "stderr": r.stderr, "matvecs": r.num_matvecs,
                "reached": r.stderr <= TRACE_RTOL * abs(r.estimate), "how": "trace(hutchinson, rtol=0.01)"}



def trace_auto(model, loss_fn, X, y, *, seed, auto_cap, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.trace(H, max_matvecs=auto_cap, rtol=TRACE_RTOL, seed=seed)
    return {"estimate": r.estimate, "stderr": r.stderr, "matvecs": r.num_matvecs,
                "reached": r.stderr <= TRACE_RTOL * abs(r.estimate),
                "how": f"trace(rtol=0.01), its default: {r.settings.get('estimator')}"}



def density(model, loss_fn, X, y, *, seed, p, s, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.spectral_density(H, num_probes=p, num_steps=s, seed=seed)
    return {"matvecs": r.num_matvecs, "trace": r.trace()[0], "reached": True, "how": f"spectral_density({p}x{s})"}



#: Workload (b): task -> runner(model, loss_fn, X, y, *, seed, ...) -> a dict of results.
TASKS = {"eig": eig, "trace": trace, "trace_auto": trace_auto, "density": density}
