"""A PyTorch Lightning callback that records curvature every N epochs.

Optional dependency: ``pip install lightning`` (or the older ``pytorch-lightning``).

Example:
    >>> from specops.callbacks.lightning import TrackerCallback
    >>> trainer = lightning.pytorch.Trainer(max_epochs=20, callbacks=[TrackerCallback(tracker, every=5)])  # doctest: +SKIP
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("specops.callbacks.lightning needs PyTorch Lightning: pip install lightning") from e

from specops.callbacks import check_every, due


class TrackerCallback(Callback):
    """Call ``tracker.update(epoch, info=metrics)`` at the end of every ``every``-th training epoch.

    The module's train/eval mode is restored after each update (``make_operator`` may call
    ``model.eval()`` to take the Hessian with batch norm's running statistics). In a
    multi-process run only global rank 0 records, unless ``all_ranks`` (for a tracker whose
    operators are data-parallel over the ranks).

    Args:
        tracker: a :class:`specops.Tracker`.
        every: track every this many epochs (1-based epochs).
        at_start: also record step 0, before the first epoch.
        all_ranks: every rank calls ``update`` (collective operators), not only rank 0.

    Attributes:
        records: the records made by this callback, in order.
    """

    def __init__(self, tracker, every: int = 1, at_start: bool = False, all_ranks: bool = False):
        super().__init__()
        self.tracker, self.every, self.at_start, self.all_ranks = tracker, check_every(every), at_start, all_ranks
        self.records = []

    def _update(self, trainer, pl_module, step):
        if not (self.all_ranks or trainer.is_global_zero):
            return
        info = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        was_training = pl_module.training
        try:
            self.records.append(self.tracker.update(step, info=info))
        finally:
            pl_module.train(was_training)

    def on_train_start(self, trainer, pl_module):
        """Record step 0 if ``at_start``."""
        if self.at_start:
            self._update(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module):
        """Record 1-based ``current_epoch + 1`` when due, with the trainer's metrics as ``info``."""
        if due(trainer.current_epoch + 1, self.every):
            self._update(trainer, pl_module, trainer.current_epoch + 1)
