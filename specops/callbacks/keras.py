"""A Keras callback that records curvature every N epochs (``model.fit(..., callbacks=[...])``).

Example:
    >>> import specops
    >>> from specops.backends import tensorflow as stf
    >>> from specops.callbacks.keras import TrackerCallback
    >>> tracker = specops.Tracker(lambda: stf.hessian(model, loss, data), "curvature.jsonl")  # doctest: +SKIP
    >>> model.fit(X, y, epochs=20, callbacks=[TrackerCallback(tracker, every=5)])             # doctest: +SKIP
"""

from __future__ import annotations

import keras

from specops.callbacks import check_every, due


class TrackerCallback(keras.callbacks.Callback):
    """Call ``tracker.update(epoch, info=logs)`` after every ``every``-th epoch (1-based epochs).

    Args:
        tracker: a :class:`specops.Tracker` whose ``make_operator`` builds the Hessian of the
            model at its current weights.
        every: track every this many epochs.
        at_start: also record step 0, before the first epoch.

    Attributes:
        records: the records made by this callback, in order.
    """

    def __init__(self, tracker, every: int = 1, at_start: bool = False):
        super().__init__()
        self.tracker, self.every, self.at_start = tracker, check_every(every), at_start
        self.records = []

    def on_train_begin(self, logs=None):
        """Record step 0 if ``at_start``."""
        if self.at_start:
            self.records.append(self.tracker.update(0, info=_numbers(logs)))

    def on_epoch_end(self, epoch, logs=None):
        """Record 1-based ``epoch + 1`` when due, with the epoch's logs as ``info``."""
        if due(epoch + 1, self.every):
            self.records.append(self.tracker.update(epoch + 1, info=_numbers(logs)))


def _numbers(logs) -> dict:
    return {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
