"""The curvature report of ``specops analyze``: state on disk, plots and summaries.

- :class:`ReportState`: ``results.json`` in the output folder, rewritten atomically
  (a temporary file, then ``os.replace``) after every finished stage, so a killed run
  loses at most the stage it was in and ``--resume`` continues from there.
- :func:`write_plots`, :func:`summary_markdown`, :func:`summary_table`: the pictures
  (``esd.png``, ``landscape.png``, ``blocks.png``), ``summary.md`` and the terminal table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np

from specops.io import atomic_save_npy, atomic_write, dumps  # noqa: F401  (rp.atomic_save_npy in the stages)
from specops.io import from_jsonable as _from_jsonable
from specops.io import to_jsonable as _to_jsonable
from specops.plots import atomic_savefig, pyplot as _pyplot  # noqa: F401  (rp._pyplot in the stages)

RESULTS = "results.json"
STAGES = ("train", "eigen", "trace", "esd", "curvature", "blocks", "landscape")


# --- files ----------------------------------------------------------------------------------
def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there.

    Raises:
        OSError: with a message naming the folder.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".specops-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(f"--out {folder!r} is not writable ({e.strerror or e}); choose another folder") from e


def library_versions() -> dict:
    """Versions of Python, specops and the numerical libraries that are imported."""
    import numpy
    import scipy

    import specops

    out = {"python": platform.python_version(), "platform": platform.platform(), "specops": specops.__version__,
           "numpy": numpy.__version__, "scipy": scipy.__version__}
    for name in ("torch", "jax", "tensorflow", "mpi4py", "matplotlib"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def rtol_target(result: dict, rtol: float | None) -> dict:
    """Whether a stochastic estimate reached its relative-standard-error target.

    Args:
        result: the estimate as a dict with ``estimate`` and ``stderr`` (a trace's ``to_dict()``).
        rtol: the target ``stderr / |estimate|`` (``--trace-rtol``); None: no target.

    Returns:
        ``{"target_rtol", "reached_rtol", "met"}``; ``reached_rtol`` is ``inf`` for a zero
        estimate with a nonzero stderr, and ``met`` is True without a target.
    """
    est, err = abs(float(result["estimate"])), float(result["stderr"])
    reached = err / est if est > 0 else (0.0 if err == 0 else math.inf)
    return dict(target_rtol=rtol, reached_rtol=reached, met=rtol is None or reached <= rtol)


def data_target(values: Any, stderrs: Any, samples: int, fraction: float) -> dict:
    """The samples that would bring each data standard error under ``fraction`` of its value.

    :func:`specops.data_error.samples_needed` for each value (None for a zero value): an
    estimate that assumes the data error falls as ``1 / sqrt(samples)``.

    Args:
        values: the estimates (eigenvalues, or the trace as a one-element list).
        stderrs: their data standard errors.
        samples: the samples they were measured on.
        fraction: the wanted relative data error (``--data-error``).

    Returns:
        ``{"fraction", "samples", "relative", "samples_needed"}``, the last two one per value.
    """
    from specops.data_error import samples_needed

    vals = [float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64))]
    errs = [float(e) for e in np.atleast_1d(np.asarray(stderrs, dtype=np.float64))]
    return dict(fraction=float(fraction), samples=int(samples),
                relative=[e / abs(v) if v else math.inf for v, e in zip(vals, errs)],
                samples_needed=[samples_needed(e, v, samples, fraction) if v else None for v, e in zip(vals, errs)])


# --- state ----------------------------------------------------------------------------------
class ReportState:
    """The contents of ``results.json`` and the rules for resuming.

    Layout: ``{"format", "settings", "model", "versions", "stages": {name: {"settings",
    "result", "num_matvecs", "seconds", "finished"}}}``. A stage counts as done when it
    is present with the same stage settings; the model's fingerprint (parameter count,
    sample count, loss) must match for a resume to be allowed.

    Args:
        folder: the output folder.
        write: whether this process writes (rank 0) or only keeps the state in memory.
    """

    FORMAT = "specops-analyze/1"

    def __init__(self, folder: str, write: bool = True) -> None:
        self.folder = folder
        self.write = write
        self.saved = False  # whether this process has written results.json
        self.data: dict = {"format": self.FORMAT, "settings": {}, "model": {}, "versions": {}, "stages": {}}

    @property
    def path(self) -> str:
        """The path of ``results.json``."""
        return os.path.join(self.folder, RESULTS)

    def load(self) -> bool:
        """Read an earlier run's ``results.json``; False if there is none."""
        if not os.path.exists(self.path):
            return False
        with open(self.path) as fh:
            data = json.load(fh)
        if data.get("format") != self.FORMAT:
            raise ValueError(f"{self.path} was not written by specops analyze (format {data.get('format')!r})")
        self.data = data
        return True

    def save(self) -> None:
        """Write ``results.json`` atomically (on the writing rank only)."""
        if self.write:
            atomic_write(self.path, dumps(self.data, indent=1))
            self.saved = True

    def done(self, stage: str, settings: dict) -> bool:
        """Whether ``stage`` finished earlier with these ``settings``."""
        entry = self.data["stages"].get(stage)
        return entry is not None and entry.get("settings") == _to_jsonable(settings)

    def result(self, stage: str) -> Any:
        """A finished stage's result, with its arrays as NumPy arrays."""
        return _from_jsonable(self.data["stages"][stage]["result"])

    def finish(self, stage: str, settings: dict, result: Any, num_matvecs: int, seconds: float,
               **extra: Any) -> None:
        """Record a finished stage and write ``results.json`` at once.

        ``extra`` entries (e.g. ``target``: :func:`rtol_target` of an estimate) are stored
        beside the result.
        """
        self.data["stages"][stage] = _to_jsonable(dict(
            settings=settings, result=result, num_matvecs=int(num_matvecs), seconds=float(seconds),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra))
        self.save()

    def stage(self, name: str) -> dict | None:
        """A stage's whole entry (settings, result, cost), or None if it did not run."""
        entry = self.data["stages"].get(name)
        return None if entry is None else _from_jsonable(entry)


