"""The ``curvature`` stage: the Hessian beside the Gauss-Newton matrix and the Fishers.

``--curvature hessian,ggn`` (any of :data:`CURVATURES`, comma-separated) computes, for each
operator, its top ``--top-k`` eigenvalues and its spectral density (SLQ, the ``--esd-*``
settings), and, when both the Hessian and the GGN are listed, the trace of the residual
term ``H - G``; ``curvature.png`` overlays the densities. The Hessian's eigenvalues and
density are taken from the ``eigen`` and ``esd`` stages when they ran. ``--fisher-datum
term`` makes one loss term (not one sample) a datum of the empirical Fisher.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from specops.cli import report as rp
from specops.cli.common import UsageError
from specops.curvature import _LEGACY_NAMES as CURVATURES

if TYPE_CHECKING:
    from specops.cli.analyze.stage import Context
    from specops.model import ModelOperator
    from specops.operator import LinearOperator

NAME = "curvature"


def parse(text: str) -> list[str]:
    """``--curvature``: comma-separated names of :data:`CURVATURES`.

    Args:
        text: the argument.

    Returns:
        The names, without repeats, in order.

    Raises:
        UsageError: an unknown name.
    """
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in CURVATURES]
    if unknown or not names:
        raise UsageError(f"--curvature: unknown operator {unknown[0] if unknown else text!r}; choose from "
                         f"{', '.join(CURVATURES)} (comma-separated, e.g. hessian,ggn)")
    return list(dict.fromkeys(names))


def check(args: argparse.Namespace) -> None:
    """Checks before any computation (called by ``check_args``); normalizes ``args.curvature``.

    Args:
        args: the parsed arguments.

    Raises:
        UsageError: an unknown name, the GGN/Fisher with the JAX backend, or ``--fisher-datum``
            without the empirical Fisher.
    """
    names = parse(args.curvature)
    if getattr(args, "fisher_datum", "sample") != "sample" and "fisher" not in names:
        raise UsageError("--fisher-datum is the empirical Fisher's: add fisher to --curvature (e.g. "
                         "--curvature hessian,fisher) or leave --fisher-datum out")
    if args.backend == "jax" and any(CURVATURES[n] for n in names):
        raise UsageError("--curvature ggn/fisher/mc-fisher needs --backend torch or tensorflow: the JAX session's "
                         "loss_fn(params, batch) does not separate the model from the loss; in Python, use "
                         "specops.backends.jax.ggn(apply_fn, loss_fn, params, data)")
    args.curvature = ",".join(names)


def wanted(args: argparse.Namespace) -> bool:
    """Whether the stage runs: ``--curvature`` names more than the Hessian.

    Args:
        args: the parsed arguments.

    Returns:
        ``True`` if it names the GGN or a Fisher.
    """
    return any(CURVATURES[n] for n in parse(args.curvature))


def operator(ctx: Context, name: str) -> ModelOperator:
    """The operator called ``name`` (a :data:`CURVATURES` key) of the run's model, loss and data.

    Args:
        ctx: the run's context.
        name: the operator's ``--curvature`` name.

    Returns:
        The Hessian itself, or a curvature operator of the same model.
    """
    from specops.curvature import curvature_like

    kind = CURVATURES[name]
    if kind is None:
        return ctx.H
    datum = {"datum": ctx.args.fisher_datum} if kind == "empirical_fisher" else {}
    return curvature_like(ctx.H, kind, seed=ctx.args.seed, **datum)


def analyse(ctx: Context, name: str, A: LinearOperator) -> dict:
    """Top eigenvalues and the density of one operator (reusing the Hessian's stages).

    Args:
        ctx: the run's context.
        name: the operator's ``--curvature`` name.
        A: the operator.

    Returns:
        ``{"eigen", "esd", "num_matvecs"}``: the results as dicts and the products used.
    """
    import specops as so

    a, stages = ctx.args, ctx.state.data["stages"]
    if name == "hessian" and "eigen" in stages and "esd" in stages:
        return {"eigen": stages["eigen"]["result"], "esd": stages["esd"]["result"], "num_matvecs": 0,
                "seconds": 0.0, "from_stages": True}
    t0 = time.perf_counter()
    eig = so.eigsh(A, k=a.top_k, tol=a.eig_tol, max_matvecs=a.eig_matvecs, seed=a.seed,
                   progress=ctx.printer.bar(f"{name}: top eigenvalues"))
    d = so.spectral_density(A, num_probes=a.esd_probes, num_steps=a.esd_steps, seed=a.seed,
                            progress=ctx.printer.bar(f"{name}: spectral density"))
    ctx.printer(f"  {name}: top eigenvalues {np.array2string(eig.eigenvalues, precision=4)}")
    return {"eigen": eig.to_dict(), "esd": d.to_dict(), "num_matvecs": eig.num_matvecs + d.num_matvecs,
            "seconds": time.perf_counter() - t0}


def run(ctx: Context) -> None:
    """Run the stage (when :func:`wanted`) and draw ``curvature.png``.

    Args:
        ctx: the run's context.
    """
    import specops as so

    a = ctx.args
    if not wanted(a):
        return
    names = parse(a.curvature)
    settings = dict(curvature=names, k=a.top_k, tol=a.eig_tol, max_matvecs=a.eig_matvecs, num_probes=a.esd_probes,
                    num_steps=a.esd_steps, trace_matvecs=a.trace_matvecs, trace_rtol=a.trace_rtol, seed=a.seed)
    if "fisher" in names:
        settings["fisher_datum"] = a.fisher_datum
    if not ctx.skip(NAME, settings):
        t0 = time.perf_counter()
        ops = {n: operator(ctx, n) for n in names}
        result: dict[str, Any] = {"operators": {}}
        total = 0
        for n, A in ops.items():
            r = analyse(ctx, n, A)
            total += r["num_matvecs"]
            r["engine"] = A.engine
            result["operators"][n] = r
        if "hessian" in ops and "ggn" in ops:
            tt = time.perf_counter()
            t = so.trace(ops["hessian"] - ops["ggn"], num_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed,
                         progress=ctx.printer.bar("trace of H - G"))
            ctx.printer(f"  trace(H - G) = {t.estimate:.4g} +- {t.stderr:.2g}")
            result["residual_trace"] = t.to_dict()
            result["residual_trace_target"] = rp.rtol_target(t.to_dict(), a.trace_rtol)
            result["residual_trace_seconds"] = time.perf_counter() - tt
            total += t.num_matvecs
        ctx.state.finish(NAME, settings, result, total, time.perf_counter() - t0)
    if ctx.state.write:
        plot(ctx.state.data["stages"][NAME]["result"], os.path.join(ctx.out, "curvature.png"))


def plot(result: dict, path: str) -> None:
    """``curvature.png``: the operators' densities on one axis (log scale), top eigenvalues marked.

    Args:
        result: the stage's result.
        path: the file to write.
    """
    from specops.density import LOG_PLOT_RANGE, SpectralDensity

    plt = rp._pyplot()
    dens = {n: SpectralDensity.from_dict(r["esd"]) for n, r in result["operators"].items()}
    lo = min(float(np.min(d.nodes)) for d in dens.values())
    hi = max(float(np.max(d.nodes)) for d in dens.values())
    sigma = max((d.default_sigma() for d in dens.values()), default=1e-3)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 800)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    peak = 0.0
    for i, (n, d) in enumerate(dens.items()):
        y = d.evaluate(grid, sigma)
        peak = max(peak, float(y.max()))
        ax.semilogy(grid, np.maximum(y, np.finfo(float).tiny), color=f"C{i}", label=n)
        for lam in np.asarray(rp._from_jsonable(result["operators"][n]["eigen"])["eigenvalues"], dtype=float):
            ax.axvline(lam, color=f"C{i}", lw=0.7, ls="--")
    if peak > 0:
        ax.set_ylim(peak * LOG_PLOT_RANGE, peak * 3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (per unit eigenvalue)")
    ax.legend(fontsize=8)
    title = (f"spectral densities (SLQ); dashed: top eigenvalues\nGaussian kernel sigma = {sigma:.3g}; each "
             f"density integrates to 1; axis from {LOG_PLOT_RANGE:.0e} x peak")
    if "residual_trace" in result:
        t = result["residual_trace"]
        title += f"\ntrace(H - G) = {t['estimate']:.4g} +- {t['stderr']:.2g}"
    ax.set_title(title, fontsize=9)
    rp.atomic_savefig(fig, path)
    plt.close(fig)
