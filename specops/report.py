"""The curvature report of ``specops analyze``: state on disk, plots and summaries.

- :class:`ReportState`: ``results.json`` in the output folder, rewritten atomically
  (a temporary file, then ``os.replace``) after every finished stage, so a killed run
  loses at most the stage it was in and ``--resume`` continues from there.
- :func:`write_plots`, :func:`summary_markdown`, :func:`summary_table`: the pictures
  (``esd.png``, ``landscape.png``, ``blocks.png``), ``summary.md`` and the terminal table.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np

from specops.results import _from_jsonable, _to_jsonable

RESULTS = "results.json"
STAGES = ("train", "eigen", "trace", "esd", "curvature", "blocks", "landscape")


# --- files ----------------------------------------------------------------------------------
def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see the old file or the new one, never a partial one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_savefig(fig: Any, path: str, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    atomic_write(path, buf.getvalue())


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
            atomic_write(self.path, json.dumps(_to_jsonable(self.data), indent=1, allow_nan=False))
            self.saved = True

    def done(self, stage: str, settings: dict) -> bool:
        """Whether ``stage`` finished earlier with these ``settings``."""
        entry = self.data["stages"].get(stage)
        return entry is not None and entry.get("settings") == _to_jsonable(settings)

    def result(self, stage: str) -> Any:
        """A finished stage's result, with its arrays as NumPy arrays."""
        return _from_jsonable(self.data["stages"][stage]["result"])

    def finish(self, stage: str, settings: dict, result: Any, num_matvecs: int, seconds: float) -> None:
        """Record a finished stage and write ``results.json`` at once."""
        self.data["stages"][stage] = _to_jsonable(dict(
            settings=settings, result=result, num_matvecs=int(num_matvecs), seconds=float(seconds),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S")))
        self.save()

    def stage(self, name: str) -> dict | None:
        """A stage's whole entry (settings, result, cost), or None if it did not run."""
        entry = self.data["stages"].get(name)
        return None if entry is None else _from_jsonable(entry)


# --- plots ----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_esd(density: Any, top_eigenvalues: list, path: str, title: str = "") -> None:
    """``esd.png``: the spectral density on a log scale with the top eigenvalues marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    density.plot(ax=ax, log=True)
    for i, lam in enumerate(top_eigenvalues):
        ax.axvline(lam, color="C3", lw=0.8, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
    if len(top_eigenvalues):
        ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_landscape(ls: Any, path: str, title: str = "") -> None:
    """``landscape.png``: the loss along a line or on a plane (contours)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ls.plot(ax=ax)
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
    axes[0].set_title("trace of the block Hessian")
    axes[1].bar(x, tops, color="C1")
    axes[1].set_title("top eigenvalue of the block Hessian")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right")
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


def summary_rows(data: dict) -> list[tuple]:
    """``(quantity, value, uncertainty, converged, matvecs, seconds)`` rows from results.json data."""
    rows = []
    stages = data["stages"]
    if "eigen" in stages:
        st = stages["eigen"]
        r = _from_jsonable(st["result"])
        for i, (lam, res, ok) in enumerate(zip(r["eigenvalues"], r["residuals"], r["converged"])):
            rows.append((f"eigenvalue {i + 1}", _fmt(lam, 6), f"residual {_fmt(res, 2)}", "yes" if ok else "NO",
                         st["num_matvecs"] if i == 0 else "", _fmt(st["seconds"], 3) if i == 0 else ""))
    if "trace" in stages:
        st = stages["trace"]
        r = st["result"]
        rows.append(("trace", _fmt(r["estimate"], 6), f"stderr {_fmt(r['stderr'], 2)}", "-",
                     st["num_matvecs"], _fmt(st["seconds"], 3)))
    if "esd" in stages:
        st = stages["esd"]
        r = _from_jsonable(st["result"])
        nodes = np.asarray(r["nodes"])
        rows.append(("ESD support", f"[{_fmt(nodes.min())}, {_fmt(nodes.max())}]",
                     f"{nodes.shape[0]} probes x {nodes.shape[1]} steps", "-", st["num_matvecs"],
                     _fmt(st["seconds"], 3)))
    rows += _curvature_rows(data)
    if "blocks" in stages:
        st = stages["blocks"]
        for name, b in st["result"].items():
            e, t = _from_jsonable(b["eigen"]), b["trace"]
            rows.append((f"[{name}] eigenvalue 1", _fmt(e["eigenvalues"][0], 6),
                         f"residual {_fmt(e['residuals'][0], 2)}", "yes" if e["converged"][0] else "NO",
                         e["num_matvecs"], ""))
            rows.append((f"[{name}] trace", _fmt(t["estimate"], 6), f"stderr {_fmt(t['stderr'], 2)}", "-",
                         t["num_matvecs"], _fmt(b["seconds"], 3)))
    if "landscape" in stages:
        st = stages["landscape"]
        r = _from_jsonable(st["result"])
        losses = np.asarray(r["losses"])
        rows.append((f"landscape ({r['settings']['ndim']}-D, {r['settings']['kind']})",
                     f"loss {_fmt(r['center_loss'])} at 0", f"range [{_fmt(losses.min())}, {_fmt(losses.max())}]",
                     "-", f"{r['num_evaluations']} losses", _fmt(st["seconds"], 3)))
    return rows


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
        rows.append((f"[{n}] top eigenvalues", lams, f"max residual {_fmt(max(e['residuals']), 2)}",
                     "yes" if all(e["converged"]) else "NO", "", ""))
    t = st["result"].get("residual_trace")
    if t:
        rows.append(("trace(H - G)", _fmt(t["estimate"], 6), f"stderr {_fmt(t['stderr'], 2)}", "-", "", ""))
    rows[-1] = rows[-1][:4] + (st["num_matvecs"], _fmt(st["seconds"], 3))
    return rows


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
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    out.append("")
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
    body += ["<h2>Settings</h2>", _table(("setting", "value"), [(k, _compact(v)) for k, v in s.items()]),
             "<h2>Versions</h2>", _table(("library", "version"), list(data.get("versions", {}).items())),
             f"<p class=\"meta\">Every number with its settings and seeds: <code>{RESULTS}</code> in this "
             "folder.</p>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>specops report: {esc(m.get('description', 'model'))}</title>\n<style>{_CSS}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
