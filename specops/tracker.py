"""Curvature tracked over training: one JSON line of spectral metrics per checkpoint.

:class:`Tracker` calls ``make_operator()`` (the operator at the current weights) at each
:meth:`Tracker.update` and records the chosen metrics of the whole operator and of
parameter blocks: the top eigenvalues (:func:`~specops.eigsh`), the trace
(:func:`~specops.trace`) and the spectral density (:func:`~specops.spectral_density`).
Each record is appended to a JSON-lines log in one ``write`` of a whole line and
flushed to disk, so a killed run leaves only finished records (a torn last line from a
crash during the write is dropped on reading); ``resume=True`` continues such a log.

Warm starts: Lanczos starts from the previous checkpoint's eigenvectors (kept in memory
and in ``<path>.vectors.npz``, so a resumed run warm-starts too). Between checkpoints the
weights move little and the new eigenvectors lie close to the old ones, so a warm
checkpoint needs fewer products than a cold one (docs/study.md states the measured saving).

Several curvatures: ``curvatures=("hessian", "ggn")`` tracks the generalized Gauss-Newton
matrix (or the Fishers, :mod:`specops.curvature`) beside the Hessian at every step. The
first name's metrics are the record's top-level keys (the Hessian's, as without
``curvatures``); every other one is under ``record["curvatures"][name]``, with its own warm
start, and with both the Hessian and the GGN the record holds the trace of the residual
term ``H - G`` (``record["residual"]``).

Every metric uses the same ``seed`` at every step (common random numbers): differences
between checkpoints are then not blurred by fresh probe noise. A record's numbers equal
those of independent calls of ``eigsh``/``trace``/``spectral_density`` with that seed
(eigenvalues up to the tolerance, since a warm start changes Lanczos' start vector).
"""

from __future__ import annotations

import io
import json
import math
import os
import time

from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np

from specops.curvature import CURVATURES
from specops.density import SpectralDensity, spectral_density
from specops.eigsh import eigsh
from specops.progress import bar as progress_bar
from specops.trace import trace

METRICS = ("eigenvalues", "trace", "density")
FORMAT = "specops-tracker/1"
RESIDUAL = "residual"


def _check_curvatures(curvatures: str | Iterable[str]) -> tuple:
    names = (curvatures,) if isinstance(curvatures, str) else tuple(curvatures)
    if not names:
        raise ValueError(f"curvatures is empty; choose from {list(CURVATURES)}")
    bad = [c for c in names if c not in CURVATURES]
    if bad:
        raise ValueError(f"curvatures: unknown curvature(s) {bad}; choose from {list(CURVATURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"curvatures lists a name twice: {list(names)}")
    return names


def _check_metrics(metrics: str | Iterable[str], what: str) -> tuple:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"{what}: unknown metric(s) {bad}; choose from {list(METRICS)}")
    return metrics


