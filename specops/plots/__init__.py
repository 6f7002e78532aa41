"""Figures, in the application layer above the core (the core writes no figures and never imports this).

:func:`pyplot` (matplotlib's ``pyplot``, on the ``Agg`` backend unless one was chosen) and
:func:`atomic_savefig` serve ``specops analyze``'s report, ``specops study`` and the
tracker's plots (:mod:`specops.plots.tracker`, called by :class:`specops.TrackerLog`'s
``plot_*`` methods).
"""

from __future__ import annotations

import io
import os
from typing import Any

from specops.io import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot``, switched to ``Agg`` when no non-interactive backend was chosen."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg") and "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def atomic_savefig(fig: Any, path: str, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
