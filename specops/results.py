"""Result objects: host NumPy numbers and their settings, round-tripping JSON, and how they print.

Every result prints a short summary with its uncertainties (``repr``): eigenvalues with
their residuals and convergence, a trace with its standard error, a density's range and
trace, a landscape's range. :class:`~specops.EigResult` unpacks like SciPy's ``eigsh``
(``w, v = so.eigsh(A, k)``), :class:`~specops.TraceResult` and
:class:`~specops.DiagonalResult` like ``scipy.integrate.quad`` (``estimate, stderr``).
The summaries and unpackings are written here, one per result type, for every result class
(the ``dataclass`` decorators of the result modules keep them, see :class:`Result`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

import numpy as np

from specops.io import from_jsonable as _from_jsonable
from specops.io import to_jsonable as _to_jsonable

R = TypeVar("R", bound="Result")


class Result:
    """Mixin for result dataclasses: ``to_dict``/``to_json``/``from_json``, a readable ``repr``.

    Fields listed in ``_NOT_SERIALIZED`` (backend arrays such as eigenvectors) are
    left out of JSON and come back as ``None``. A subclass gets :func:`summary` as its
    ``repr`` (placed in the subclass itself, so ``@dataclass`` keeps it rather than writing
    its own) and, where :data:`UNPACK` names its fields, iterates over them.
    """

    _NOT_SERIALIZED: tuple = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        setattr(cls, "__repr__", summary)
        if cls.__name__ in UNPACK:
            setattr(cls, "__iter__", _unpack)

    def to_dict(self) -> dict:
        """The result as JSON-ready data (arrays tagged with their dtype), with its ``type``."""
        d = {
            f.name: _to_jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.name not in self._NOT_SERIALIZED
        }
        d["type"] = type(self).__name__
        return d

    def to_json(self, **kwargs: Any) -> str:
        """The result as JSON text (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls: type[R], d: dict) -> R:
        """The result from :meth:`to_dict`'s data; fields not serialized come back as None."""
        d = dict(d)
        kind = d.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"this JSON holds a {kind}, not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {k: _from_jsonable(v) for k, v in d.items() if k in names}
        values.update({k: None for k in cls._NOT_SERIALIZED})
        return cls(**values)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        """The result from :meth:`to_json`'s text."""
        return cls.from_dict(json.loads(text))


# --- how results print -------------------------------------------------------------------------
#: Result type -> the fields ``a, b = result`` unpacks to.
UNPACK = {
    "EigResult": ("eigenvalues", "eigenvectors"),      # w, v = so.eigsh(A, k), as SciPy
    "TraceResult": ("estimate", "stderr"),             # value, error, as scipy.integrate.quad
    "DiagonalResult": ("estimate", "stderr"),
}


def _unpack(self: Any) -> Any:
    return iter(tuple(getattr(self, name) for name in UNPACK[type(self).__name__]))


