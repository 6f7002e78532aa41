"""The tracker's log read back: :class:`TrackerLog`, arrays of each metric over the steps.

A log is the JSON-lines file :class:`specops.Tracker` appends to, one record per line in
specops' one JSON encoding (:mod:`specops.io`: a non-finite float such as the stderr of a
single probe is ``{"__float__": "inf"}``); logs written before that encoding, with ``null``
for an infinite stderr, read the same. The plots (``plot_*``) are drawn by the application
layer, :mod:`specops.plots.tracker`, imported when a plot is asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from specops.density import SpectralDensity
from specops.io import from_jsonable

RESIDUAL = "residual"
PRECONDITIONED = "preconditioned"


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
                records.append(from_jsonable(json.loads(line)))
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

    def sharpness(self) -> dict:
        """The optimizer's view of the log as arrays over the steps.

        Returns:
            ``{"step", "sharpness" (top eigenvalue of H), "preconditioned" (of P^-1 H), "threshold",
            "loss", "alignment"}``, NaN where a record lacks one.
        """

        def column(get: Callable[[dict], Any]) -> np.ndarray:
            out = []
            for r in self.records:
                try:
                    v = get(r)
                except (KeyError, IndexError, TypeError):
                    v = None
                out.append(np.nan if v is None else float(v))
            return np.array(out)

        return {"step": self.steps, "sharpness": column(lambda r: r["eigenvalues"][0]),
                "preconditioned": column(lambda r: r[PRECONDITIONED]["eigenvalues"][0]),
                "threshold": column(lambda r: r["threshold"]), "loss": column(lambda r: r["loss"]),
                "alignment": column(lambda r: r["alignment"])}

    def traces(self, block: str | None = None, curvature: str | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, estimates, stderrs)`` of the trace.

        Of the first curvature, a ``block``, or a ``curvature`` (``"residual"``: the term ``H - G``).
        """
        tr = self._where("trace", block, curvature)
        return (np.array([s for s, _ in tr]), np.array([t["estimate"] for _, t in tr]),
                np.array([np.inf if t["stderr"] is None else t["stderr"] for _, t in tr]))  # None: a log before specops.io

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

    # --- plots (drawn by specops.plots.tracker) ------------------------------------------
    def plot_trace(self, ax: Any = None, block: str | None = None, label: str | None = None, **kwargs: Any) -> Any:
        """The trace against the step with error bars of one standard error; returns the axes."""
        from specops.plots import tracker

        return tracker.plot_trace(self, ax=ax, block=block, label=label, **kwargs)

    def plot_eigenvalues(self, ax: Any = None, block: str | None = None, label: str | None = None, which: int = 0,
                         **kwargs: Any) -> Any:
        """Eigenvalue ``which`` (0: the top) against the step, with its residual as error bar."""
        from specops.plots import tracker

        return tracker.plot_eigenvalues(self, ax=ax, block=block, label=label, which=which, **kwargs)

    def plot_density(self, ax: Any = None, block: str | None = None, sigma: float | None = None,
                     cmap: str = "viridis") -> Any:
        """The spectral densities of all steps on one log-scale axes, coloured by step."""
        from specops.plots import tracker

        return tracker.plot_density(self, ax=ax, block=block, sigma=sigma, cmap=cmap)

    def plot_curvatures(self, path: str | None = None) -> Any:
        """The curvatures side by side; saved to ``path`` if given.

        Top eigenvalue and trace (with the residual term ``H - G``) against the step, and the
        last step's densities overlaid.

        Returns:
            The matplotlib figure.

        Raises:
            ValueError: the log tracked a single curvature.
        """
        from specops.plots import tracker

        return tracker.plot_curvatures(self, path=path)

    def plot_sharpness(self, ax: Any = None, path: str | None = None, label: str = "") -> Any:
        """Sharpness and preconditioned sharpness against the step, with the threshold as a dashed line.

        Log-scale y (raw and preconditioned sharpness differ by orders of magnitude under Adam).

        Returns:
            The axes.
        """
        from specops.plots import tracker

        return tracker.plot_sharpness(self, ax=ax, path=path, label=label)

    def plot(self, path: str | None = None) -> Any:
        """Trace, top eigenvalue and density evolution side by side; saved to ``path`` if given.

        Returns:
            The matplotlib figure.
        """
        from specops.plots import tracker

        return tracker.plot(self, path=path)


def _source(record: dict, block: str | None, curvature: str | None) -> dict:
    """The part of a record holding the metrics of ``block`` or ``curvature`` (or the first operator)."""
    if block is not None:
        return record.get("blocks", {}).get(block, {})
    if curvature is None or curvature == record.get("curvature", "hessian"):
        return record
    if curvature == RESIDUAL:
        return record.get(RESIDUAL, {})
    return record.get("curvatures", {}).get(curvature, {})
