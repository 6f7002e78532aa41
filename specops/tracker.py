"""Curvature tracked over training: one JSON line of spectral metrics per checkpoint.

:class:`Tracker` calls ``make_operator()`` (the operator at the current weights) at each
:meth:`Tracker.update` and records the chosen metrics of the whole operator and of
parameter blocks: the top eigenvalues (:func:`~specops.eigsh`), the trace
(:func:`~specops.trace`) and the spectral density (:func:`~specops.spectral_density`).
Each record is appended to a JSON-lines log (:mod:`specops.io`'s encoding; read back by
:class:`~specops.TrackerLog`, :mod:`specops.tracker_log`) in one ``write`` of a whole line and
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

Curvature as the optimizer sees it: ``preconditioner=`` (e.g. ``lambda H:
specops.backends.torch.preconditioner(optimizer, H)``) adds the top eigenvalues of
``P^{-1/2} H P^{-1/2}`` (:func:`specops.preconditioned`, warm-started too) under
``record["preconditioned"]``; ``threshold=`` the optimizer's stability threshold
(``record["threshold"]``); ``dynamics=True`` the loss, the gradient's norm and its alignment
``||Pi_k g|| / ||g||`` with the top-k eigenspace of ``H``. :meth:`TrackerLog.plot_sharpness`
draws them against the step (docs/dynamics.md).

Every metric uses the same ``seed`` at every step (common random numbers): differences
between checkpoints are then not blurred by fresh probe noise. A record's numbers equal
those of independent calls of ``eigsh``/``trace``/``spectral_density`` with that seed
(eigenvalues up to the tolerance, since a warm start changes Lanczos' start vector).
"""

from __future__ import annotations

import os
import time

from collections.abc import Callable, Iterable
from typing import Any, Literal, cast, get_args

import numpy as np

from specops._checks import choice, positive_int
from specops.curvature import CURVATURES, Curvature, curvature_like
from specops.output_space import Datum, check_datum
from specops.density import spectral_density
from specops.eigsh import eigsh
from specops.io import atomic_save_npz, dumps
from specops.model import ModelOperator
from specops.preconditioner import preconditioned
from specops.operator import aslinearoperator
from specops.progress import bar as progress_bar
from specops.trace import trace
from specops.tracker_log import PRECONDITIONED, RESIDUAL, TrackerLog

#: The metrics a tracker records.
Metric = Literal["eigenvalues", "trace", "density"]
METRICS: tuple[Metric, ...] = get_args(Metric)
FORMAT = "specops-tracker/1"