class Tracker:
    """Spectral metrics of an operator that changes over training, logged per step.

    Example:
        >>> tracker = Tracker(make_operator, path="curvature.jsonl", k=3, seed=0)  # doctest: +SKIP
        >>> for epoch in range(epochs):                                            # doctest: +SKIP
        ...     train_one_epoch()
        ...     record = tracker.update(epoch)

    Args:
        make_operator: ``make_operator() -> operator`` at the current weights (e.g. a
            closure calling ``specops.backends.torch.hessian(model, loss, data)``). Called
            once per update.
        path: the JSON-lines log (``None``: keep the records in memory only).
        metrics: any of ``"eigenvalues"``, ``"trace"``, ``"density"``.
        k: number of top eigenvalues.
        seed: seed of every metric, the same at every step.
        blocks: ``{name: pattern}``, parameter blocks whose metrics are recorded too, by
            the operator's ``restrict`` (e.g. ``{"stage1": "stage1.*"}``).
        block_metrics: the metrics of each block (default ``("eigenvalues", "trace")``).
        block_options: ``{metric: keywords}`` that override the options below for blocks
            (e.g. ``{"trace": {"num_matvecs": 16}}``).
        warm_start: start Lanczos from the previous step's eigenvectors.
        resume: continue an existing log: its records are kept and :meth:`update` returns
            the stored record for a step already there. Without it an existing non-empty
            log is an error (nothing is overwritten).
        eigsh_options: keywords for :func:`~specops.eigsh` (``which``, ``tol``, ``max_matvecs``, ...).
        trace_options: keywords for :func:`~specops.trace` (``method``, ``num_matvecs``, ``rtol``, ...).
        density_options: keywords for :func:`~specops.spectral_density` (``num_probes``, ``num_steps``).
        progress: a progress bar (``tqdm.auto``, :mod:`specops.progress`) over the metrics of
            each update: True, or a label.
        comm: ``None`` or a communicator whose operators are data-parallel: only rank 0 writes.
        curvatures: the operators tracked, any of :data:`CURVATURES` (``"hessian"``,
            ``"ggn"``, ``"fisher"`` (empirical), ``"mc-fisher"``), each with ``metrics``;
            the first one's are the record's top-level keys and its blocks. ``make_operator``
            returns either the model's Hessian (PyTorch or TensorFlow: the others are built
            from it by :func:`specops.curvature.curvature_like`, the Monte-Carlo Fisher with
            ``seed``) or a dict ``{name: operator}`` holding every name (any backend, e.g.
            JAX's ``ggn``).

    Raises:
        ValueError: unknown metrics or curvatures, bad ``k``.
        FileExistsError: ``path`` holds records and ``resume`` is False.
    """

    def __init__(self, make_operator: Callable[[], Any], path: str | os.PathLike | None = None,
                 metrics: str | Iterable[str] = METRICS, k: int = 3, seed: int = 0, *,
                 blocks: dict | None = None, block_metrics: str | Iterable[str] = ("eigenvalues", "trace"),
                 block_options: dict | None = None,
                 warm_start: bool = True,
                 resume: bool = False, eigsh_options: dict | None = None, trace_options: dict | None = None,
                 density_options: dict | None = None, progress: bool = False, comm: Any = None,
                 curvatures: str | Iterable[str] = ("hessian",)) -> None:
        if not callable(make_operator):
            raise TypeError("make_operator must be a callable returning the operator at the current weights, "
                            f"got {type(make_operator).__name__}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.make_operator = make_operator
        self.path = None if path is None else os.fspath(path)
        self.metrics = _check_metrics(metrics, "metrics")
        self.block_metrics = _check_metrics(block_metrics, "block_metrics")
        self.k, self.seed = int(k), int(seed)
        self.blocks = dict(blocks or {})
        self.warm_start = bool(warm_start)
        self.eigsh_options = dict(eigsh_options or {})
        self.trace_options = dict(trace_options or {})
        self.density_options = dict(density_options or {})
        self.block_options = {m: dict(o) for m, o in (block_options or {}).items()}
        _check_metrics(tuple(self.block_options), "block_options")
        for name, opts in (("eigsh_options", self.eigsh_options), ("trace_options", self.trace_options),
                           ("density_options", self.density_options),
                           *((f"block_options[{m!r}]", o) for m, o in self.block_options.items())):
            if "seed" in opts:
                raise ValueError(f"{name} must not hold 'seed': the tracker's seed= is used for every metric")
        if {"k", "v0"} & (set(self.eigsh_options) | set(self.block_options.get("eigenvalues", {}))):
            raise ValueError("eigsh_options must not hold 'k' or 'v0': pass k= to the Tracker; v0 is the warm start")
        self.curvatures = _check_curvatures(curvatures)
        self.progress = progress
        self.comm = comm
        self.write = comm is None or comm.rank == 0
        self.records: list[dict] = []
        self.vectors: dict = {}   # "" (whole operator), block name or "curvature:<name>" -> eigenvectors (native)
        self._host_vectors: dict = {}
        if self.path is not None and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            if not resume:
                raise FileExistsError(f"{self.path} already holds a tracker log; pass resume=True to continue it "
                                      "or choose another path")
            self.records = TrackerLog.read(self.path).records
            if self.write:
                self._drop_torn_line()
            self._host_vectors = self._load_vectors()

    # --- files ----------------------------------------------------------------------------
    @property
    def vectors_path(self) -> str | None:
        """Where the last eigenvectors are kept for a resumed run (``<path>.vectors.npz``)."""
        return None if self.path is None else self.path + ".vectors.npz"

    def _drop_torn_line(self) -> None:
        """Cut a last line without its newline (a write interrupted by a crash)."""
        with open(cast(str, self.path), "rb+") as fh:  # only called with a path
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        fd = os.open(cast(str, self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)  # one write of the whole line: an O_APPEND write is not interleaved
            while written < len(line):    # pragma: no cover - regular files take the whole line
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load_vectors(self) -> dict:
        path = self.vectors_path
        if path is None or not os.path.exists(path):
            return {}
        with np.load(path) as data:
            return {key: data[key] for key in data.files}

    def _save_vectors(self, ops: Any) -> None:
        from specops.report import atomic_write

        host = {name: ops.to_numpy(V) for name, V in self.vectors.items()}
        buf = io.BytesIO()
        np.savez(buf, **host)
        atomic_write(cast(str, self.vectors_path), buf.getvalue())  # only called with a path

    # --- updates --------------------------------------------------------------------------
    @property
    def steps(self) -> list:
        """The recorded steps, in order."""
        return [r["step"] for r in self.records]

    def done(self, step: Any) -> bool:
        """Whether ``step`` is already recorded (after a resume)."""
        return any(r["step"] == step for r in self.records)

    def update(self, step: Any, info: dict | None = None) -> dict:
        """Compute the metrics at the current weights, append them to the log and return them.

        Args:
            step: the step's label (an epoch or iteration number; JSON-serializable).
            info: extra numbers to store with the record (loss, accuracy, learning rate, ...).

        Returns:
            The record: ``step``, ``eigenvalues``, ``residuals``, ``converged``, ``trace``
            ``{estimate, stderr}``, ``density`` ``{nodes, weights}``, ``blocks`` (the same
            per block), ``curvatures`` (the same per curvature after the first),
            ``residual`` (``{trace}`` of ``H - G``), ``curvature`` (the first curvature's
            name, when not the Hessian), ``num_matvecs`` (all products of this update),
            ``products`` (per metric), ``warm_start``, ``info``, ``seconds``. A step recorded before (resume)
            is returned as stored, without computing.
        """
        for r in self.records:
            if r["step"] == step:
                return r
        t0 = time.perf_counter()
        ops = self._operators()
        primary, others = self.curvatures[0], self.curvatures[1:]
        A = ops[primary]
        residual = "trace" in self.metrics and {"hessian", "ggn"} <= set(self.curvatures)
        tasks = ([("", m) for m in self.metrics] + [(b, m) for b in self.blocks for m in self.block_metrics]
                 + [(f"curvature:{c}", m) for c in others for m in self.metrics]
                 + ([(RESIDUAL, "trace")] if residual else []))
        bar = progress_bar(self.progress, len(tasks), f"curvature at step {step}", unit="metrics",
                           comm=self.comm)
        record: dict = {"step": step}
        if primary != "hessian":
            record["curvature"] = primary
        record["blocks"] = {name: {} for name in self.blocks}
        record["curvatures"] = {c: {} for c in others}
        products = {}
        warm = {}
        operators = {"": A}
        if residual:
            operators[RESIDUAL] = ops["hessian"] - ops["ggn"]
        operators.update({f"curvature:{c}": ops[c] for c in others})
        for name, metric in tasks:
            if name not in operators:
                operators[name] = A.restrict(self.blocks[name])
            if name == "":
                out, key = record, metric
            elif name.startswith("curvature:"):
                out, key = record["curvatures"][name[10:]], f"{name[10:]}/{metric}"
            elif name == RESIDUAL:
                out, key = record.setdefault(RESIDUAL, {}), f"{RESIDUAL}/{metric}"
            else:
                out, key = record["blocks"][name], f"{name}:{metric}"
            used, was_warm = self._metric(operators[name], name, metric, out)
            products[key] = used
            if metric == "eigenvalues":
                warm[name[10:] if name.startswith("curvature:") else (name or "operator")] = was_warm
            bar.to(len(products))
        bar.close()
        record["num_matvecs"] = int(sum(products.values()))
        record["products"] = products
        record["warm_start"] = warm
        record["info"] = dict(info or {})
        record["seconds"] = time.perf_counter() - t0
        for key in ("blocks", "curvatures"):
            if not record[key]:
                del record[key]
        record = _plain(record)
        if self.path is not None and self.write:
            self._append(record)
            if self.vectors:
                self._save_vectors(A.ops)
        self.records.append(record)
        return record

    def _operators(self) -> dict:
        """``{curvature name: operator}`` at the current weights, from ``make_operator()``."""
        made = self.make_operator()
        if isinstance(made, dict):
            missing = [c for c in self.curvatures if c not in made]
            if missing:
                raise ValueError(f"make_operator() returned a dict without {missing}; it must hold every name "
                                 f"of curvatures={list(self.curvatures)}")
            return {c: made[c] for c in self.curvatures}
        if self.curvatures == ("hessian",):
            return {"hessian": made}
        from specops.curvature import curvature_like

        ops = {}
        for c in self.curvatures:
            kind = CURVATURES[c]
            try:
                ops[c] = made if kind is None else curvature_like(made, kind, seed=self.seed)
            except TypeError as e:
                raise TypeError(f"curvatures={list(self.curvatures)}: {e}; or let make_operator() return a dict "
                                "{name: operator} of those curvatures") from e
        return ops

    def eigenvectors(self, A: Any, block: str | None = None, curvature: str | None = None) -> Any:
        """The last recorded eigenvectors of the first curvature, a ``block`` or a ``curvature``.

        As ``A``'s arrays. They come from memory, or after a resume from ``<path>.vectors.npz``; ``None`` if none
        were recorded or they do not fit ``A``.
        """
        name = f"curvature:{curvature}" if curvature and curvature != self.curvatures[0] else (block or "")
        V = self.vectors.get(name)
        if V is None and name in self._host_vectors:
            V = A.ops.asarray(self._host_vectors[name])
        if V is None or tuple(V.shape) != (A.shape[0], self.k):
            return None
        return V

    def _start(self, A: Any, name: str) -> Any:
        """The previous eigenvectors of ``name`` as a start block for ``A``, or None (cold)."""
        return self.eigenvectors(A, name) if self.warm_start else None

    def _metric(self, A: Any, name: str, metric: str, out: dict) -> tuple[int, bool]:
        """Compute one metric of ``A`` into ``out``; returns ``(products, warm)``."""
        opts = {"eigenvalues": self.eigsh_options, "trace": self.trace_options,
                "density": self.density_options}[metric]
        if name in self.blocks:
            opts = {**opts, **self.block_options.get(metric, {})}
        res: Any
        if metric == "eigenvalues":
            v0 = self._start(A, name)
            res = eigsh(A, k=self.k, seed=self.seed, v0=v0, **opts)
            self.vectors[name] = res.eigenvectors
            out.update(eigenvalues=res.eigenvalues, residuals=res.residuals, converged=res.converged)
            if res.data_stderr is not None:  # eigsh_options={"data_error": True}
                out["data_stderr"] = res.data_stderr
            return res.num_matvecs, v0 is not None
        if metric == "trace":
            res = trace(A, seed=self.seed, **opts)
            out["trace"] = {"estimate": res.estimate, "stderr": res.stderr,
                            "estimator": res.settings.get("estimator", res.settings["method"])}
            if res.data_stderr is not None:  # trace_options={"data_error": True}
                out["trace"]["data_stderr"] = res.data_stderr
            return res.num_matvecs, False
        res = spectral_density(A, seed=self.seed, **opts)
        out["density"] = {"nodes": res.nodes, "weights": res.weights, "n": res.settings["n"]}
        return res.num_matvecs, False

    @staticmethod
    def load(path: str) -> TrackerLog:
        """Read a tracker log back (see :class:`TrackerLog`)."""
        return TrackerLog.read(path)


class TrackerLog:
    """The records of a tracker log, with arrays over steps and plots.

    Args:
        records: the records, in the order written.
    """

    def __init__(self, records: list[dict]):
        self.records = list(records)

    @classmethod
    def read(cls, path: str) -> TrackerLog:
        """Read a JSON-lines log; a torn last line (a crash during its write) is ignored.

        Raises:
            FileNotFoundError: no such log.
            ValueError: a line other than the last is not a record.
        """
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tracker log at {path}")
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # the last line, without its newline: torn by a crash
                    break
                raise ValueError(f"{path}, line {i + 1} is not a tracker record ({e})") from e
        return cls(records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def steps(self) -> np.ndarray:
        """The recorded steps, in order."""
        return np.array([r["step"] for r in self.records])

    def _where(self, key: str, block: str | None, curvature: str | None = None) -> list[tuple[Any, Any]]:
        rows = []
        for r in self.records:
            rows.append((r["step"], _source(r, block, curvature).get(key)))
        return [(s, v) for s, v in rows if v is not None]

    def top_eigenvalues(self, block: str | None = None, curvature: str | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, eigenvalues (steps, k), residuals (steps, k))``.

        Of the first curvature tracked, a ``block`` of it, or a ``curvature`` (a :data:`CURVATURES` name).
        """
        ev = self._where("eigenvalues", block, curvature)
        res = dict(self._where("residuals", block, curvature))
        steps = np.array([s for s, _ in ev])
        return steps, np.array([np.asarray(v) for _, v in ev]), np.array([np.asarray(res[s]) for s, _ in ev])

    def traces(self, block: str | None = None, curvature: str | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, estimates, stderrs)`` of the trace.

        Of the first curvature, a ``block``, or a ``curvature`` (``"residual"``: the term ``H - G``).
        """
        tr = self._where("trace", block, curvature)
        return (np.array([s for s, _ in tr]), np.array([t["estimate"] for _, t in tr]),
                np.array([np.inf if t["stderr"] is None else t["stderr"] for _, t in tr]))

    def densities(self, block: str | None = None, curvature: str | None = None) -> list[tuple]:
        """``[(step, SpectralDensity)]`` of the steps that recorded a density (of a block or a curvature)."""
        out = []
        for s, d in self._where("density", block, curvature):
            nodes, weights = np.asarray(d["nodes"]), np.asarray(d["weights"])
            settings = dict(n=d.get("n"), num_probes=nodes.shape[0], num_steps=nodes.shape[1])
            out.append((s, SpectralDensity(nodes=nodes, weights=weights, num_matvecs=nodes.size,
                                           settings=settings)))
        return out

    @property
    def blocks(self) -> list[str]:
        """The block names found in the records."""
        names = []
        for r in self.records:
            names += [b for b in r.get("blocks", {}) if b not in names]
        return names

    @property
    def curvatures(self) -> list[str]:
        """The curvatures tracked, the first one (top-level keys) first."""
        names = []
        for r in self.records:
            names += [c for c in [r.get("curvature", "hessian"), *r.get("curvatures", {})] if c not in names]
        return names

    # --- plots ----------------------------------------------------------------------------
    def plot_trace(self, ax: Any = None, block: str | None = None, label: str | None = None, **kwargs: Any) -> Any:
        """The trace against the step with error bars of one standard error; returns the axes."""
        ax = _axes(ax)
        steps, est, err = self.traces(block)
        ax.errorbar(steps, est, yerr=err, marker="o", ms=3, capsize=3, label=label, **kwargs)
        ax.set_xlabel("step")
        ax.set_ylabel("trace of the Hessian" + (f" ({block})" if block else ""))
        return ax

    def plot_eigenvalues(self, ax: Any = None, block: str | None = None, label: str | None = None, which: int = 0,
                         **kwargs: Any) -> Any:
        """Eigenvalue ``which`` (0: the top) against the step, with its residual as error bar."""
        ax = _axes(ax)
        steps, vals, res = self.top_eigenvalues(block)
        ax.errorbar(steps, vals[:, which], yerr=res[:, which], marker="o", ms=3, capsize=3, label=label, **kwargs)
        ax.set_xlabel("step")
        ax.set_ylabel(f"eigenvalue {which + 1} of the Hessian" + (f" ({block})" if block else ""))
        return ax

    def plot_density(self, ax: Any = None, block: str | None = None, sigma: float | None = None,
                     cmap: str = "viridis") -> Any:
        """The spectral densities of all steps on one log-scale axes, coloured by step."""
        import matplotlib.pyplot as plt

        ax = _axes(ax)
        dens = self.densities(block)
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

    def plot_curvatures(self, path: str | None = None) -> Any:
        """The curvatures side by side; saved to ``path`` if given.

        Top eigenvalue and trace (with the residual term ``H - G``) against the step, and the
        last step's densities overlaid.

        Returns:
            The matplotlib figure.

        Raises:
            ValueError: the log tracked a single curvature.
        """
        import matplotlib.pyplot as plt

        names = self.curvatures
        if len(names) < 2:
            raise ValueError(f"this log tracked one curvature ({names}); track curvatures=('hessian', 'ggn')")
        fig, axes = plt.subplots(1, 3, figsize=(13.8, 3.6))
        for c in names:
            steps, vals, res = self.top_eigenvalues(curvature=c)
            if steps.size:
                axes[0].errorbar(steps, vals[:, 0], yerr=res[:, 0], marker="o", ms=3, capsize=3, label=c)
            steps, est, err = self.traces(curvature=c)
            if steps.size:
                axes[1].errorbar(steps, est, yerr=err, marker="o", ms=3, capsize=3, label=c)
        steps, est, err = self.traces(curvature=RESIDUAL)
        if steps.size:
            axes[1].errorbar(steps, est, yerr=err, marker="s", ms=3, capsize=3, ls="--", label="H - G")
        axes[0].set_ylabel("top eigenvalue")
        axes[1].set_ylabel("trace")
        for ax in axes[:2]:
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        last = {c: self.densities(curvature=c)[-1] for c in names if self.densities(curvature=c)}
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
            from specops.report import atomic_savefig

            atomic_savefig(fig, path)
        return fig

    def plot(self, path: str | None = None) -> Any:
        """Trace, top eigenvalue and density evolution side by side; saved to ``path`` if given.

        Returns:
            The matplotlib figure.
        """
        import matplotlib.pyplot as plt

        panels = [p for p, ok in (("trace", self.traces()[0].size), ("eig", self.top_eigenvalues()[0].size),
                                  ("density", len(self.densities()))) if ok]
        fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.6 * max(len(panels), 1), 3.6), squeeze=False)
        for ax, p in zip(axes[0], panels):
            {"trace": self.plot_trace, "eig": self.plot_eigenvalues, "density": self.plot_density}[p](ax=ax)  # type: ignore[operator]  # a dict of plotters of different signatures, all taking ax
        fig.tight_layout()
        if path is not None:
            from specops.report import atomic_savefig

            atomic_savefig(fig, path)
        return fig


def _source(record: dict, block: str | None, curvature: str | None) -> dict:
    """The part of a record holding the metrics of ``block`` or ``curvature`` (or the first operator)."""
    if block is not None:
        return record.get("blocks", {}).get(block, {})
    if curvature is None or curvature == record.get("curvature", "hessian"):
        return record
    if curvature == RESIDUAL:
        return record.get(RESIDUAL, {})
    return record.get("curvatures", {}).get(curvature, {})


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 3.8))[1]


def _plain(x: Any) -> Any:
    """Records as plain JSON.

    Arrays become (nested) lists, NumPy scalars numbers, and a non-finite float (the stderr
    of a single probe) ``None``.
    """
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _plain(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
