"""Calling the model on a batch: batch conventions (inputs, targets, dict batches, logits, the model's own loss)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from specops.model import common_batch_size


def _batch_size(batch: Any) -> int:
    return common_batch_size(tf.nest.flatten(batch))
def _split(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch for ``loss_fn(targets, outputs)``."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise TypeError(
                f"with loss_fn(targets, outputs), a dict batch needs 'labels' (the targets; the other entries "
                f"are the model's inputs, passed to it as one dict), got keys {sorted(batch)}; or write "
                "loss_fn(model, batch)"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            "with loss_fn(targets, outputs) every batch must be a pair (inputs, targets) or a dict with "
            f"'labels', got {type(batch).__name__}; for other batches write the loss as loss_fn(model, batch) "
            "and pass loss_form='model'"
        )
    return batch[0], batch[1]


def _describe_output(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with keys {', '.join(map(str, obj))}"
    if isinstance(obj, tf.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _logits(outputs: Any) -> Any:
    """What ``loss_fn(targets, outputs)`` gets: ``outputs['logits']`` (or ``.logits``) of a dict output."""
    if isinstance(outputs, tf.Tensor) or not (isinstance(outputs, dict) or hasattr(outputs, "logits")):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
    if logits is None:
        raise TypeError(
            f"the model returns {_describe_output(outputs)}; specops applies loss_fn(targets, outputs) to its "
            "'logits', which it has not: write the loss as loss_fn(model, batch)"
        )
    return logits


def _own_loss(outputs: Any) -> Any:
    """``outputs['loss']`` (or ``.loss``) for ``loss_fn=None``."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        raise TypeError(
            f"loss_fn=None takes the loss the model returns given the whole batch (labels included), but it "
            f"returned {_describe_output(outputs)} without 'loss'; pass loss_fn(targets, outputs), applied to "
            "the outputs' 'logits'"
        )
    return loss