# --- plots ----------------------------------------------------------------------------------
def plot_esd(density: Any, top_eigenvalues: list, path: str, title: str = "") -> None:
    """``esd.png``: the spectral density on a log scale with the top eigenvalues marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    density.plot(ax=ax, log=True)
    if title:
        ax.set_title(f"{title}\n{ax.get_title()}", fontsize=9)
    for i, lam in enumerate(top_eigenvalues):
        ax.axvline(lam, color="C3", lw=0.8, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
    if len(top_eigenvalues):
        ax.legend(loc="upper right", fontsize=8)
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_landscape(ls: Any, path: str, title: str = "", eigenvalues: Any = None) -> None:
    """``landscape.png``: the loss along a line or on a plane (contours).

    With ``eigenvalues`` (directions that are the top eigenvectors), each axis names the
    eigenvector and its eigenvalue.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ls.plot(ax=ax)
    if eigenvalues is not None:
        labels = [f"step along eigenvector {i + 1} (eigenvalue {_fmt(lam, 4)})"
                  for i, lam in enumerate(list(eigenvalues)[: ls.ndim])]
        ax.set_xlabel(labels[0])
        if ls.ndim == 2:
            ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title, fontsize=9)
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_blocks(blocks: dict, path: str, title: str = "") -> None:
    """Bar charts of each block's trace (with its standard error) and top eigenvalue."""
    plt = _pyplot()
    blocks = _from_jsonable(blocks)
    names = list(blocks)
    x = np.arange(len(names))
    traces = [blocks[b]["trace"]["estimate"] for b in names]
    errors = [blocks[b]["trace"]["stderr"] for b in names]
    tops = [blocks[b]["eigen"]["eigenvalues"][0] for b in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.2 * len(names) + 3), 3.8))
    axes[0].bar(x, traces, yerr=errors, capsize=3, color="C0")
    axes[0].set_title("trace of the block Hessian (± stderr)")
    axes[0].set_ylabel("trace")
    axes[1].bar(x, tops, color="C1")
    axes[1].set_title("top eigenvalue of the block Hessian")
    axes[1].set_ylabel("eigenvalue")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_xlabel("block (--blocks)")
        ax.axhline(0, color="0.5", lw=0.6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


# --- summaries ------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


#: The matvecs and seconds cells of a row whose numbers came out of the row above's computation.
SAME_RUN = "(same run)"


def _pct(x: float) -> str:
    return f"{100 * x:.3g} %" if math.isfinite(x) else "inf"


def estimate_row(label: str, result: dict, target: dict | None, matvecs: Any, seconds: Any) -> tuple:
    """The row of a stochastic estimate: its value, stderr, and whether it reached its target.

    Args:
        label: the quantity.
        result: ``{"estimate", "stderr", ...}`` (a trace's ``to_dict()``).
        target: :func:`rtol_target` of the estimate, or None (no target recorded).
        matvecs: the products cell.
        seconds: the seconds (a number) or the cell's text.

    Returns:
        ``(quantity, value, uncertainty, converged, matvecs, seconds)``: ``converged`` is
        ``"NO"`` when the budget ran out before the target, and the uncertainty then names
        the target and the relative stderr reached; with a ``data_stderr`` (``--data-error``)
        the uncertainty gives the probes' and the data's standard errors.
    """
    data = result.get("data_stderr")
    uncertainty, converged = f"{'probes ' * (data is not None)}stderr {_fmt(result['stderr'], 2)}", "-"
    if target and target.get("target_rtol") is not None:
        reached, goal = float(target["reached_rtol"]), float(target["target_rtol"])
        uncertainty += f" ({_pct(reached)} relative; target {_pct(goal)})"
        converged = "yes" if target["met"] else "NO"
    if data is not None:
        uncertainty += f"; data stderr {_fmt(data, 2)}"
    return (label, _fmt(result["estimate"], 6), uncertainty, converged, matvecs, _seconds(seconds))


def _seconds(x: Any) -> str:
    return x if isinstance(x, str) else _fmt(x, 3)


def summary_rows(data: dict) -> list[tuple]:
    """``(quantity, value, uncertainty, converged, matvecs, seconds)`` rows from results.json data.

    One function per stage adds its rows (:data:`ROW_MAKERS`); a stochastic estimate's row
    comes from :func:`estimate_row`.
    """
    return [row for make in ROW_MAKERS for row in make(data)]


def _eigen_rows(data: dict) -> list[tuple]:
    st = data["stages"].get("eigen")
    if not st:
        return []
    r = _from_jsonable(st["result"])
    data = r.get("data_stderr")
    data = [None] * len(r["eigenvalues"]) if data is None else data
    return [(f"eigenvalue {i + 1}", _fmt(lam, 6), f"residual {_fmt(res, 2)}" + (
             "" if d is None else f"; data stderr {_fmt(d, 2)}"), "yes" if ok else "NO",
             st["num_matvecs"] if i == 0 else SAME_RUN, _fmt(st["seconds"], 3) if i == 0 else SAME_RUN)
            for i, (lam, res, ok, d) in enumerate(zip(r["eigenvalues"], r["residuals"], r["converged"], data))]


def _trace_rows(data: dict) -> list[tuple]:
    st = data["stages"].get("trace")
    if not st:
        return []
    return [estimate_row("trace", st["result"], st.get("target"), st["num_matvecs"], st["seconds"])]


def _esd_rows(data: dict) -> list[tuple]:
    st = data["stages"].get("esd")
    if not st:
        return []
    nodes = np.asarray(_from_jsonable(st["result"])["nodes"])
    return [("ESD support", f"[{_fmt(nodes.min())}, {_fmt(nodes.max())}]",
             f"{nodes.shape[0]} probes x {nodes.shape[1]} steps", "-", st["num_matvecs"], _fmt(st["seconds"], 3))]


def _block_rows(data: dict) -> list[tuple]:
    st = data["stages"].get("blocks")
    if not st:
        return []
    rows = []
    for name, b in st["result"].items():
        e, t = _from_jsonable(b["eigen"]), b["trace"]
        rows.append((f"[{name}] eigenvalue 1", _fmt(e["eigenvalues"][0], 6),
                     f"residual {_fmt(e['residuals'][0], 2)}", "yes" if e["converged"][0] else "NO",
                     e["num_matvecs"], _fmt(b.get("eigen_seconds"), 3)))
        rows.append(estimate_row(f"[{name}] trace", t, b.get("trace_target"), t["num_matvecs"],
                                 b.get("trace_seconds", "-")))
    return rows


def _landscape_rows(data: dict) -> list[tuple]:
    st = data["stages"].get("landscape")
    if not st:
        return []
    r = _from_jsonable(st["result"])
    losses = np.asarray(r["losses"])
    return [(f"landscape ({r['settings']['ndim']}-D, {r['settings']['directions']})",
             f"loss {_fmt(r['center_loss'])} at 0", f"range [{_fmt(losses.min())}, {_fmt(losses.max())}]",
             "-", f"{r['num_evaluations']} losses", _fmt(st["seconds"], 3))]


def _curvature_rows(data: dict) -> list[tuple]:
    """Rows of the ``curvature`` stage (:mod:`specops.cli.analyze.curvature`).

    Each operator's top eigenvalues, and the trace of the residual term H - G.
    """
    st = data["stages"].get("curvature")
    if not st:
        return []
    rows = []
    for n, r in st["result"]["operators"].items():
        e = _from_jsonable(r["eigen"])
        lams = ", ".join(_fmt(x, 5) for x in e["eigenvalues"])
        cost = ("(eigen, esd stages)",) * 2 if r.get("from_stages") else (
            r.get("num_matvecs", "-"), _fmt(r.get("seconds"), 3))
        rows.append((f"[{n}] top eigenvalues", lams, f"max residual {_fmt(max(e['residuals']), 2)}",
                     "yes" if all(e["converged"]) else "NO", *cost))
    t = st["result"].get("residual_trace")
    if t:
        rows.append(estimate_row("trace(H - G)", t, st["result"].get("residual_trace_target"), t["num_matvecs"],
                                 st["result"].get("residual_trace_seconds", "-")))
    return rows


#: The row makers of :func:`summary_rows`, in the order of the table.
ROW_MAKERS = [_eigen_rows, _trace_rows, _esd_rows, _curvature_rows, _block_rows, _landscape_rows]


def reading(data: dict) -> list[str]:
    """A short reading of the report's own numbers, one sentence each.

    The fraction of the spectrum at or below zero with its standard error and the
    quadrature's bracket (:meth:`specops.SpectralDensity.negative_fraction`), the most
    negative eigenvalue as far as the spectral density's Ritz values show it, the top
    eigenvalue against the stability threshold ``2 (1 + momentum) / learning rate`` when
    the learning rate is known, and the estimates that stopped short of their targets.

    Args:
        data: the contents of ``results.json``.

    Returns:
        The sentences (none for a run without the stages they need).
    """
    from specops.density import SpectralDensity

    stages, out = data["stages"], []
    top = None
    if "eigen" in stages:
        top = float(_from_jsonable(stages["eigen"]["result"])["eigenvalues"][0])
    if "esd" in stages:
        d = SpectralDensity.from_dict(stages["esd"]["result"])
        f = d.negative_fraction()
        text = (f"Negative curvature: {_pct(f.estimate)} ± {_pct(f.stderr)} of the eigenvalues are at or below 0 "
                f"(SLQ, {d.nodes.shape[0]} probes; standard error over probes); the quadrature's "
                f"{d.nodes.shape[1]} steps bracket the fraction in [{_pct(f.lower)}, {_pct(f.upper)}]")
        text += "." if f.resolved else (": a cluster of eigenvalues at zero that the steps do not resolve; more "
                                        "--esd-steps narrow it.")
        out.append(text)
        low = float(d.nodes[d.weights > 0].min())
        if low < 0:
            rel = f" ({_pct(-low / top)} of the top eigenvalue)" if top and top > 0 else ""
            out.append(f"Most negative eigenvalue: at most {_fmt(low, 4)}{rel}: the smallest Ritz value of the "
                       "spectral density's probes (Ritz values lie inside the spectrum, so the most negative "
                       "eigenvalue is at or below it).")
        else:
            out.append(f"No Ritz value of the spectral density is negative (the smallest is {_fmt(low, 4)}): no "
                       "sign of negative curvature at this resolution.")
    lr, momentum, where = _learning_rate(data)
    if top is not None and lr:
        threshold = 2 * (1 + momentum) / lr
        side = "below" if top < threshold else "above"
        out.append(f"Stability: the top eigenvalue {_fmt(top, 4)} is {side} 2 (1 + momentum) / learning rate = "
                   f"{_fmt(threshold, 4)} (learning rate {_fmt(lr)}, momentum {_fmt(momentum)}, {where}), the "
                   f"threshold of (full-batch) gradient descent with momentum; ratio {_fmt(top / threshold, 3)}.")
    out += _data_reading(data)
    short = [f"{row[0]} ({row[2].split('(', 1)[1].split(')')[0]}, {row[4]} products)"
             for row in summary_rows(data) if row[3] == "NO" and "target" in row[2]]
    if short:
        out.append("Stopped at the product budget before the stderr target: " + "; ".join(short)
                   + ". Raise --trace-matvecs (--block-trace-matvecs for blocks) for tighter estimates.")
    return out


def _data_reading(data: dict) -> list[str]:
    """The reading of ``--data-error``: each part of the uncertainty, and the samples for a target."""
    parts, needs, fraction, setup = [], [], 0.0, ""
    for stage, label in (("eigen", "the top eigenvalue"), ("trace", "the trace")):
        st = data["stages"].get(stage)
        if not st or st.get("data_target") is None:
            continue
        r, t = _from_jsonable(st["result"]), st["data_target"]
        fraction, samples = float(t["fraction"]), int(t["samples"])
        d = (r.get("settings") or {}).get("data_error") or {}
        setup = f"{samples} samples in {d.get('batches', '?')} batches"
        value = float(np.atleast_1d(r["eigenvalues"])[0]) if stage == "eigen" else float(r["estimate"])
        stderr = float(np.atleast_1d(r["data_stderr"])[0])
        other = (f"residual {_fmt(float(np.atleast_1d(r['residuals'])[0]), 2)}" if stage == "eigen"
                 else f"the probes' stderr {_fmt(float(r['stderr']), 2)}")
        parts.append(f"{label} {_fmt(value, 4)} ± {_fmt(stderr, 2)} ({_pct(t['relative'][0])}; {other})")
        n = t["samples_needed"][0]
        needs.append(f"{label}: already with these {samples}" if n is not None and n <= samples else
                     f"{label}: about {n:,}" if n is not None else f"{label}: - (zero estimate)")
    if not parts:
        return []
    return [f"Data error ({setup}; the standard error over another sample of the data of the same size, "
            f"beside the algorithm's own uncertainty): " + "; ".join(parts) + ".",
            f"Samples for a data error under {_pct(fraction)} of the estimate: " + "; ".join(needs)
            + " (an estimate: it assumes the data error falls as 1/sqrt(samples), the batches being "
            "independent draws of the data)."]


def _learning_rate(data: dict) -> tuple[float | None, float, str]:
    """The learning rate and momentum the model was trained with, and where they come from."""
    s = data.get("settings", {})
    if s.get("learning_rate"):
        return float(s["learning_rate"]), float(s.get("momentum") or 0.0), "--learning-rate"
    train = data["stages"].get("train")
    if train and train["result"].get("lr"):
        r = train["result"]
        return float(r["lr"]), float(r.get("momentum") or 0.0), "the initial rate of the default training"
    return None, 0.0, ""


HEADER = ("quantity", "value", "uncertainty", "converged", "matvecs", "seconds")


def summary_table(data: dict) -> str:
    """The plain-text table printed at the end of a run."""
    rows = [HEADER] + [tuple(str(c) for c in r) for r in summary_rows(data)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_model(data: dict) -> str:
    """One line: the model, its parameters, samples and loss."""
    m = data.get("model", {})
    parts = [m.get("description", "model"), f"{m.get('num_params', '?'):,} parameters" if isinstance(
        m.get("num_params"), int) else "", f"{m.get('num_samples', '?')} samples", f"loss {_fmt(m.get('loss'))}"]
    return ", ".join(p for p in parts if p)


def summary_markdown(data: dict, images: list[str]) -> str:
    """``summary.md``: what was analysed, the table, and the pictures."""
    s = data["settings"]
    total = sum(st.get("num_matvecs", 0) for st in data["stages"].values())
    seconds = sum(st.get("seconds", 0.0) for st in data["stages"].values())
    out = ["# specops curvature report", "", f"**Model:** {describe_model(data)}  ",
           (f"**Backend:** {s.get('backend')}, {data['model'].get('dtype', '')}, "
            f"{data['model'].get('ranks', 1)} rank(s); seed {s.get('seed')}  "),
           f"**Cost:** {total} Hessian-vector products, {seconds:.1f} s in the stages", ""]
    train = data["stages"].get("train")
    if train:
        r = train["result"]
        out += [(f"Trained for {r['epochs']} epochs: training loss {_fmt(r['final_loss'])}, "
                 f"training accuracy {_fmt(r['train_accuracy'], 3)}, held-out accuracy "
                 f"{_fmt(r.get('test_accuracy'), 3)}."), ""]
    rows = summary_rows(data)
    out.append("| " + " | ".join(HEADER) + " |")
    out.append("|" + "---|" * len(HEADER))
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    out.append("")
    notes = reading(data)
    if notes:
        out += ["## Reading", ""] + [f"- {n}" for n in notes] + [""]
    captions = {"esd.png": "Eigenvalue spectral density (SLQ, log scale) with the top eigenvalues",
                "landscape.png": "Loss landscape",
                "curvature.png": "Spectral densities of the Hessian, the Gauss-Newton matrix and the Fishers", "blocks.png": "Per-block trace and top eigenvalue"}
    for img in images:
        out += [f"## {captions.get(img, img)}", "", f"![{img}]({img})", ""]
    out.append(f"Full numbers with settings, seeds and versions: `{RESULTS}`.")
    return "\n".join(out) + "\n"


# --- report.html ----------------------------------------------------------------------------
CAPTIONS = {"esd.png": "Eigenvalue spectral density (SLQ, log scale) with the top eigenvalues",
            "landscape.png": "Loss landscape", "blocks.png": "Per-block trace and top eigenvalue"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { font-family: ui-monospace, monospace; text-align: right; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; } code { font-size: 0.9em; }
.meta { color: #444; } .no { color: #a00; font-weight: bold; }
"""


def _table(header: Any, rows: Any, numeric: tuple = ()) -> str:
    import html

    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for j, c in enumerate(row):
            text = html.escape(str(c))
            cls = ' class="num"' if j in numeric else (' class="no"' if text == "NO" else "")
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _compact(value: Any) -> str:
    value = _from_jsonable(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(_to_jsonable(value), separators=(", ", ": "), default=str) if isinstance(
        value, (dict, list)) else str(value)


#: How the settings table shows an option left at None.
_UNSET = {"model": "the default: ResNet-8 trained on digits", "data": "the default: digits",
          "checkpoint": "none", "batch_size": "one batch", "threads": "the default"}


def _setting(key: str, value: Any) -> str:
    if value is None:
        return _UNSET.get(key, "not set")
    return _compact(value)


def summary_html(data: dict, images: dict) -> str:
    """``report.html``: one self-contained page (no external files, scripts or fonts).

    Args:
        data: the contents of ``results.json``.
        images: file name -> PNG bytes, embedded as ``data:`` URIs in this order.

    Returns:
        The HTML text: the model and cost, the summary table, the figures, each stage's
        settings and cost, the model's blocks, every setting and the library versions.
    """
    import base64
    import html

    esc = html.escape
    s, m = data.get("settings", {}), data.get("model", {})
    stages = data.get("stages", {})
    total = sum(st.get("num_matvecs", 0) for st in stages.values())
    seconds = sum(st.get("seconds", 0.0) for st in stages.values())
    body = ["<h1>specops curvature report</h1>",
            f"<p class=\"meta\"><b>Model:</b> {esc(describe_model(data))}<br>",
            f"<b>Backend:</b> {esc(str(s.get('backend')))}, {esc(str(m.get('dtype', '')))}, engine "
            f"{esc(str(m.get('engine', '')))}, {m.get('ranks', 1)} rank(s); seed {esc(str(s.get('seed')))}<br>",
            f"<b>Cost:</b> {total} Hessian-vector products, {seconds:.1f} s in the stages"
            + (f", {data['total_seconds']:.1f} s in all" if "total_seconds" in data else "") + "</p>"]
    train = stages.get("train")
    if train:
        r = train["result"]
        body.append(f"<p>Trained for {r['epochs']} epochs: training loss {_fmt(r['final_loss'])}, training "
                    f"accuracy {_fmt(r['train_accuracy'], 3)}, held-out accuracy "
                    f"{_fmt(r.get('test_accuracy'), 3)}.</p>")
    body += ["<h2>Summary</h2>", _table(HEADER, summary_rows(data), numeric=(1, 4, 5))]
    notes = reading(data)
    if notes:
        body += ["<h2>Reading</h2>", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"]
    for name, png in images.items():
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        caption = CAPTIONS.get(name, name)
        body.append(f"<h2>{esc(caption)}</h2>\n<figure><img src=\"{uri}\" alt=\"{esc(caption)}\" "
                    f"data-file=\"{esc(name)}\"><figcaption>{esc(name)}</figcaption></figure>")
    body += ["<h2>Stages</h2>", _table(
        ("stage", "products", "seconds", "finished", "settings"),
        [(name, st.get("num_matvecs", ""), _fmt(st.get("seconds"), 3), st.get("finished", ""),
          _compact(st.get("settings", {}))) for name, st in stages.items() if name != "blocks_partial"],
        numeric=(1, 2))]
    blocks = m.get("blocks") or {}
    if blocks:
        body += ["<h2>Parameters</h2>", _table(("block", "parameters"), list(blocks.items()), numeric=(1,))]
    body += ["<h2>Settings</h2>", _table(("setting", "value"), [(k, _setting(k, v)) for k, v in s.items()]),
             "<h2>Versions</h2>", _table(("library", "version"), list(data.get("versions", {}).items())),
             f"<p class=\"meta\">Every number with its settings and seeds: <code>{RESULTS}</code> in this "
             "folder.</p>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>specops report: {esc(m.get('description', 'model'))}</title>\n<style>{_CSS}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
