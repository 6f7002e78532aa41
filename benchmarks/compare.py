"""specops against PyHessian, hessian-eigenthings, curvlinops and matfree: one command, one table.

Workloads (issue 7):

(a) accuracy: an MLP (64-40-10, tanh) trained briefly on scikit-learn's digits, float64, all
    1797 images as one batch; the dense Hessian (3010 x 3010) is the truth. For every library
    and a ladder of product budgets: relative error of the top-5 eigenvalues (max over the
    five), of the trace, and the Wasserstein-1 distance between the estimated spectral measure
    (SLQ quadrature nodes/weights) and the exact eigenvalue distribution, divided by the
    spectral width. Stochastic errors are medians over seeds. matfree runs on a JAX twin of
    the same MLP (same weights, so the same Hessian).
(b) speed: the ResNet-20 of ``specops.zoo`` on 3x32x32 inputs (scikit-learn digits upsampled
    to 32x32, grey copied to 3 channels), float32, batch norm in eval mode. Per library: wall
    and processor time, products and peak memory to reach (1) the top eigenvalue(s) at 1e-4
    relative residual, (2) the trace at 1% relative standard error, (3) an SLQ spectral
    density at a fixed budget. Every library runs in its own fresh subprocess per round, the
    libraries interleaved round by round; peak memory is the growth of the process's peak
    resident set (``VmHWM`` after ``echo 5 > /proc/self/clear_refs``) during the task.
    Ratios to specops are taken pair by pair within a round, then the median.

Peers are used, never installed: absent ones are reported and skipped. PyHessian 0.1's
``density()`` calls ``torch.eig`` (removed from PyTorch): it is shimmed with
``torch.linalg.eigh``. PyHessian makes its random vectors in the default dtype, so its
float64 runs are made with ``torch.set_default_dtype(torch.float64)``.

Run: ``python benchmarks/compare.py`` (about 10 minutes on 2 cores), ``--quick`` (about 2),
``--full``; results (Markdown, JSON, plots) go to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common

PRESETS = {
    # budgets (products) for (a), seeds for (a); ResNet images, rounds, top-k, caps, SLQ shape for (b)
    # trace_cap: the same-estimator (Hutchinson) protocol; auto_cap: specops' default estimator
    "quick": {"budgets": [20, 40, 80], "seeds": 5, "images": 8, "rounds": 1, "top_k": 1, "eig_cap": 100,
                  "trace_cap": 40, "auto_cap": 200, "slq": (1, 10)},
    "default": {"budgets": [10, 20, 40, 80, 160], "seeds": 20, "images": 16, "rounds": 3, "top_k": 5, "eig_cap": 400,
                    "trace_cap": 300, "auto_cap": 2000, "slq": (2, 20)},
    "full": {"budgets": [10, 20, 40, 80, 160, 320], "seeds": 40, "images": 128, "rounds": 5, "top_k": 5, "eig_cap": 2000,
                 "trace_cap": 2000, "auto_cap": 6000, "slq": (4, 40)},
}
EIG_TOL = 1e-4
TRACE_RTOL = 0.01
LIBRARIES = ("specops", "pyhessian", "hessian_eigenthings", "curvlinops")
LABEL = {"specops": "specops", "pyhessian": "PyHessian", "hessian_eigenthings": "hessian-eigenthings",
         "curvlinops": "curvlinops", "matfree": "matfree"}


class Reached(Exception):
    """Raised from a product observer when a peer's iterate meets the target."""


# ---------------------------------------------------------------------------- workload (a)
def mlp_problem(seed=0, hidden=40, epochs=10):
    import torch
    from torch import nn

    from specops.zoo.data import digits
    from specops.zoo.train import train

    X, y = digits(size=8, seed=seed)
    X = torch.as_tensor(X.reshape(len(X), -1), dtype=torch.float64)
    y = torch.as_tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    info = train(model, X, y, epochs=epochs, batch_size=64, lr=0.05, weight_decay=0.0, seed=seed)
    return model, X, y, info


def _tridiag_measure(T_list):
    """Nodes and weights (squared first components), one row per probe, of dense tridiagonals."""
    nodes, weights = [], []
    for T in T_list:
        theta, U = np.linalg.eigh(np.asarray(T, dtype=np.float64))
        nodes.append(theta)
        weights.append(U[0] ** 2)
    return np.array(nodes), np.array(weights)


