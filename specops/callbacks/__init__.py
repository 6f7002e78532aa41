"""Training-loop callbacks that record curvature with a :class:`specops.Tracker`.

- :mod:`specops.callbacks.keras`: ``TrackerCallback`` for ``model.fit(..., callbacks=[...])``.
- :mod:`specops.callbacks.lightning`: ``TrackerCallback`` for a PyTorch Lightning ``Trainer``
  (optional dependency: ``pip install lightning``).

Both are thin: every ``every`` epochs they call ``tracker.update(epoch, info=metrics)``.
Importing this package imports no framework.
"""

from typing import Any

from specops._checks import positive_int


def due(epoch: int, every: int) -> bool:
    """Whether 1-based ``epoch`` is a tracked one (every ``every``-th).

    Args:
        epoch: the epoch, counted from 1.
        every: track every this many epochs.

    Returns:
        ``True`` if ``epoch`` is a multiple of ``every``.
    """
    return epoch % every == 0


def check_every(every: Any) -> int:
    """``every`` as a positive int.

    Args:
        every: the number of epochs between records, as passed.

    Returns:
        ``every``.

    Raises:
        ValueError: not a positive integer.
    """
    return positive_int("every", every)
