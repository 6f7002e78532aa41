"""The tracker's plots: a :class:`~specops.TrackerLog`'s metrics against the step.

Called by the log's ``plot_*`` methods (``log.plot_trace()`` is ``plot_trace(log)``); each
draws on ``ax`` or on new axes of ``matplotlib.pyplot`` and, given a ``path``, saves the
figure atomically (:func:`specops.plots.atomic_savefig`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from specops.plots import atomic_savefig
from specops.tracker_log import RESIDUAL

if TYPE_CHECKING:
    from specops.tracker_log import TrackerLog


def plot_trace(log: TrackerLog, ax: Any = None, block: str | None = None, label: str | None = None,
               **kwargs: Any) -> Any:
    """The trace against the step with error bars of one standard error; returns the axes."""
    ax = _axes(ax)
    steps, est, err = log.traces(block)
    ax.errorbar(steps, est, yerr=err, marker="o", ms=3, capsize=3, label=label, **kwargs)
    ax.set_xlabel("step")
    ax.set_ylabel("trace of the Hessian" + (f" ({block})" if block else ""))
    return ax


def plot_eigenvalues(log: TrackerLog, ax: Any = None, block: str | None = None, label: str | None = None,
                     which: int = 0, **kwargs: Any) -> Any:
    """Eigenvalue ``which`` (0: the top) against the step, with its residual as error bar."""
    ax = _axes(ax)
    steps, vals, res = log.top_eigenvalues(block)
    ax.errorbar(steps, vals[:, which], yerr=res[:, which], marker="o", ms=3, capsize=3, label=label, **kwargs)
    ax.set_xlabel("step")
    ax.set_ylabel(f"eigenvalue {which + 1} of the Hessian" + (f" ({block})" if block else ""))
    return ax


def plot_density(log: TrackerLog, ax: Any = None, block: str | None = None, sigma: float | None = None,
                 cmap: str = "viridis") -> Any:
    """The spectral densities of all steps on one log-scale axes, coloured by step."""
    import matplotlib.pyplot as plt

    ax = _axes(ax)
    dens = log.densities(block)
    if not dens:
        raise ValueError("no density in this log: track metrics=('density', ...)")
    lo = min(float(d.nodes.min()) for _, d in dens)
    hi = max(float(d.nodes.max()) for _, d in dens)
    sigma = sigma if sigma is not None else max(0.005 * (hi - lo), 1e-12)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 1001)
    colors = plt.get_cmap(cmap)(np.linspace(0, 1, len(dens)))
    for (step, d), c in zip(dens, colors):
        values = d.evaluate(grid, sigma)
        ax.semilogy(grid, np.maximum(values, values.max() * 1e-10), color=c, label=f"step {step}")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return ax


def plot_curvatures(log: TrackerLog, path: str | None = None) -> Any:
    """The curvatures side by side; saved to ``path`` if given.

    Top eigenvalue and trace (with the residual term ``H - G``) against the step, and the
    last step's densities overlaid.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: the log tracked a single curvature.
    """
    import matplotlib.pyplot as plt

    names = log.curvatures
    if len(names) < 2:
        raise ValueError(f"this log tracked one curvature ({names}); track curvatures=('hessian', 'ggn')")
    fig, axes = plt.subplots(1, 3, figsize=(13.8, 3.6))
    for c in names:
        steps, vals, res = log.top_eigenvalues(curvature=c)
        if steps.size:
            axes[0].errorbar(steps, vals[:, 0], yerr=res[:, 0], marker="o", ms=3, capsize=3, label=c)
        steps, est, err = log.traces(curvature=c)
        if steps.size:
            axes[1].errorbar(steps, est, yerr=err, marker="o", ms=3, capsize=3, label=c)
    steps, est, err = log.traces(curvature=RESIDUAL)
    if steps.size:
        axes[1].errorbar(steps, est, yerr=err, marker="s", ms=3, capsize=3, ls="--", label="H - G")
    axes[0].set_ylabel("top eigenvalue")
    axes[1].set_ylabel("trace")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    last = {c: log.densities(curvature=c)[-1] for c in names if log.densities(curvature=c)}
    if last:
        lo = min(float(d.nodes.min()) for _, d in last.values())
        hi = max(float(d.nodes.max()) for _, d in last.values())
        sigma = max(0.005 * (hi - lo), 1e-12)
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 1001)
        for c, (step, d) in last.items():
            values = d.evaluate(grid, sigma)
            axes[2].semilogy(grid, np.maximum(values, values.max() * 1e-10), label=f"{c} (step {step})")
        axes[2].set_xlabel("eigenvalue")
        axes[2].set_ylabel("density")
        axes[2].legend(fontsize=7)
    else:
        axes[2].axis("off")
    fig.tight_layout()
    if path is not None:
        atomic_savefig(fig, path)
    return fig


def plot_sharpness(log: TrackerLog, ax: Any = None, path: str | None = None, label: str = "") -> Any:
    """Sharpness and preconditioned sharpness against the step, with the threshold as a dashed line.

    Log-scale y (raw and preconditioned sharpness differ by orders of magnitude under Adam).

    Returns:
        The axes.
    """
    ax = _axes(ax)
    s = log.sharpness()
    prefix = f"{label} " if label else ""
    line = ax.semilogy(s["step"], s["sharpness"], label=f"{prefix}lambda_1(H)")[0]
    if np.isfinite(s["preconditioned"]).any():
        ax.semilogy(s["step"], s["preconditioned"], color=line.get_color(), ls=":",
                    label=f"{prefix}lambda_1(P^-1 H)")
    if np.isfinite(s["threshold"]).any():
        ax.semilogy(s["step"], s["threshold"], color=line.get_color(), ls="--", lw=0.8,
                    label=f"{prefix}threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness")
    ax.legend(fontsize=7)
    if path is not None:
        atomic_savefig(ax.figure, path)
    return ax


def plot(log: TrackerLog, path: str | None = None) -> Any:
    """Trace, top eigenvalue and density evolution side by side; saved to ``path`` if given.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    panels = [p for p, ok in (("trace", log.traces()[0].size), ("eig", log.top_eigenvalues()[0].size),
                              ("density", len(log.densities()))) if ok]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.6 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        {"trace": plot_trace, "eig": plot_eigenvalues, "density": plot_density}[p](log, ax=ax)  # type: ignore[operator]  # a dict of plotters of different signatures, all taking ax
    fig.tight_layout()
    if path is not None:
        atomic_savefig(fig, path)
    return fig


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 3.8))[1]
