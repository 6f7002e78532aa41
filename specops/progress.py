"""Progress bars for long computations.

``progress=True`` (or a label) in :func:`~specops.eigsh`, :func:`~specops.trace`,
:func:`~specops.spectral_density`, :func:`~specops.landscape`, a backend's ``hessian``
(the batches its products evaluate), the tracker, and the bars of ``specops analyze``.

Bars are `tqdm <https://tqdm.github.io>`_'s ``tqdm.auto`` (a widget in Jupyter, a line on
stderr elsewhere). They count products (or loss evaluations) against the budget and show
the current estimate with its error: the wanted Ritz values and their largest residual for
``eigsh``, the running estimate and its standard error for ``trace``. They are silent unless
asked (``progress=False``, the default, costs nothing: the operator is not even wrapped) and
on every MPI rank but 0.

An algorithm asks for a :class:`Bar` with :func:`bar`, runs on :meth:`Bar.track` of its
operator (which advances the bar with every product) and reports intermediate estimates
with :func:`show`, a no-op on an operator that is not tracked.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TypeVar

import numpy as np

from specops.operator import LinearOperator

T = TypeVar("T")

#: Environment variables by which MPI launchers give a process its rank.
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def rank(comm: Any = None) -> int:
    """This process's rank: ``comm.rank`` if given, else the MPI launcher's variable (0 if none)."""
    if comm is not None and hasattr(comm, "rank"):
        return int(comm.rank)
    for var in MPI_RANK_VARS:
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return f"{float(arr):.4g}"
    shown = ", ".join(f"{x:.4g}" for x in arr[:5])
    return f"[{shown}{', ...' if arr.size > 5 else ''}]"


class Bar:
    """A progress bar of a count against a total, or nothing when disabled.

    Args:
        total: the expected count (a budget: a run that converges early ends as a full bar), or
            ``None``: an open count (e.g. the batches a model operator evaluates over its life).
        desc: what runs.
        unit: what is counted.
        enabled: draw at all.
        file: the stream (default: stderr).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "products", enabled: bool = True,
                 file: Any = None) -> None:
        self.count = 0
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            file = sys.stderr if file is None else file
            live = hasattr(file, "isatty") and file.isatty()
            # on a terminal the bar redraws often; in a log file every few seconds
            self._bar = tqdm(total=None if total is None else max(int(total), 1), desc=desc, unit=f" {unit}",
                             file=file, dynamic_ncols=True,
                             mininterval=0.1 if live else 5.0, leave=True)

    @property
    def enabled(self) -> bool:
        """Whether the bar is drawn."""
        return self._bar is not None

    def to(self, count: int) -> None:
        """Move the bar to ``count`` done."""
        self.count = int(count)
        if self._bar is not None:
            self._bar.update(self.count - self._bar.n)

    def show(self, **values: Any) -> None:
        """Show the current estimate beside the bar, e.g. ``show(trace=12.3, stderr=0.4)``."""
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(f"{k}={_fmt(v)}" for k, v in values.items()), refresh=False)

    def close(self, **values: Any) -> None:
        """Finish the bar (full, if the run stopped under its budget), showing ``values`` last."""
        if self._bar is None:
            return
        if values:
            self.show(**values)
        # converged early, or a budget exceeded (dense path)
        if self._bar.total is not None and self._bar.n != self._bar.total:
            self._bar.total = max(self._bar.n, 1)
        self._bar.close()
        self._bar = None

    def track(self, A: LinearOperator) -> LinearOperator:
        """``A`` whose products advance this bar (``A`` itself when the bar is disabled)."""
        return Tracked(A, self) if self.enabled else A

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(progress: bool | str | None, total: int | None, desc: str, unit: str = "products", comm: Any = None) -> Bar:
    """The bar an algorithm draws for its ``progress`` argument.

    Args:
        progress: False/None (no bar), True (a bar labelled ``desc``) or a string (a bar
            with that label).
        total: the budget (``None``: an open count).
        desc: the default label.
        unit: what is counted.
        comm: the communicator (or an operator with ``comm``): only rank 0 draws.

    Returns:
        :class:`Bar`, disabled unless asked and on rank 0.

    Raises:
        TypeError: ``progress`` is neither a bool, None nor a string.
    """
    if progress is not None and not isinstance(progress, (bool, str, np.bool_)):
        raise TypeError(f"progress must be True, False or a label (str), got {type(progress).__name__}")
    comm = getattr(comm, "comm", comm)
    on = bool(progress) and rank(comm) == 0
    return Bar(total, progress if isinstance(progress, str) else desc, unit, enabled=on)


class Tracked(LinearOperator):
    """``A`` with every product advancing a :class:`Bar` (by the number of columns)."""

    def __init__(self, A: LinearOperator, bar: Bar) -> None:
        super().__init__(A.shape, A.ops)
        self.A, self.bar = A, bar
        self.symmetric = A.symmetric
        self.positive_semidefinite = A.positive_semidefinite
        self.num_matvecs = 0

    def _matmat(self, V):
        out = self.A.matmat(V)
        self.num_matvecs += int(V.shape[1])
        self.bar.to(self.num_matvecs)
        return out

    def decide(self, value: T) -> T:
        """``A``'s decision, with exactly ``A``'s collectives.

        Only rank 0 draws a bar, so this wrapper must not add a broadcast of its own: the
        other ranks would never join it.
        """
        return self.A.decide(value)


def show(A: Any, **values: Any) -> None:
    """Show intermediate estimates on ``A``'s bar, if ``A`` is tracked (else nothing)."""
    if isinstance(A, Tracked):
        A.bar.show(**values)