def curvature_operator(H: Any, curvature: str, *, seed: int = 0, datum: str = "sample") -> Any:
    """The operator a curvature name (:data:`specops.curvature.CURVATURES`) stands for, built from ``H``.

    Args:
        H: a PyTorch or TensorFlow model's Hessian operator.
        curvature: ``"hessian"`` (``H`` itself), ``"ggn"``, ``"empirical_fisher"`` or ``"mc_fisher"``.
        seed: the Monte-Carlo Fisher's seed.
        datum: the empirical Fisher's datum, ``"sample"`` or ``"term"``.

    Returns:
        ``H``, or the curvature of the same model, loss and data (:func:`specops.curvature.curvature_like`).

    Raises:
        ValueError: an unknown curvature name.
        TypeError: ``H`` is not a model operator ``curvature_like`` takes.
    """
    name = cast(Curvature, choice("curvature", curvature, CURVATURES))
    if name == "hessian":
        return H
    return curvature_like(H, name, seed=seed, datum=datum if name == "empirical_fisher" else "sample")


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
            (e.g. ``{"trace": {"max_matvecs": 16}}``).
        warm_start: start Lanczos from the previous step's eigenvectors.
        resume: continue an existing log: its records are kept and :meth:`update` returns
            the stored record for a step already there. Without it an existing non-empty
            log is an error (nothing is overwritten).
        eigsh_options: keywords for :func:`~specops.eigsh` (``which``, ``tol``, ``max_matvecs``, ...).
        trace_options: keywords for :func:`~specops.trace` (``method``, ``max_matvecs``, ``rtol``, ...).
            ``data_error=True`` here or in ``eigsh_options`` applies to the model-backed operators
            (the curvatures and their blocks), not to ``H - G`` or the preconditioned operator.
        density_options: keywords for :func:`~specops.spectral_density` (``num_probes``, ``num_steps``).
        progress: a progress bar (``tqdm.auto``, :mod:`specops.progress`) over the metrics of
            each update: True, or a label.
        comm: ``None`` or a communicator whose operators are data-parallel: only rank 0 writes.
        curvatures: the operators tracked, any of :data:`CURVATURES` (``"hessian"``,
            ``"ggn"``, ``"empirical_fisher"``, ``"mc_fisher"``), each with ``metrics``;
            the first one's are the record's top-level keys and its blocks. ``make_operator``
            returns either the model's Hessian (PyTorch or TensorFlow: the others are built
            from it by :func:`specops.curvature.curvature_like`, the Monte-Carlo Fisher with
            ``seed``) or a dict ``{name: operator}`` holding every name (any backend, e.g.
            JAX's ``ggn``).
        preconditioner: ``preconditioner(H) -> P`` called at each update with the first
            curvature's operator (e.g. ``lambda H: st.preconditioner(optimizer, H)``), or a fixed
            diagonal: records the top ``k`` eigenvalues of ``P^{-1/2} H P^{-1/2}`` (those of
            ``P^{-1} H``) under ``record["preconditioned"]``, warm-started like ``H``'s.
        warm_lag: warm-start from the eigenvectors of ``warm_lag`` updates ago (once that many
            are in memory; until then the last ones). ``"auto"`` (the default) takes those of
            two updates ago when the last eigenvectors resemble them more than the ones before
            (a period-two alternation, as of gradient descent at the edge of stability), else the
            last ones; it costs no product (docs/dynamics.md has the measured products).
        threshold: the stability threshold to record with each step, a number or a callable
            (e.g. ``lambda: st.stability_threshold(optimizer)``, the current learning rate's).
        dynamics: record the loss (``loss_at()``), the gradient's norm and its alignment
            ``||V_k^T g|| / ||g||`` with the top-k eigenvectors ``V_k`` of ``H`` (a model-backed
            operator and the ``"eigenvalues"`` metric needed). Default: on when ``preconditioner``
            or ``threshold`` is given.
        fisher_datum: ``"sample"`` or ``"term"``: the ``datum`` of the empirical Fisher
            (``"empirical_fisher"`` in ``curvatures``) built from the Hessian
            (:func:`specops.curvature.curvature_like`); a dict from ``make_operator`` is used as
            it is.

    Raises:
        ValueError: unknown metrics or curvatures, bad ``k`` or ``fisher_datum``.
        FileExistsError: ``path`` holds records and ``resume`` is False.
    """

    def __init__(self, make_operator: Callable[[], Any], path: str | os.PathLike | None = None,
                 metrics: str | Iterable[str] = METRICS, k: int = 3, seed: int = 0, *,
                 blocks: dict | None = None, block_metrics: str | Iterable[str] = ("eigenvalues", "trace"),
                 block_options: dict | None = None,
                 warm_start: bool = True,
                 resume: bool = False, eigsh_options: dict | None = None, trace_options: dict | None = None,
                 density_options: dict | None = None, progress: bool | str = False, comm: Any = None,
                 curvatures: str | Iterable[str] = ("hessian",), preconditioner: Any = None,
                 threshold: float | Callable[[], float] | None = None, dynamics: bool | None = None,
                 warm_lag: int | Literal["auto"] = "auto", fisher_datum: Datum = "sample") -> None:
        if not callable(make_operator):
            raise TypeError("make_operator must be a callable returning the operator at the current weights, "
                            f"got {type(make_operator).__name__}")
        self.make_operator = make_operator
        self.path = None if path is None else os.fspath(path)
        self.metrics = _check_metrics(metrics, "metrics")
        self.block_metrics = _check_metrics(block_metrics, "block_metrics")
        self.k, self.seed = positive_int("k", k), int(seed)
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
        self.fisher_datum = check_datum(fisher_datum)
        self.preconditioner, self.threshold = preconditioner, threshold
        if warm_lag != "auto" and (isinstance(warm_lag, (bool, str)) or not warm_lag >= 1):
            raise ValueError(f"warm_lag must be an integer >= 1 or 'auto', got {warm_lag!r}")
        self.warm_lag: int | Literal["auto"] = warm_lag if warm_lag == "auto" else positive_int("warm_lag", warm_lag)
        self._history: dict = {}  # name -> the last eigenvector blocks (warm_lag of them, 3 for "auto"), oldest first
        self.dynamics = (preconditioner is not None or threshold is not None) if dynamics is None else bool(dynamics)
        if (self.dynamics or preconditioner is not None) and "eigenvalues" not in self.metrics:
            raise ValueError("preconditioner= and dynamics= need the 'eigenvalues' metric (the gradient's alignment "
                             "uses H's top-k eigenvectors); add it to metrics")
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
        line = (dumps(record) + "\n").encode()
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
        host = {name: ops.to_numpy(V) for name, V in self.vectors.items()}
        atomic_save_npz(cast(str, self.vectors_path), host)  # only called with a path

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
            ``products`` (per metric), ``warm_start``, ``info``, ``seconds``; with ``preconditioner=``,
            ``threshold=`` or ``dynamics=`` also ``preconditioned`` (``{eigenvalues, residuals,
            converged}``), ``threshold``, ``loss``, ``gradient_norm``, ``alignment``. A step recorded before (resume)
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
        self._optimizer_view(A, record, products, warm)
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

    def _optimizer_view(self, A: Any, record: dict, products: dict, warm: dict) -> None:
        """The preconditioned top eigenvalues, the threshold, the loss and the gradient's alignment."""
        if self.preconditioner is not None:
            P = self.preconditioner(A) if callable(self.preconditioner) else self.preconditioner
            out = record.setdefault(PRECONDITIONED, {})
            used, warm[PRECONDITIONED] = self._metric(preconditioned(A, P), PRECONDITIONED, "eigenvalues", out)
            products[f"{PRECONDITIONED}/eigenvalues"] = used
        if self.threshold is not None:
            record["threshold"] = float(self.threshold() if callable(self.threshold) else self.threshold)
        if self.dynamics:
            if not (hasattr(A, "gradient") and hasattr(A, "loss_at")):
                raise TypeError("dynamics=True needs a model-backed operator (with loss_at() and gradient()); "
                                "pass dynamics=False for this one")
            ops, g = A.ops, A.gradient()
            norm = ops.norm(g)
            V = self.vectors[""]
            proj = ops.to_numpy(ops.inner(V, ops.as_columns(g)))[:, 0]
            record["loss"] = float(A.loss_at())
            record["gradient_norm"] = norm
            record["alignment"] = float(np.linalg.norm(proj) / norm) if norm > 0 else 0.0

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
        ops = {}
        for c in self.curvatures:
            try:
                ops[c] = curvature_operator(made, c, seed=self.seed, datum=self.fisher_datum)
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
        A = aslinearoperator(A)
        if V is None and name in self._host_vectors:
            V = A.ops.asarray(self._host_vectors[name])
        if V is None or tuple(V.shape) != (A.ops.local_rows(A.shape[0]), self.k):
            return None
        return V

    def _start(self, A: Any, name: str) -> Any:
        """The eigenvectors of ``name`` from ``warm_lag`` updates ago as a start block for ``A``, or None (cold)."""
        if not self.warm_start:
            return None
        past = self._history.get(name, [])
        A = aslinearoperator(A)
        shape = (A.ops.local_rows(A.shape[0]), self.k)
        past = past if all(tuple(V.shape) == shape for V in past) else []
        lag = self.warm_lag if self.warm_lag != "auto" else _period(A.ops, past)
        if len(past) >= lag:
            return past[-lag]
        return self.eigenvectors(A, name)

    def _metric(self, A: Any, name: str, metric: str, out: dict) -> tuple[int, bool]:
        """Compute one metric of ``A`` into ``out``; returns ``(products, warm)``."""
        opts = {"eigenvalues": self.eigsh_options, "trace": self.trace_options,
                "density": self.density_options}[metric]
        if name in self.blocks:
            opts = {**opts, **self.block_options.get(metric, {})}
        if opts.get("data_error") and not isinstance(A, ModelOperator):  # H - G: no per-batch parts
            opts = {**opts, "data_error": False}
        res: Any
        if metric == "eigenvalues":
            v0 = self._start(A, name)
            res = eigsh(A, k=self.k, seed=self.seed, v0=v0, **opts)
            self.vectors[name] = res.eigenvectors
            kept = 3 if self.warm_lag == "auto" else self.warm_lag
            self._history[name] = [*self._history.get(name, []), res.eigenvectors][-kept:]
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


def _plain(x: Any) -> Any:
    """Records as plain Python data: arrays become (nested) lists, NumPy scalars numbers.

    A non-finite float (the stderr of a single probe) stays a float; the log encodes it as
    ``{"__float__": "inf"}`` (:func:`specops.io.dumps`).
    """
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _plain(x.item())
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _period(ops: Any, past: list) -> int:
    """The warm start's lag for ``warm_lag="auto"``: 2 where the eigenvectors alternate, else 1.

    ``past`` holds the last eigenvector blocks, oldest first. With three of them, the last one is
    compared with the two before by ``||V_last^T V||_F^2`` (the squared cosines of the principal
    angles between the spans); a closer match two updates back is a period-two alternation.
    """
    if len(past) < 3:
        return 1

    def similarity(V: Any) -> float:
        return float(np.sum(np.asarray(ops.to_numpy(ops.inner(V, past[-1])), dtype=np.float64) ** 2))

    return int(ops.decide(2 if similarity(past[-3]) > similarity(past[-2]) else 1))
