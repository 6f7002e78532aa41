"""Training-loop callbacks that record curvature with a :class:`specops.Tracker`.

- :mod:`specops.callbacks.keras`: ``TrackerCallback`` for ``model.fit(..., callbacks=[...])``.
- :mod:`specops.callbacks.lightning`: ``TrackerCallback`` for a PyTorch Lightning ``Trainer``
  (optional dependency: ``pip install lightning``).

Both are thin: every ``every`` epochs they call ``tracker.update(epoch, info=metrics)``.
Importing this package imports no framework.
"""


def due(epoch: int, every: int) -> bool:
    """Whether 1-based ``epoch`` is a tracked one (every ``every``-th)."""
    return epoch % every == 0


def check_every(every) -> int:
    """``every`` as a positive int.

    Raises:
        ValueError: not a positive integer.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive number of epochs, got {every!r}")
    return every