def accuracy_runners(model, X, y, peers):
    """``{name: {"eig"|"trace"|"density": fn}}``; eig(m, seed) -> (values, products) or a list of
    such points, trace(m, seed) -> (estimate, products), density(p, s, seed) -> (nodes, weights, products)."""
    import torch
    from torch import nn

    import specops
    from specops.backends import torch as st

    loss_fn = nn.CrossEntropyLoss()
    runners = {}
    H = st.hessian(model, loss_fn, (X, y))

    def so_eig(m, seed):
        r = specops.eigsh(H, k=5, tol=1e-12, max_matvecs=m, seed=seed)
        return r.eigenvalues, r.num_matvecs

    def so_trace(method):
        def run(m, seed):
            r = specops.trace(H, method=method, num_matvecs=m, seed=seed)
            return r.estimate, r.num_matvecs
        return run

    def so_density(p, s, seed):
        r = specops.spectral_density(H, num_probes=p, num_steps=s, seed=seed)
        return r.nodes, r.weights, r.num_matvecs

    def so_eig_block(m, seed):
        r = specops.eigsh(H, k=5, tol=1e-12, max_matvecs=m, seed=seed, block_size=5)
        return r.eigenvalues, r.num_matvecs

    runners["specops"] = {"eig": so_eig, "trace": so_trace("auto"), "density": so_density}
    runners["specops (block_size=5)"] = {"eig": so_eig_block}

    if "pyhessian" in peers:
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

        runners["PyHessian"] = {"eig": ph_eig, "trace": ph_trace, "density": ph_density}

    if "hessian_eigenthings" in peers:
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
        he_counter = _count_matvec(op)

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

        runners["hessian-eigenthings"] = {"eig": he_lanczos, "trace": he_trace, "density": he_density}
        runners["hessian-eigenthings (power)"] = {"eig": he_power}

    if "curvlinops" in peers:
        from curvlinops import HessianLinearOperator, hutchinson_trace, hutchpp_trace
        from curvlinops.papyan2020traces.spectrum import fast_lanczos
        from scipy.sparse.linalg import eigsh as arpack

        params = [p for p in model.parameters() if p.requires_grad]
        A = HessianLinearOperator(model, loss_fn, params, [(X, y)])
        cl_counter = _count_matmat(A)
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

        runners["curvlinops"] = {"eig": cl_eig, "trace": cl_trace, "density": cl_density}
        runners["curvlinops (hutchinson)"] = {"trace": cl_hutchinson}

    if "matfree" in peers:
        runners.update(matfree_runners(model, X, y))
    return runners


def _count_matvec(op):
    """Count hessian-eigenthings products by shadowing the instance's ``matvec``."""
    orig = op.matvec

    class Counter:
        count = 0

    def matvec(v):
        Counter.count += 1
        return orig(v)

    op.matvec = matvec
    return Counter


def _count_matmat(A):
    """Count curvlinops products (columns of every ``_matmat``) by shadowing the instance's method."""
    orig = A._matmat

    class Counter:
        count = 0
        limit = None

    def matmat(M):
        Counter.count += int(M[0].shape[-1])
        if Counter.limit is not None and Counter.count > Counter.limit:
            raise Reached("product cap")
        return orig(M)

    A._matmat = matmat
    return Counter


def matfree_runners(model, X, y):
    """matfree's Hutchinson trace and Lanczos quadrature on a JAX twin of the torch MLP."""
    import jax
    import jax.flatten_util

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from matfree import decomp, stochtrace

    W1, b1, W2, b2 = (jnp.asarray(p.detach().numpy()) for p in model.parameters())
    flat, unravel = jax.flatten_util.ravel_pytree((W1, b1, W2, b2))
    Xj, yj = jnp.asarray(X.numpy()), jnp.asarray(y.numpy())

    def loss(theta):
        w1, c1, w2, c2 = unravel(theta)
        logits = jnp.tanh(Xj @ w1.T + c1) @ w2.T + c2
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(yj)), yj])

    grad = jax.grad(loss)

    def hvp(v):
        return jax.jvp(grad, (flat,), (v,))[1]

    def trace(m, seed):
        est = stochtrace.estimator_monte_carlo(stochtrace.monte_carlo_trace(),
                                               stochtrace.sampler_signs(flat, num=m))
        return float(jax.jit(lambda key: est(hvp, key))(jax.random.PRNGKey(seed))), m

    def density(p, s, seed):
        tridiag = decomp.tridiag_sym(s)
        probes = stochtrace.sampler_signs(flat, num=p)(jax.random.PRNGKey(seed))
        run = jax.jit(lambda v: tridiag(hvp, v).J_small)
        nodes, weights = _tridiag_measure([run(v) for v in probes])
        return nodes, weights, p * s

    return {"matfree": {"trace": trace, "density": density}}


def eig_error(values, truth):
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if len(values) < len(truth) or not np.all(np.isfinite(values)):
        return float("inf")
    return float(np.max(np.abs(values[: len(truth)] - truth) / np.abs(truth)))


