"""The study's figures in the paper's layout."""

from __future__ import annotations

import os

from typing import Any

import numpy as np

from specops.cli.study.arguments import STAGES
from specops.cli.study.summary import bar_error, data_errors, runs_by_depth, series
from specops.plots import atomic_savefig


def write_figures(study: dict, out: str) -> list[str]:
    """The figures in the paper's layout; returns their file names."""
    from specops.landscape import Landscape
    from specops.plots import pyplot as _pyplot
    from specops.tracker import TrackerLog

    plt = _pyplot()
    images = []
    by_depth = runs_by_depth(study)
    depths = sorted(by_depth)
    for key, name, ylabel in (("trace", "trace.png", "trace of the Hessian"),
                              ("eig", "top_eigenvalue.png", "top eigenvalue of the Hessian")):
        fig, axes = plt.subplots(1, len(depths), figsize=(4.8 * len(depths), 3.8), squeeze=False)
        for ax, d in zip(axes[0], depths):
            banded = False
            for r in by_depth[d]:
                s, v, e = series(r, key)
                line = ax.errorbar(s, v, yerr=e, marker="o", ms=3, capsize=3, label=r["label"])
                data = data_errors(r, key)
                if data is not None:  # the data's error as a band, the algorithm's as bars
                    ax.fill_between(s, v - data, v + data, color=line[0].get_color(), alpha=0.2, lw=0)
                    banded = True
            ax.set_title(f"ResNet-{d}" + (" (bars: algorithm's error; bands: data's)" if banded else ""),
                         fontsize=9 if banded else None)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if all(np.all(series(r, key)[1] > 0) for r in by_depth[d]):
                ax.set_yscale("log")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        atomic_savefig(fig, os.path.join(out, name))
        plt.close(fig)
        images.append(name)
    for d in depths:
        runs = by_depth[d]
        cols = max(len(r["checkpoints"]) for r in runs)
        fig, axes = plt.subplots(len(runs), cols, figsize=(2.6 * cols, 1.9 * len(runs)), squeeze=False)

        for i, r in enumerate(runs):
            dens = TrackerLog(r["checkpoints"]).densities()
            for j in range(cols):
                ax = axes[i][j]
                if j >= len(dens):
                    ax.axis("off")
                    continue
                step, dn = dens[j]
                grid = dn.default_grid()
                values = dn.evaluate(grid)
                ax.semilogy(grid, np.maximum(values, values.max() * 1e-8), lw=0.8)
                ax.tick_params(labelsize=6)
                if i == 0:
                    ax.set_title(f"epoch {step}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(r["label"], fontsize=7)
        fig.suptitle(f"ResNet-{d}: eigenvalue spectral density over training (SLQ)", fontsize=9)
        fig.tight_layout()
        name = f"esd_d{d}.png"
        atomic_savefig(fig, os.path.join(out, name))
        plt.close(fig)
        images.append(name)
    fig, axes = plt.subplots(len(depths), 1, figsize=(max(5.0, 0.9 * len(by_depth[depths[0]]) + 2),
                                                       3.4 * len(depths)), squeeze=False)
    for ax, d in zip(axes[:, 0], depths):
        runs = by_depth[d]
        x = np.arange(len(runs))
        for s, stage in enumerate(STAGES):  # type: ignore[assignment]  # s: the steps above, a stage index here
            vals = [r["checkpoints"][-1]["blocks"][stage]["trace"]["estimate"] for r in runs]
            errs = [bar_error(r["checkpoints"][-1]["blocks"][stage]["trace"]["stderr"]) for r in runs]
            ax.bar(x + (s - 1) * 0.27, vals, 0.27, yerr=errs, capsize=2, label=stage)
        ax.set_xticks(x)
        ax.set_xticklabels([r["label"] for r in runs], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"ResNet-{d}: trace per stage (last checkpoint)", fontsize=9)
        ax.axhline(0, color="0.5", lw=0.6)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out, "stage_trace.png"))
    plt.close(fig)
    images.append("stage_trace.png")
    if len(study["settings"].get("curvatures", ["hessian"])) > 1:
        images.append(_curvature_figure(study, out, plt))
    for d in depths:
        runs = by_depth[d]
        cols = min(len(runs), 3)
        rows = (len(runs) + cols - 1) // cols
        fig = plt.figure(figsize=(3.6 * cols, 3.2 * rows))
        for i, r in enumerate(runs):
            ls = Landscape.from_dict(r["landscape"])
            A, B = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
            ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
            ax.plot_surface(A, B, ls.losses, cmap="viridis", linewidth=0, antialiased=True)
            ax.set_title(r["label"], fontsize=8)
            ax.set_xlabel("eigvec 1", fontsize=6)
            ax.set_ylabel("eigvec 2", fontsize=6)
            ax.tick_params(labelsize=5)
        fig.suptitle(f"ResNet-{d}: loss along the top two eigenvectors (last checkpoint)", fontsize=9)
        name = f"landscape_d{d}.png"
        atomic_savefig(fig, os.path.join(out, name))
        plt.close(fig)
        images.append(name)
    return images


def _curvature_figure(study: dict, out: str, plt: Any) -> str:
    """``curvature.png``: top eigenvalue and trace of each curvature against the epoch, per depth.

    One colour per variant; the Hessian solid, the GGN dashed, the Fishers dotted, the residual
    term ``H - G`` (trace panel) dash-dotted.
    """
    from specops.tracker import RESIDUAL, TrackerLog

    names = study["settings"]["curvatures"]
    styles = {"hessian": ("-", "o"), "ggn": ("--", "s"), "empirical_fisher": (":", "^"), "mc_fisher": (":", "v"),
              RESIDUAL: ("-.", "x")}
    by_depth = runs_by_depth(study)
    depths = sorted(by_depth)
    fig, axes = plt.subplots(len(depths), 2, figsize=(11, 3.6 * len(depths)), squeeze=False)
    for row, d in zip(axes, depths):
        for i, r in enumerate(by_depth[d]):
            log, color = TrackerLog(r["checkpoints"]), f"C{i}"
            for c in names:
                ls, m = styles[c]
                steps, vals, _ = log.top_eigenvalues(curvature=c)
                row[0].plot(steps, vals[:, 0], ls=ls, marker=m, ms=3, color=color, label=f"{r['label']}, {c}")
            for c in [*names, RESIDUAL]:
                ls, m = styles[c]
                steps, est, err = log.traces(curvature=c)
                if steps.size:
                    row[1].errorbar(steps, est, yerr=err, ls=ls, marker=m, ms=3, capsize=2, color=color,
                                    label=f"{r['label']}, {'H - G' if c == RESIDUAL else c}")
        row[0].set_title(f"ResNet-{d}: top eigenvalue", fontsize=9)
        row[1].set_title(f"ResNet-{d}: trace", fontsize=9)
        row[1].axhline(0, color="0.5", lw=0.6)
        for ax in row:
            ax.set_xlabel("epoch")
        row[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out, "curvature.png"))
    plt.close(fig)
    return "curvature.png"
