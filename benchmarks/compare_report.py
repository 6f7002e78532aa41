"""The report of ``compare.py``: the Markdown tables and verdicts, the plots, and results.md/json."""

from __future__ import annotations

import json
import os
import statistics

import numpy as np

from compare_problems import EIG_TOL, TRACE_RTOL

LABEL = {"specops": "specops", "pyhessian": "PyHessian", "hessian_eigenthings": "hessian-eigenthings",
         "curvlinops": "curvlinops", "matfree": "matfree"}



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



def report_speed(speed, cfg, tasks):
    """The speed table and the full-suite ratios; ``tasks``: library -> its task names."""
    libs = list(speed)
    so = speed["specops"]
    lines = ["| task | library | how | wall s | CPU s | products | wall / specops | peak MiB | result |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    caps = {"trace": cfg["trace_cap"], "trace_auto": cfg["auto_cap"]}
    for task in ("eig", "trace", "trace_auto", "density"):
        for lib in libs:
            if task not in tasks[lib]:
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



def write_results(out, *, preset, cfg, mach, versions, missing, shimmed, threads, elapsed, acc, speed, summary,
                  table_a=None, table_b=None) -> str:
    """Write ``results.md`` and ``results.json`` to ``out``; returns the Markdown."""
    md = [f"# specops vs peers ({preset} preset)\n",
          f"- machine: {mach['cpu']}, {mach['cores']} logical cores (shared), {mach['platform']}",
          f"- threads: torch.set_num_threads({threads}), OMP_NUM_THREADS={threads}",
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
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                       "machine": mach, "versions": versions, "summary": summary,
                       "accuracy": {k: v for k, v in (acc or {}).items() if k != "spectrum"}, "speed": speed},
                  fh, indent=1, default=float)
    return text