def run_accuracy(cfg, peers, log):
    import torch

    torch.set_num_threads(cfg["threads"])
    t0 = time.perf_counter()
    model, X, y, info = mlp_problem()
    import hashlib

    from torch import nn

    from specops.backends import torch as st

    key = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]
    cache = os.path.join(cfg["out"], f"mlp_spectrum_{key}.npy")
    if os.path.exists(cache):  # the dense eigenvalues of these exact weights, from an earlier run
        lam = np.load(cache)
    else:
        D = st.hessian(model, nn.CrossEntropyLoss(), (X, y)).to_dense()
        lam = np.linalg.eigvalsh((D + D.T) / 2)
        np.save(cache, lam)
    truth = {"top5": lam[::-1][:5], "trace": float(lam.sum()), "width": float(lam[-1] - lam[0])}
    n = len(lam)
    log(f"(a) MLP: {n} parameters, train accuracy {info['train_accuracy']:.3f}, "
        f"top-5 {np.round(truth['top5'], 4).tolist()}, lambda_min {lam[0]:.4g}, trace {truth['trace']:.5g} "
        f"({time.perf_counter() - t0:.1f} s)")
    runners = accuracy_runners(model, X, y, peers)
    seeds = range(cfg["seeds"])
    rows = []  # (task, library, budget, products, error)
    for task in ("eig", "trace", "density"):
        for name, fns in runners.items():
            if task not in fns:
                continue
            t1 = time.perf_counter()
            for m in cfg["budgets"]:
                errs, used = [], []
                for seed in seeds if task != "eig" else [0]:
                    if task == "density":
                        s = min(m, 20)
                        nodes, weights, count = fns[task](max(1, m // s), s, seed)
                        errs.append(_common.wasserstein1(nodes, weights, lam) / truth["width"])
                        used.append(count)
                    elif task == "trace":
                        est, count = fns[task](m, seed)
                        errs.append(abs(est - truth["trace"]) / abs(truth["trace"]))
                        used.append(count)
                    else:
                        out = fns[task](m, seed)
                        if isinstance(out, list):  # a ladder of (values, products), independent of m
                            for vals, count in out:
                                rows.append((task, name, None, count, eig_error(vals, truth["top5"])))
                            break
                        errs.append(eig_error(out[0], truth["top5"]))
                        used.append(out[1])
                if errs:  # eigenvalues: one deterministic run; trace and density: RMS over the seeds
                    rows.append((task, name, m, int(np.median(used)), float(np.sqrt(np.mean(np.square(errs))))))
                elif task == "eig":
                    break  # the ladder ran once
            log(f"  {task:7s} {name:28s} {time.perf_counter() - t1:6.1f} s")
    return {"truth": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in truth.items()},
                "n": n, "train": info, "rows": rows, "budgets": cfg["budgets"], "seeds": cfg["seeds"],
                "spectrum": lam.tolist()}


#: specops counts as "as accurate" when its error is within this factor of the best peer's
#: (stochastic errors are medians over a few seeds; a 25% difference is within their noise).
TIE = 1.25


def at_budget(rows, task, name, budget):
    """The error of a library at a budget: its run at that budget if it has one (rows with
    budget None, ARPACK's tolerance ladder, give their best point within the budget)."""
    for t, n, m, _, e in rows:
        if t == task and n == name and m == budget:
            return e
    return best_within(rows, task, name, budget)


def best_within(rows, task, name, budget):
    """Smallest error a library reached with at most ``budget`` products (None if no point)."""
    pts = [e for (t, n, m, c, e) in rows if t == task and n == name and m is None and c <= budget]
    return min(pts) if pts else None


# ---------------------------------------------------------------------------- workload (b)
def resnet_problem(images, seed=0):
    import torch

    from specops.zoo.data import digits
    from specops.zoo.torch_resnet import resnet

    X, y = digits(size=32, n=images, seed=seed)
    X = torch.as_tensor(X).repeat(1, 3, 1, 1)
    y = torch.as_tensor(y)
    torch.manual_seed(seed)
    model = resnet(20)
    with torch.no_grad():  # running statistics from the data, then frozen (eval mode)
        model.train()
        model(X)
    model.eval()
    return model, X, y


def worker(args):
    """One library, one round: eigenvalues, trace, density on the ResNet; prints one JSON line."""
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    _common.shim_torch_eig()
    model, X, y = resnet_problem(args.images)
    loss_fn = nn.CrossEntropyLoss()
    lib, seed, k = args.worker, args.round, args.top_k
    p, s = args.slq
    tasks = TASKS[lib]
    out = {"library": lib, "round": seed}
    for task in tasks:
        gc.collect()
        rss0 = _common.reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        res = tasks[task](model, loss_fn, X, y, seed=seed, k=k, p=p, s=s, eig_cap=args.eig_cap,
                          trace_cap=args.trace_cap, auto_cap=args.auto_cap)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _common.peak_rss_kib()
        vectors = res.pop("vectors", None)
        model.zero_grad(set_to_none=True)
        gc.collect()
        res.update(wall=wall, cpu=cpu, peak_mib=(peak - rss0) / 1024 if rss0 and peak else None)
        if task == "eig" and vectors is not None:
            res["residuals"] = relative_residuals(model, loss_fn, X, y, vectors, res["eigenvalues"])
        out[task] = res
    print("RESULT " + json.dumps(out), flush=True)


def relative_residuals(model, loss_fn, X, y, V, lams):
    """``||H v - lambda v|| / |lambda|`` per column (unit v), measured with one specops product."""
    import torch

    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y), hvp="double_backward", check_deterministic=False)
    V = torch.as_tensor(np.asarray(V) if not torch.is_tensor(V) else V, dtype=torch.float32).reshape(H.shape[0], -1)
    V = V / torch.linalg.vector_norm(V, dim=0)
    lams = np.asarray(lams, dtype=np.float64)
    R = H @ V - V * torch.as_tensor(lams, dtype=V.dtype)
    return (torch.linalg.vector_norm(R, dim=0).numpy() / np.abs(lams)).tolist()


