"""specops.solve and specops.logdet side by side with SciPy's cg/minres and matfree's SLQ.

(a) Iterations of CG and MINRES against SciPy's ``cg`` / ``minres`` on ``A.to_scipy()`` at
    the same tolerance, on n = 2000 operators of the conformance kinds. SciPy's ``cg`` stops
    on ``||r|| <= rtol ||b||`` as specops does; SciPy's ``minres`` stops on its own test
    (``||r|| <= rtol (||A|| ||x|| + ||b||)``), so specops' MINRES is also run to the true
    relative residual SciPy's reached.
(b) ``logdet`` of an n = 2000 positive definite operator with condition number 1e4 over
    seeds, at budgets of probes x steps, against matfree's ``stochtrace`` +
    ``funm.monte_carlo_funm_sym_logdet`` (Lanczos with full reorthogonalization, Rademacher
    probes) at the same products.

matfree runs in this process when importable, else in ``$MATFREE_PYTHON`` (a Python with
matfree and JAX) as a worker on the same matrix: ``python benchmarks/linalg.py --matfree in.npz out.npz``.

Run: ``python benchmarks/linalg.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

N = 2000
BUDGETS = [(10, 30), (10, 50), (10, 80), (20, 50)]  # (probes, Lanczos steps per probe)


def symmetric(lam, seed):
    rng = np.random.default_rng(seed)
    Q, R = np.linalg.qr(rng.standard_normal((len(lam), len(lam))))
    Q = Q * np.sign(np.diag(R))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def operators():
    rng = np.random.default_rng(0)
    return {
        "SPD, cond 1e4 (log-spaced)": np.logspace(0, 4, N),
        "SPD, cond 1e4 (uniform)": np.linspace(1, 1e4, N),
        "clustered": np.concatenate([rng.normal(1, 1e-3, N - N // 3), rng.normal(4, 1e-3, N // 3)]),
        "indefinite": np.concatenate([rng.uniform(-3, -0.5, N // 3), rng.uniform(0.5, 5, N - N // 3)]),
    }


def scipy_iterations(solver, A, b, rtol):
    count = [0]
    x, info = solver(A, b, rtol=rtol, maxiter=20 * N, callback=lambda xk: count.__setitem__(0, count[0] + 1))
    return count[0], x


def solvers(tol=1e-8):
    import scipy.sparse.linalg as sla

    import specops as so

    print(f"(a) iterations to ||b - A x|| <= {tol:g} ||b|| (n = {N}; SciPy on A.to_scipy())")
    print(f"{'operator':30s} {'method':7s} {'SciPy':>6s} {'specops':>8s} {'ratio':>6s}  true relative residuals")
    rows = []
    b = np.random.default_rng(1).standard_normal(N)
    for name, lam in operators().items():
        M = symmetric(lam, 2)
        A = so.aslinearoperator(M)
        methods = ["minres"] if lam.min() < 0 else ["cg", "minres"]
        for method in methods:
            ref, x = scipy_iterations(getattr(sla, method), A.to_scipy(), b, tol)
            ref_res = np.linalg.norm(b - M @ x) / np.linalg.norm(b)
            r = so.solve(A, b, method=method, tol=tol, max_matvecs=20 * N)
            line = (f"{name:30s} {method:7s} {ref:6d} {r.settings['iterations']:8d} "
                    f"{r.settings['iterations'] / ref:6.2f}  SciPy {ref_res:.1e}, specops {r.relative_residual:.1e}")
            same = None
            if method == "minres":  # SciPy's stopping test differs: match the residual it reached
                same = so.solve(A, b, method="minres", tol=max(ref_res, 1e-15), max_matvecs=20 * N)
                line += f"; to SciPy's residual: {same.settings['iterations']} ({same.settings['iterations'] / ref:.2f})"
            print(line)
            rows.append((name, method, ref, r.settings["iterations"], None if same is None else same.settings["iterations"]))
    return rows


def matfree_logdet(M, budgets, seeds):
    """matfree's SLQ log-determinant estimates: {(probes, steps): [estimate per seed]}."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from matfree import decomp, funm, stochtrace

    Mj = jnp.asarray(M)

    def matvec(v):
        return Mj @ v

    out = {}
    x0 = jnp.zeros(M.shape[0])
    for probes, steps in budgets:
        integrand = funm.monte_carlo_funm_sym_logdet(decomp.tridiag_sym(steps))
        estimator = jax.jit(stochtrace.estimator_monte_carlo(integrand, stochtrace.sampler_signs(x0, num=probes)),
                            static_argnums=0)
        out[(probes, steps)] = [float(estimator(matvec, jax.random.PRNGKey(s))) for s in seeds]
    return out


def _matfree_elsewhere(M, budgets, seeds):
    python = os.environ.get("MATFREE_PYTHON")
    if not python:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(src, M=M, budgets=np.array(budgets), seeds=np.array(seeds))
        subprocess.run([python, __file__, "--matfree", src, dst], check=True)
        res = np.load(dst)
        return {tuple(b): list(res["estimates"][i]) for i, b in enumerate(res["budgets"])}


def logdets(seeds=range(10)):
    import specops as so

    lam = np.logspace(0, 4, N)
    M = symmetric(lam, 3)
    truth = float(np.sum(np.log(lam)))
    print(f"\n(b) log det of an n = {N} positive definite operator, eigenvalues log-spaced in [1, 1e4]: "
          f"{truth:.2f}; relative errors over {len(seeds)} seeds")
    try:
        import matfree  # noqa: F401

        peer = matfree_logdet(M, BUDGETS, list(seeds))
    except ImportError:
        peer = _matfree_elsewhere(M, BUDGETS, list(seeds))
    print(f"{'probes x steps':>15s} {'products':>8s}  {'specops median / max error':>27s}  "
          f"{'stderr':>7s} {'quadrature':>10s}  {'matfree median / max':>21s}  {'s':>6s}")
    rows = []
    for probes, steps in BUDGETS:
        errs, sds, quads, t0 = [], [], [], time.perf_counter()
        for s in seeds:
            r = so.logdet(M, num_probes=probes, num_steps=steps, seed=s, spectrum=(1.0, 1e4))
            errs.append(abs(r.estimate - truth) / truth)
            sds.append(r.stderr / truth)
            quads.append(r.quadrature_error / truth)
        seconds = (time.perf_counter() - t0) / len(seeds)
        other = "not installed"
        if peer is not None:
            e = np.abs(np.array(peer[(probes, steps)]) - truth) / truth
            other = f"{np.median(e):.2%} / {e.max():.2%}"
        print(f"{probes:>6d} x {steps:<6d} {probes * steps:8d}  {np.median(errs):>14.2%} / {max(errs):.2%}     "
              f"{np.median(sds):7.2%} {np.median(quads):10.2%}  {other:>21s}  {seconds:6.2f}")
        rows.append((probes, steps, errs, peer and peer[(probes, steps)]))
    return rows


def _worker(src, dst):
    data = np.load(src)
    budgets = [tuple(int(x) for x in b) for b in data["budgets"]]
    out = matfree_logdet(data["M"], budgets, [int(s) for s in data["seeds"]])
    np.savez(dst, budgets=np.array(budgets), estimates=np.array([out[b] for b in budgets]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds")
    parser.add_argument("--matfree", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.matfree:
        _worker(*args.matfree)
        sys.exit()
    solvers()
    logdets(range(3) if args.quick else range(10))
