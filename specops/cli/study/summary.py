"""``summary.md``: the study's tables in Markdown."""

from __future__ import annotations

import math

import numpy as np

from specops.cli.study.arguments import STAGES


def runs_by_depth(study: dict) -> dict[int, list[dict]]:
    """The runs of a study grouped by depth."""
    out: dict[int, list[dict]] = {}
    for r in study["runs"].values():
        out.setdefault(r["depth"], []).append(r)
    return out


def bar_error(stderr: float | None) -> float:
    """A stderr as an error bar: 0 for an infinite one (a single probe; ``None`` in studies before specops.io)."""
    return 0.0 if stderr is None or not math.isfinite(stderr) else stderr


def series(run: dict, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(epochs, values, errors)`` of a run over its checkpoints: the trace (``"trace"``) or the top eigenvalue."""
    steps = np.array([c["step"] for c in run["checkpoints"]])
    if key == "trace":
        return (steps, np.array([c["trace"]["estimate"] for c in run["checkpoints"]]),
                np.array([bar_error(c["trace"]["stderr"]) for c in run["checkpoints"]]))
    return (steps, np.array([c["eigenvalues"][0] for c in run["checkpoints"]]),
            np.array([c["residuals"][0] for c in run["checkpoints"]]))


def data_errors(run: dict, key: str) -> np.ndarray | None:
    """The data standard errors of a run's trace (``"trace"``) or top eigenvalue over its checkpoints.

    None when the study recorded none (``--no-data-error``, or a study from before them).
    """
    if key == "trace":
        values = [c["trace"].get("data_stderr") for c in run["checkpoints"]]
    else:
        values = [c["data_stderr"][0] if "data_stderr" in c else None for c in run["checkpoints"]]
    return None if any(v is None for v in values) else np.array([bar_error(v) for v in values])


def _curvature_rows(study: dict) -> list[str]:
    """The table of every curvature's top eigenvalue and trace at the last checkpoint."""
    from specops.tracker import RESIDUAL, TrackerLog

    names = study["settings"].get("curvatures", ["hessian"])
    if len(names) < 2:
        return []
    res = "ggn" in names
    lines = ["", "## Curvatures at the last checkpoint", "",
             "| depth | variant | " + " | ".join(f"{c} top eigenvalue | {c} trace" for c in names)
             + (" | trace of H - G +- stderr |" if res else " |"),
             "|---|---|" + "---|---|" * len(names) + ("---|" if res else "")]
    for d, runs in sorted(runs_by_depth(study).items()):
        for r in runs:
            log = TrackerLog(r["checkpoints"][-1:])
            cells = []
            for c in names:
                ev, tr = log.top_eigenvalues(curvature=c)[1], log.traces(curvature=c)[1]
                cells += [_f(ev[0, 0] if ev.size else None), _f(tr[0] if tr.size else None)]
            if res:
                _, est, err = log.traces(curvature=RESIDUAL)
                cells.append(f"{_f(est[0])} +- {_f(err[0], 2)}" if est.size else "-")
            lines.append(f"| {d} | {r['label']} | " + " | ".join(cells) + " |")
    return lines


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def summary_markdown(study: dict, images: list[str]) -> str:
    """``summary.md``: the accuracy and curvature tables, and the figures."""
    s = study["settings"]
    lines = ["# specops study", "",
             (f"Data **{s['data']}**; depths {', '.join(map(str, s['depths']))}; {s['epochs']} epochs (SGD, "
              f"momentum 0.9, lr x0.1 at 4/9 and 2/3); learning rates swept {', '.join(f'{x:g}' for x in s['lrs'])}"
              f" (best held-out accuracy kept); checkpoints at epochs {', '.join(map(str, s['checkpoints']))}; "
              f"Hessian over {s['hessian_samples']} training images; seed {s['seed']}; {study['ranks']} rank(s); "
              f"{study['seconds']['total']:.0f} s."), ""]
    by_depth = runs_by_depth(study)
    variants = list(dict.fromkeys(r["label"] for r in study["runs"].values()))
    lines += ["## Held-out accuracy (best learning rate)", "",
              "| depth | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for d in sorted(by_depth):
        cells = {r["label"]: f"{100 * r['test_accuracy']:.1f}" for r in by_depth[d]}
        lines.append(f"| ResNet-{d} | " + " | ".join(cells.get(v, "-") for v in variants) + " |")
    data = s.get("data_error", False)
    lines += ["", "## Curvature at the last checkpoint", ""]
    if data:
        lines += [f"Beside the algorithm's error (the top eigenvalue's residual, the trace's probe stderr), the data's: "
                  f"the standard error over resampling the {s['hessian_samples']} Hessian images (`data_error=True`; "
                  "docs/algorithms.md, \"How much data?\"). The two are independent: they add in quadrature.", ""]
    lines += ["| depth | variant | lr | train acc | test acc | top eigenvalue"
              + (" +- data stderr" if data else "") + " | trace +- stderr" + (" +- data stderr" if data else "")
              + " | stage 1 trace | stage 2 trace | stage 3 trace |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in sorted(by_depth):
        for r in by_depth[d]:
            c = r["checkpoints"][-1]
            st = [c["blocks"][x]["trace"] for x in STAGES]
            top, tr = _f(c["eigenvalues"][0]), f"{_f(c['trace']['estimate'])} +- {_f(c['trace']['stderr'], 2)}"
            if data:
                top += f" +- {_f(c['data_stderr'][0], 2)}"
                tr += f" +- {_f(c['trace']['data_stderr'], 2)}"
            lines.append(f"| {d} | {r['label']} | {r['best_lr']:g} | {100 * r['train_accuracy']:.1f} | "
                         f"{100 * r['test_accuracy']:.1f} | {top} | {tr} | "
                         + " | ".join(f"{_f(t['estimate'])}" for t in st) + " |")
    lines += _curvature_rows(study)
    lines += ["", "## Learning-rate sweep (held-out accuracy)", "",
              "| depth | variant | " + " | ".join(f"lr {x:g}" for x in s["lrs"]) + " |",
              "|---|---|" + "---|" * len(s["lrs"])]
    for d in sorted(by_depth):
        for r in by_depth[d]:
            lines.append(f"| {d} | {r['label']} | "
                         + " | ".join(f"{100 * r['sweep'][f'{x:g}']['test_accuracy']:.1f}" for x in s["lrs"]) + " |")
    captions = {"trace.png": "Trace vs. epoch", "top_eigenvalue.png": "Top eigenvalue vs. epoch",
                "stage_trace.png": "Stage-wise trace",
                "curvature.png": "Hessian vs. " + ", ".join(s.get("curvatures", ["hessian"])[1:]) + " over training"}
    for img in images:
        cap = captions.get(img) or (f"ESD evolution, ResNet-{img[5:-4]}" if img.startswith("esd_d")
                                    else f"Loss landscape, ResNet-{img[11:-4]}")
        lines += ["", f"## {cap}", "", f"![{img}]({img})"]
    lines += ["", "Every number with its settings: `study.json`; per run: `runs/<variant>_d<depth>/curvature.jsonl` "
              "(one record per checkpoint) and `landscape.json`."]
    return "\n".join(lines) + "\n"
