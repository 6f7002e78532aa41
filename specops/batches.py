"""Batch conventions, the same in every framework: what a batch holds and how many samples.

A backend's ``loss_fn`` takes one of three forms (``loss_form=``):

- a loss of the outputs (``loss_fn(outputs, targets)``; Keras' order is ``loss_fn(targets,
  outputs)``): every batch is a pair ``(inputs, targets)`` (a tuple or list of two), or a
  dict whose ``"labels"`` are the targets and whose other entries are the model's inputs
  (Hugging Face). :func:`split` takes the batch apart. A model that returns a dict, or an
  object with ``.logits`` (a ``ModelOutput``), gives the loss its ``"logits"``
  (:func:`logits`);
- ``loss_fn(model, batch)`` for any batch: the batch is the loss's own business;
- ``loss_fn=None``: the model gets the whole batch (labels included) and its own
  ``"loss"`` output is the loss (:func:`own_loss`).

The number of samples of a batch, which weights it under ``reduction="mean"``, is the
common leading dimension of its arrays (:func:`batch_size`): every array with a leading
dimension must have the same, scalars are ignored. A batch whose arrays disagree (a
batch of other structure) needs its size given: the PyTorch backend's ``batch_size=``.

The framework reads the batch's arrays (its tree utility); the rules and the messages
are here, once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# how a loss of the whole batch is written in the PyTorch and TensorFlow backends, for messages
_GENERAL = "loss_fn(model, batch)"
_GENERAL_FORM = "loss_fn(model, batch) and pass loss_form='model'"


def describe(obj: Any) -> str:
    """A model output or batch in a few words, for messages (a dict's keys, an array's shape)."""
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with keys {', '.join(map(str, obj))}"
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def split(batch: Any, call: str, general: str | None = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch for a loss of the outputs.

    Args:
        batch: a pair ``(inputs, targets)``, or a dict with ``"labels"`` (the targets; the
            other entries, as one dict, are the inputs).
        call: how the backend calls the loss, for messages (``"loss_fn(outputs, targets)"``).
        general: how a loss of the whole batch is written in this backend, for messages
            (None: ``loss_fn(model, batch)`` with ``loss_form='model'``).

    Returns:
        ``(inputs, targets)``.

    Raises:
        TypeError: a dict without ``"labels"``, or a batch that is neither a pair nor a dict.
    """
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise TypeError(
                f"with {call}, a dict batch needs 'labels' (the targets; the other entries are the model's "
                f"inputs), got keys {sorted(batch)}; or write {general or _GENERAL}"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"with {call} every batch must be a pair (inputs, targets) or a dict with 'labels', got "
            f"{type(batch).__name__}; for other batches (triples, ...) write the loss as "
            f"{general or _GENERAL_FORM}"
        )
    return batch[0], batch[1]


def logits(outputs: Any, call: str, general: str | None = None) -> Any:
    """What a loss of the outputs gets: the outputs, or the ``"logits"`` of a dict or ``ModelOutput``.

    Args:
        outputs: the model's outputs.
        call: how the backend calls the loss, for messages.
        general: how a loss of the whole batch is written in this backend, for messages
            (None: ``loss_fn(model, batch)``).

    Returns:
        ``outputs["logits"]`` (or ``outputs.logits``) of a dict output, else ``outputs``.

    Raises:
        TypeError: a dict output without ``"logits"``.
    """
    if not (isinstance(outputs, dict) or hasattr(outputs, "logits")):
        return outputs
    found = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
    if found is None:
        raise TypeError(
            f"the model returns {describe(outputs)}; specops applies {call} to its 'logits', which it has not: "
            f"write the loss as {general or _GENERAL}"
        )
    return found


def own_loss(outputs: Any, call: str) -> Any:
    """The model's own loss for ``loss_fn=None``: ``outputs["loss"]`` (or ``outputs.loss``).

    Args:
        outputs: the model's outputs given the whole batch.
        call: how the backend calls a loss of the outputs, for messages.

    Returns:
        The loss.

    Raises:
        TypeError: outputs without a loss.
    """
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        raise TypeError(
            f"loss_fn=None takes the loss the model returns given the whole batch, but it returned "
            f"{describe(outputs)} without 'loss'; Hugging Face models compute it only when the batch has "
            f"'labels' (add them), or pass {call}, applied to the outputs' 'logits'"
        )
    return loss


def loss_call_error(call: str, outputs: Any, error: Exception) -> TypeError:
    """The error for a loss of the outputs that failed when called (perhaps a loss of the model).

    Args:
        call: how the backend calls the loss.
        outputs: the outputs it was given.
        error: what it raised.

    Returns:
        The error, to raise from ``error``.
    """
    return TypeError(
        f"{call} failed: {error}. specops called it as {call} with the model's outputs ({describe(outputs)}); "
        "if it is written as loss_fn(model, batch), name its first parameter `model` or pass loss_form='model'"
    )


def check_not_outputs(value: Any) -> None:
    """Raise if a loss function returned the model's outputs instead of a scalar.

    Args:
        value: what the loss function returned.

    Raises:
        TypeError: a dict or an object with ``.logits``.
    """
    if isinstance(value, dict) or hasattr(value, "logits"):
        raise TypeError(
            f"the loss function returned the model's outputs ({describe(value)}), not a scalar: return "
            "outputs.loss (outputs['loss'] of a dict), or a loss of outputs['logits'] (outputs.logits)"
        )


def batch_size(arrays: Iterable[Any]) -> int:
    """The number of samples of a batch: the common leading dimension of its arrays.

    Args:
        arrays: the arrays of one batch, flattened by the framework's tree utility;
            scalars and objects without a shape are ignored.

    Returns:
        The leading dimension every array with one shares.

    Raises:
        ValueError: the arrays disagree, or the batch holds no array with a leading dimension.
    """
    sizes = {int(x.shape[0]) for x in arrays if getattr(x, "shape", None) is not None and len(x.shape) >= 1}
    if len(sizes) != 1:
        found = f"leading dimensions {sorted(sizes)}" if sizes else "no array with a leading dimension"
        raise ValueError(
            f"cannot tell the number of samples of a batch: its arrays have {found}; every array of a batch "
            "must hold one row per sample (or pass batch_size=lambda batch: ..., where the backend takes it)"
        )
    return sizes.pop()