def _pooled(samples):
    samples = np.asarray(samples, dtype=np.float64)
    mean = float(samples.mean())
    err = float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    return mean, err


def _stop(samples, minimum=10):
    if len(samples) < minimum:
        return False
    mean, err = _pooled(samples)
    return err <= TRACE_RTOL * abs(mean)


# specops ----------------------------------------------------------------------------------
def so_eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.eigsh(H, k=k, tol=EIG_TOL, max_matvecs=eig_cap, seed=seed)
    return {"eigenvalues": r.eigenvalues.tolist(), "matvecs": r.num_matvecs, "vectors": r.eigenvectors.detach(),
                "reached": bool(r.all_converged), "how": f"eigsh(k={k}, tol={EIG_TOL}) Lanczos"
                + (f" + multiplicity check ({r.settings['multiplicity_check']['products']} products)"
                   if "multiplicity_check" in r.settings else "")}


def so_trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.trace(H, method="hutchinson", num_matvecs=trace_cap, rtol=TRACE_RTOL, seed=seed)
    return {"estimate": r.estimate, "stderr": r.stderr, "matvecs": r.num_matvecs,
                "reached": r.stderr <= TRACE_RTOL * abs(r.estimate), "how": "trace(hutchinson, rtol=0.01)"}


def so_trace_auto(model, loss_fn, X, y, *, seed, auto_cap, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.trace(H, num_matvecs=auto_cap, rtol=TRACE_RTOL, seed=seed)
    return {"estimate": r.estimate, "stderr": r.stderr, "matvecs": r.num_matvecs,
                "reached": r.stderr <= TRACE_RTOL * abs(r.estimate),
                "how": f"trace(rtol=0.01), its default: {r.settings.get('estimator')}"}


def so_density(model, loss_fn, X, y, *, seed, p, s, **_):
    import specops
    from specops.backends import torch as st

    H = st.hessian(model, loss_fn, (X, y))
    r = specops.spectral_density(H, num_probes=p, num_steps=s, seed=seed)
    return {"matvecs": r.num_matvecs, "trace": r.trace()[0], "reached": True, "how": f"spectral_density({p}x{s})"}


# PyHessian --------------------------------------------------------------------------------
def ph_eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
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


def ph_trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import torch
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    ph = PyHessian(model, loss_fn, data=(X, y), cuda=False)
    samples = []
    with _common.PyHessianCounter(ph) as counter:
        while len(samples) < trace_cap and not _stop(samples):
            samples += ph.trace(maxIter=10, tol=float("-inf"))
    est, err = _pooled(samples)
    return {"estimate": est, "stderr": err, "matvecs": counter.count, "reached": err <= TRACE_RTOL * abs(est),
                "how": "trace() in rounds of 10 probes until stderr <= 1%"}


def ph_density(model, loss_fn, X, y, *, seed, p, s, **_):
    import torch
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    ph = PyHessian(model, loss_fn, data=(X, y), cuda=False)
    with _common.PyHessianCounter(ph) as counter:
        nodes, weights = ph.density(iter=s, n_v=p)
    tr = float(np.mean([np.dot(n, w) for n, w in zip(nodes, weights)]))
    return {"matvecs": counter.count, "trace": tr * sum(q.numel() for q in model.parameters()), "reached": True,
                "how": f"density(iter={s}, n_v={p})"}


# hessian-eigenthings ----------------------------------------------------------------------
def he_eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    counter = _count_matvec(op)
    r = he.deflated_power_iteration(op, k=k, max_iter=max(1, eig_cap // k), tol=EIG_TOL, seed=seed)
    return {"eigenvalues": r.eigenvalues.tolist(), "matvecs": counter.count, "vectors": r.eigenvectors.T.detach(),
                "reached": bool(r.converged.all()), "how": f"deflated_power_iteration(k={k}, tol=1e-4)"}


def he_trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    counter = _count_matvec(op)
    samples = []
    while len(samples) < trace_cap and not _stop(samples):
        samples += he.hutchinson(op, num_samples=10, seed=1000 * seed + len(samples)).samples.tolist()
    est, err = _pooled(samples)
    return {"estimate": est, "stderr": err, "matvecs": counter.count, "reached": err <= TRACE_RTOL * abs(est),
                "how": "hutchinson() in rounds of 10 probes until stderr <= 1%"}


def he_density(model, loss_fn, X, y, *, seed, p, s, **_):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(loss_fn))
    counter = _count_matvec(op)
    r = he.spectral_density(op, num_runs=p, lanczos_steps=s, seed=seed)
    nodes, weights = r.raw_eigenvalues.nan_to_num(0.0), r.raw_weights
    tr = float((nodes * weights).sum(1).mean()) * op.size
    return {"matvecs": counter.count, "trace": tr, "reached": True, "how": f"spectral_density({p}x{s})"}


# curvlinops -------------------------------------------------------------------------------
def _cl_operator(model, loss_fn, X, y):
    from curvlinops import HessianLinearOperator

    A = HessianLinearOperator(model, loss_fn, [q for q in model.parameters() if q.requires_grad], [(X, y)])
    return A, _count_matmat(A)


def cl_eig(model, loss_fn, X, y, *, seed, k, eig_cap, **_):
    from scipy.sparse.linalg import eigsh as arpack

    A, counter = _cl_operator(model, loss_fn, X, y)
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


def cl_trace(model, loss_fn, X, y, *, seed, trace_cap, **_):
    import torch
    from curvlinops import hutchinson_trace

    torch.manual_seed(seed)
    A, counter = _cl_operator(model, loss_fn, X, y)
    counter.count = 0
    means = []  # hutchinson_trace returns only the mean: pool rounds of 10 (at least 3 rounds)
    while 10 * len(means) < trace_cap and not _stop(means, minimum=3):
        means.append(float(hutchinson_trace(A, 10)))
    est, err = _pooled(means)
    return {"estimate": est, "stderr": err, "matvecs": counter.count, "reached": err <= TRACE_RTOL * abs(est),
                "how": "hutchinson_trace(A, 10) rounds until stderr <= 1% (>= 3 rounds)"}


def cl_density(model, loss_fn, X, y, *, seed, p, s, **_):
    import torch
    from curvlinops import lanczos_approximate_spectrum

    torch.manual_seed(seed)
    A, counter = _cl_operator(model, loss_fn, X, y)
    counter.count = 0
    lanczos_approximate_spectrum(A, ncv=s, num_repeats=p)
    return {"matvecs": counter.count, "trace": None, "reached": True,
                "how": f"lanczos_approximate_spectrum(ncv={s}, num_repeats={p}) incl. ARPACK boundaries"}


TASKS = {
    "specops": {"eig": so_eig, "trace": so_trace, "trace_auto": so_trace_auto, "density": so_density},
    "pyhessian": {"eig": ph_eig, "trace": ph_trace, "density": ph_density},
    "hessian_eigenthings": {"eig": he_eig, "trace": he_trace, "density": he_density},
    "curvlinops": {"eig": cl_eig, "trace": cl_trace, "density": cl_density},
}


def run_speed(cfg, peers, log):
    libs = ["specops"] + [lib for lib in LIBRARIES[1:] if lib in peers]
    results = {lib: [] for lib in libs}
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    for r in range(cfg["rounds"]):
        order = libs if r % 2 == 0 else libs[::-1]  # interleaved, alternating order
        for lib in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--round", str(r),
                   "--images", str(cfg["images"]), "--threads", str(cfg["threads"]), "--top-k", str(cfg["top_k"]),
                   "--eig-cap", str(cfg["eig_cap"]), "--trace-cap", str(cfg["trace_cap"]),
                   "--auto-cap", str(cfg["auto_cap"]),
                   "--slq", str(cfg["slq"][0]), str(cfg["slq"][1])]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                log(f"  round {r} {lib}: FAILED\n{proc.stderr[-2000:]}")
                results[lib].append(None)
                continue
            res = json.loads(lines[-1][len("RESULT "):])
            results[lib].append(res)
            log(f"  round {r} {LABEL[lib]:20s} " + ", ".join(
                f"{task} {res[task]['wall']:6.1f} s ({res[task]['matvecs']})" for task in TASKS[lib])
                + f" [{time.perf_counter() - t0:.0f} s]")
    return results


# ---------------------------------------------------------------------------- report
def _fmt(x, spec=".2g"):
    if x is None:
        return "-"
    if isinstance(x, float) and not np.isfinite(x):
        return "inf"
    return format(x, spec)


def report_accuracy(acc):
    rows, budgets = acc["rows"], acc["budgets"]
    names = []
    for _, n, *_ in rows:
        if n not in names:
            names.append(n)
    lines = []
    goals = {}
    titles = {"eig": "top-5 eigenvalues, max relative error",
              "trace": f"trace, relative error (root mean square over {acc['seeds']} seeds)",
              "density": f"spectral CDF, Wasserstein-1 / spectral width (root mean square over {acc['seeds']} seeds)"}
    for task in ("eig", "trace", "density"):
        present = [n for n in names if any(t == task and nn == n for (t, nn, *_) in rows)]
        lines.append(f"\n**{titles[task]}** at a budget of m products\n")
        lines.append("| m | " + " | ".join(present) + " | specops best? |")
        lines.append("|---:|" + "---:|" * len(present) + "---|")
        for m in budgets:
            errs = {n: at_budget(rows, task, n, m) for n in present}
            so = min([e for n, e in errs.items() if n.startswith("specops") and e is not None], default=None)
            peer = {n: e for n, e in errs.items() if not n.startswith("specops") and e is not None}
            best = min(peer.values(), default=None)
            if so is None or best is None:
                verdict, ok = "-", None
            elif so <= best * (1 + 1e-9) + 1e-14:
                verdict, ok = "yes", True
            else:
                better = ", ".join(n for n, e in peer.items() if e < so)
                ratio = so / best
                ok = ratio <= TIE
                verdict = (f"tie ({ratio:.2f}x the best peer)" if ok else f"**NO**: {ratio:.1f}x the error of "
                           f"the best peer ({better} better)")
            if ok is not None:
                goals.setdefault(task, []).append(ok)
            lines.append(f"| {m} | " + " | ".join(_fmt(errs[n]) for n in present) + f" | {verdict} |")
    return "\n".join(lines), goals


def _median(xs):
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return statistics.median(xs) if xs else None


def report_speed(speed, cfg):
    libs = list(speed)
    so = speed["specops"]
    lines = ["| task | library | how | wall s | CPU s | products | wall / specops | peak MiB | result |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    caps = {"trace": cfg["trace_cap"], "trace_auto": cfg["auto_cap"]}
    for task in ("eig", "trace", "trace_auto", "density"):
        for lib in libs:
            if task not in TASKS[lib]:
                continue
            runs = [r for r in speed[lib] if r is not None]
            if not runs:
                lines.append(f"| {task} | {LABEL[lib]} | failed | | | | | | |")
                continue
            wall = _median([r[task]["wall"] for r in runs])
            cpu = _median([r[task]["cpu"] for r in runs])
            mv = _median([r[task]["matvecs"] for r in runs])
            mem = _median([r[task]["peak_mib"] for r in runs])
            ratio = _median([a[task]["wall"] / b[task]["wall"] for a, b in zip(speed[lib], so)
                             if a is not None and b is not None])
            last = runs[-1][task]
            if task == "eig":
                res = last.get("residuals")
                vals = ", ".join(f"{v:.4g}" for v in last["eigenvalues"])
                worst = max(res) if res else None
                ok = worst is not None and worst <= EIG_TOL * 1.5
                result = f"lambda {vals}; max rel. residual {_fmt(worst)}" + ("" if ok else " — **1e-4 NOT reached**")
            elif task in caps:
                rel = last["stderr"] / abs(last["estimate"]) if last["estimate"] else float("inf")
                result = f"{last['estimate']:.5g} ± {_fmt(rel)} rel." + (
                    "" if last["reached"] else
                    f" — **1% NOT reached within {caps[task]} products** (extrapolated: "
                    f"~{_needed(last):.0f} products, ~{_to_target(last):.0f} s)")
            else:
                result = "trace from SLQ " + (_fmt(last["trace"], ".4g") if last.get("trace") is not None else "-")
            lines.append(f"| {task} | {LABEL[lib]} | {last['how']} | {_fmt(wall, '.2f')} | {_fmt(cpu, '.2f')} | "
                         f"{_fmt(mv, '.0f')} | {_fmt(ratio, '.2f')} | {_fmt(mem, '.0f')} | {result} |")
    suite = {"default": {}, "same": {}}  # specops with its default trace / with Hutchinson like the peers
    for lib in libs:
        for proto, mine in (("default", "trace_auto"), ("same", "trace")):
            suite[proto][lib] = _median([_suite(a, "trace") / _suite(b, mine) for a, b in zip(speed[lib], so)
                                         if a is not None and b is not None])
    return "\n".join(lines), suite


def _needed(res):
    """Products to 1% relative standard error: as run, or extrapolated with stderr ~ 1/sqrt(m)."""
    rel = res["stderr"] / abs(res["estimate"])
    return res["matvecs"] if res["reached"] else res["matvecs"] * (rel / TRACE_RTOL) ** 2


def _to_target(res):
    """Seconds to 1% relative standard error: as run, or extrapolated at the run's time per product."""
    return res["wall"] if res["reached"] else res["wall"] / res["matvecs"] * _needed(res)


def _suite(res, trace_task):
    """Wall seconds of the full suite: top-k eigenvalues, the trace to 1%, the density."""
    return res["eig"]["wall"] + _to_target(res[trace_task]) + res["density"]["wall"]


def plot_accuracy(acc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    titles = {"eig": "top-5 eigenvalues: max rel. error", "trace": "trace: rel. error",
              "density": "spectral CDF: W1 / width"}
    names = []
    for _, n, *_ in acc["rows"]:
        if n not in names:
            names.append(n)
    for ax, task in zip(axes, ("eig", "trace", "density")):
        for n in names:
            pts = sorted((c, e) for (t, nn, _, c, e) in acc["rows"] if t == task and nn == n and c > 0)
            if not pts:
                continue
            c, e = zip(*pts)
            e = np.maximum(np.array(e, dtype=float), 1e-16)
            style = {"lw": 2.5, "color": "k"} if n == "specops" else {"lw": 1.2}
            ax.loglog(c, e, "o-" if n != "curvlinops" or task != "eig" else "s--", ms=3, label=n, **style)
        ax.set_title(titles[task], fontsize=10)
        ax.set_xlabel("Hessian-vector products")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"MLP on digits, n={acc['n']} parameters, float64: error against products (lower is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_speed(speed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    libs = list(speed)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(libs)
    for i, lib in enumerate(libs):
        runs = [r for r in speed[lib] if r is not None]
        tr = "trace_auto" if lib == "specops" else "trace"  # specops with its default estimator
        vals = [_median([r["eig"]["wall"] for r in runs]), _median([_to_target(r[tr]) for r in runs]),
                _median([r["density"]["wall"] for r in runs]), _median([_suite(r, tr) for r in runs])]
        ax.bar(np.arange(4) + i * width, [v or 0 for v in vals], width, label=LABEL[lib])
    ax.set_xticks(np.arange(4) + width * (len(libs) - 1) / 2)
    ax.set_xticklabels(["top eigenvalues,\n1e-4 residual", "trace to 1% stderr\n(extrapolated if capped)",
                        "SLQ density,\nfixed budget", "full suite"], fontsize=8)
    ax.set_ylabel("wall time, s (median)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("ResNet-20, 3x32x32 digits, float32, batch norm eval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 2 minutes")
    mode.add_argument("--full", action="store_true", help="larger budgets, 128 images, top-5, more rounds")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    # worker mode (internal) and overrides
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--eig-cap", type=int)
    parser.add_argument("--trace-cap", type=int)
    parser.add_argument("--auto-cap", type=int, help="budget of specops' default trace estimator")
    parser.add_argument("--slq", type=int, nargs=2, metavar=("PROBES", "STEPS"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    cfg = dict(PRESETS["quick" if args.quick else "full" if args.full else "default"])
    for key in ("images", "rounds", "top_k", "eig_cap", "trace_cap", "auto_cap", "slq"):
        if getattr(args, key) is not None:
            cfg[key] = tuple(args.slq) if key == "slq" else getattr(args, key)
    cfg["threads"] = args.threads
    cfg["out"] = args.out
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    import torch

    shimmed = _common.shim_torch_eig()
    peers = _common.found_peers()
    missing = [_common.PEERS[m] for m in _common.PEERS if m not in peers]
    import specops

    versions = dict(specops=specops.__version__, torch=torch.__version__, numpy=np.__version__,
                    **{_common.PEERS[m]: v for m, v in peers.items()})
    with contextlib.suppress(ImportError):
        import jax

        versions["jax"] = jax.__version__
    mach = _common.machine()
    preset = "quick" if args.quick else "full" if args.full else "default"
    log(f"machine: {mach['cpu']}, {mach['cores']} logical cores, Python {mach['python']}; threads {args.threads}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    log("peers found: " + (", ".join(f"{_common.PEERS[m]} {v}" for m, v in peers.items()) or "none")
        + ("; missing: " + ", ".join(missing) if missing else ""))
    if "pyhessian" in peers:
        log("PyHessian: torch.eig " + ("shimmed with torch.linalg.eigh (removed from this PyTorch)" if shimmed
                                       else "present, not shimmed"))
    t_start = time.perf_counter()
    acc = speed = None
    summary = {}
    if not args.skip_accuracy:
        log(f"\n(a) accuracy against the dense Hessian (budgets {cfg['budgets']}, {cfg['seeds']} seeds)")
        acc = run_accuracy(cfg, peers, log)
        table_a, goals_a = report_accuracy(acc)
        plot_accuracy(acc, os.path.join(args.out, "benchmark_accuracy.png"))
        summary["accuracy_goal"] = {t: all(v) for t, v in goals_a.items()}
    if not args.skip_speed:
        log(f"\n(b) ResNet-20 speed: {cfg['images']} images, {cfg['rounds']} rounds, top-{cfg['top_k']}, "
            f"trace cap {cfg['trace_cap']}, SLQ {cfg['slq'][0]}x{cfg['slq'][1]}")
        speed = run_speed(cfg, peers, log)
        table_b, suite = report_speed(speed, cfg)
        plot_speed(speed, os.path.join(args.out, "benchmark_resnet.png"))
        summary["suite_ratio_to_specops"] = suite
    elapsed = time.perf_counter() - t_start

    md = [f"# specops vs peers ({preset} preset)\n",
          f"- machine: {mach['cpu']}, {mach['cores']} logical cores (shared), {mach['platform']}",
          f"- threads: torch.set_num_threads({args.threads}), OMP_NUM_THREADS={args.threads}",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
          "- peers missing: " + (", ".join(missing) or "none"),
          "- PyHessian's `torch.eig` " + ("shimmed with `torch.linalg.eigh`" if shimmed else "not shimmed"),
          f"- seeds: (a) probes seeds 0..{cfg['seeds'] - 1}, model seed 0; (b) round r uses seed r, model seed 0",
          f"- total run time {elapsed:.0f} s"]
    if acc:
        md += [f"\n## (a) Accuracy at equal products: MLP on digits, {acc['n']} parameters, float64\n",
               (f"Truth: dense Hessian; top-5 = {', '.join(f'{v:.5g}' for v in acc['truth']['top5'])}, "
               f"trace = {acc['truth']['trace']:.6g}. Eigenvalue errors are deterministic (seed 0); "
               "curvlinops' eigenvalues come from ARPACK (scipy eigsh on `to_scipy()`) with a ladder of "
               "tolerances, since ARPACK takes no product budget. SLQ uses min(m, 20) steps per probe."),
               table_a,
               "\nGoal 'specops at least as accurate as every peer at equal products': "
               + ", ".join(f"{t}: {'met' if ok else '**MISSED**'}" for t, ok in summary["accuracy_goal"].items())]
    if speed:
        suite = summary["suite_ratio_to_specops"]
        ph = suite["default"].get("pyhessian")
        md += [(f"\n## (b) ResNet-20, {cfg['images']} images 3x32x32, float32, batch norm eval; "
               f"medians of {cfg['rounds']} rounds\n"),
               ("Each library in a fresh subprocess per round; wall / specops is the median of per-round "
               "ratios; peak MiB is the growth of the peak resident set during the task (VmHWM after "
               "resetting it via /proc/self/clear_refs). Products exclude operator set-up checks; times "
               "include building each library's operator.\n"),
               table_b,
               ("\nFull suite (top eigenvalues + trace to 1% + density; a trace that hit its cap counts with "
                "its extrapolated time to 1%), wall time relative to specops:\n"),
               "- specops with its default trace estimator: "
               + ", ".join(f"{LABEL[k]} {_fmt(v, '.2f')}x" for k, v in suite["default"].items() if k != "specops")
               + f" (specops with Hutchinson: {_fmt(suite['default']['specops'], '.2f')}x)",
               "- specops with Hutchinson, the peers' estimator: "
               + ", ".join(f"{LABEL[k]} {_fmt(v, '.2f')}x" for k, v in suite["same"].items() if k != "specops"),
               "\nGoal 'at least 5x faster than PyHessian for the full suite': "
               + ("no PyHessian" if ph is None else (f"met ({ph:.1f}x)" if ph >= 5 else
                                                      f"**MISSED** ({ph:.1f}x)"))]
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                       "machine": mach, "versions": versions, "summary": summary,
                       "accuracy": {k: v for k, v in (acc or {}).items() if k != "spectrum"}, "speed": speed},
                  fh, indent=1, default=float)
    print("\n" + text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