def _g(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{float(x):.{digits}g}"


def _operator(settings: dict) -> str:
    n = settings.get("n")
    parts = [f"n={n}" if n is not None else "", settings.get("backend", ""), settings.get("dtype", "")]
    return ", ".join(p for p in parts if p)


def _eig_summary(r: Any) -> list[str]:
    s = r.settings or {}
    vals = np.atleast_1d(np.asarray(r.eigenvalues, dtype=np.float64))
    res = np.atleast_1d(np.asarray(r.residuals, dtype=np.float64))
    ok = np.atleast_1d(np.asarray(r.converged, dtype=bool))
    method = s.get("method", "")
    lines = [f"EigResult: {len(vals)} eigenpair{'s' * (len(vals) != 1)} ({s.get('which', '?')}, {method}, "
             f"{r.num_matvecs} products; {_operator(s)}), {int(ok.sum())} of {len(ok)} converged"
             + (f" to tol={s['tol']:g}" if "tol" in s else "")]
    est = np.atleast_1d(np.asarray(r.residuals_estimated if getattr(r, "residuals_estimated", None) is not None
                                   else np.zeros(len(vals)), dtype=bool))
    errors = getattr(r, "error_estimates", None)
    data = getattr(r, "data_stderr", None)
    head = ("", "eigenvalue", "residual", "converged") + ("error (est.)",) * (errors is not None) \
        + ("data stderr",) * (data is not None)
    rows: list[tuple[str, ...]] = [head]
    for i, (v, e, c) in enumerate(zip(vals, res, ok)):
        row: tuple[str, ...] = (str(i), f"{v:.8g}", f"{e:.2g}", "yes" if c else ("NO (estimated)" if est[i] else "NO"))
        if errors is not None:
            row += (f"{float(errors[i]):.2g}",)
        if data is not None:
            row += (f"{float(data[i]):.2g}",)
        rows.append(row)
    widths = [max(len(row[j]) for row in rows) for j in range(len(head))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    if est.any():
        lines.append("  residuals estimated from the Lanczos recurrence: no product was left in the budget to "
                     "verify them")
    if r.eigenvectors is not None:
        shape = tuple(getattr(r.eigenvectors, "shape", ()))
        lines.append(f"  eigenvectors: {type(r.eigenvectors).__module__.split('.')[0]} array of shape {shape}")
    return lines


def _trace_summary(r: Any) -> list[str]:
    s = r.settings or {}
    method = s.get("estimator") or s.get("method", "")
    rel = f", {r.stderr / abs(r.estimate):.1%} relative" if r.estimate and np.isfinite(r.stderr) else ""
    budget = f" of {s['max_matvecs']}" if "max_matvecs" in s else ""
    lines = [f"TraceResult: {r.estimate:.6g} +- {_g(r.stderr, 2)} (standard error{rel}; {method}, "
             f"{r.num_matvecs}{budget} products; {_operator(s)})"]
    data = getattr(r, "data_stderr", None)
    if data is not None:
        d = s.get("data_error", {})
        lines.append(f"  data stderr {_g(data, 2)} over {d.get('batches', '?')} batches of {d.get('samples', '?')} "
                     f"samples (the probes' part above); both: {_g(np.hypot(data, r.stderr), 2)}")
    return lines


def _diagonal_summary(r: Any) -> list[str]:
    s = r.settings or {}
    est, err = np.asarray(r.estimate, dtype=np.float64), np.asarray(r.stderr, dtype=np.float64)
    lines = [f"DiagonalResult: {est.size} entries ({s.get('method', '')}, {r.num_matvecs} products; "
             f"{_operator(s)})"]
    if est.size:
        lines.append(f"  range [{_g(est.min())}, {_g(est.max())}], mean {_g(est.mean())}; standard error "
                     f"median {_g(np.median(err), 2)}, max {_g(err.max(), 2)}")
        head = ", ".join(f"{e:.4g} +- {u:.2g}" for e, u in zip(est[:3], err[:3]))
        lines.append(f"  [{head}{', ...' if est.size > 3 else ''}]")
    return lines


def _density_summary(d: Any) -> list[str]:
    s = d.settings or {}
    nodes = np.asarray(d.nodes, dtype=np.float64)
    lines = [f"SpectralDensity: SLQ, {nodes.shape[0]} probes x {nodes.shape[1]} steps ({d.num_matvecs} products; "
             f"{_operator(s)})"]
    if nodes.size:
        line = f"  support [{_g(nodes.min())}, {_g(nodes.max())}]"
        if "n" in s:
            est, err = d.trace()
            line += f"; trace {est:.5g} +- {_g(err, 2)} (standard error over the probes)"
        lines.append(line)
    return lines


def _landscape_summary(ls: Any) -> list[str]:
    s = ls.settings or {}
    losses = np.asarray(ls.losses, dtype=np.float64)
    grid = " x ".join(str(len(a)) for a in ((ls.alphas,) if ls.betas is None else (ls.alphas, ls.betas)))
    return [f"Landscape: {1 if ls.betas is None else 2}-D along {s.get('directions', '?')} directions, {grid} losses, "
            f"span {s.get('span', '?')} ({ls.num_evaluations} evaluations, {_g(ls.seconds, 3)} s)",
            f"  loss at the center {_g(ls.center_loss, 6)}; range [{_g(losses.min(), 6)}, {_g(losses.max(), 6)}]"]


#: Result type -> its summary lines.
SUMMARIES = {"EigResult": _eig_summary, "TraceResult": _trace_summary, "DiagonalResult": _diagonal_summary,
             "SpectralDensity": _density_summary, "Landscape": _landscape_summary}


def _fields_summary(r: Any) -> list[str]:
    """Any other result: its fields, arrays by shape."""
    def short(v: Any) -> str:
        if isinstance(v, np.ndarray):
            return f"array{v.shape}" if v.size > 6 else np.array2string(v, precision=4)
        if v is not None and hasattr(v, "shape"):
            return f"{type(v).__module__.split('.')[0]} array{tuple(v.shape)}"
        return repr(v) if not isinstance(v, float) else f"{v:.6g}"

    return [f"{type(r).__name__}(" + ", ".join(f"{f.name}={short(getattr(r, f.name))}"
                                               for f in dataclasses.fields(r) if f.name != "settings") + ")"]


def summary(result: Result) -> str:
    """The readable summary of a result (its ``repr``).

    The numbers with their uncertainties, the method, the products used.

    Args:
        result: any :class:`Result`.

    Returns:
        One or more lines of text.
    """
    return "\n".join(SUMMARIES.get(type(result).__name__, _fields_summary)(result))
