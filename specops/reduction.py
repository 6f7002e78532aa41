"""The loss's reduction over a batch: read from the loss object, or checked on a split batch.

A model operator weights batches by what the loss does to a batch's samples: a mean
(``reduction="mean"``: batches weighted by their sample count) or a sum (``"sum"``:
batch losses added). A loss object that says it (``nn.CrossEntropyLoss(reduction=...)``,
a Keras loss's ``reduction``) decides; a ``reduction=`` argument that contradicts it is
refused. For a plain function, :func:`check_split` evaluates the loss of the first batch
and of its two halves at construction: a sum is additive, a mean the sample-weighted
average of the halves, and a loss that behaves as the other reduction is refused with
a message naming ``reduction=``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, get_args

import numpy as np

#: How a batch loss reduces over samples.
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)


def resolve(declared: str | None, from_loss: str | None, what: str) -> str:
    """The reduction of a batch loss.

    Args:
        declared: the ``reduction=`` argument (None: not given).
        from_loss: the reduction the loss object states (``"mean"``, ``"sum"``, or another of
            its values such as ``"none"``), or None for a loss that states none.
        what: the loss, for messages.

    Returns:
        ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: a reduction that is not ``"mean"`` or ``"sum"``; ``declared``
            contradicting the loss's own reduction. (A loss that states another reduction,
            ``"none"``, returns no scalar: the backend's check of the loss's value says so.)
    """
    if declared is not None and declared not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {declared!r}")
    if from_loss is None:
        return declared or "mean"
    if from_loss not in REDUCTIONS:  # unreduced ("none"): the backend's scalar check says what to change
        return declared or "mean"
    if declared is not None and declared != from_loss:
        raise ValueError(
            f"reduction={declared!r} contradicts the loss's own reduction {from_loss!r} ({what}): leave "
            f"reduction= out (specops reads it from the loss), or construct the loss with the reduction you mean"
        )
    return from_loss


def loss_name(loss_fn: Any) -> str:
    """A loss's name for messages: a function's name, or a loss object's class."""
    return str(getattr(loss_fn, "__name__", type(loss_fn).__name__))


def check_plain(adapter: Any, loss_fn: Any, stated: str | None, reduction: str, first_batch: Any,
                eps: float) -> None:
    """:func:`check_split` for a loss that states no reduction; nothing for one that does.

    Args:
        adapter: the backend's model adapter.
        loss_fn: the loss (None: the model's own, not checked).
        stated: the reduction the loss states, or None.
        reduction: the resolved reduction.
        first_batch: the first batch (None: no data, nothing to check).
        eps: the machine epsilon of the parameters' dtype (the tolerance is ``1e3 eps``).

    Raises:
        ValueError: as :func:`check_split`.
    """
    if stated is None and loss_fn is not None and first_batch is not None \
            and getattr(adapter, "random_layers", None) != "fixed":  # a fixed mask differs per batch
        check_split(adapter, first_batch, reduction, loss_name(loss_fn), rtol=1e3 * eps)


def _length(x: Any) -> int | None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) == 0 or shape[0] is None:
        return None
    return int(shape[0])


def split_batch(batch: Any, size: int, at: int) -> tuple[Any, Any] | None:
    """The two halves ``[:at]`` and ``[at:]`` of a batch of ``size`` samples, or None.

    Every array whose first axis has length ``size`` is sliced; other leaves are kept
    whole. Tuples, lists and dicts are walked.

    Args:
        batch: the batch.
        size: its number of samples.
        at: where to split.

    Returns:
        The two halves, or None when no array has ``size`` rows.
    """
    found = False

    def part(x: Any, sl: slice) -> Any:
        nonlocal found
        if isinstance(x, dict):
            return type(x)((k, part(v, sl)) for k, v in x.items())
        if isinstance(x, (tuple, list)):
            return type(x)(part(v, sl) for v in x)
        if _length(x) == size:
            found = True
            return x[sl]
        return x

    halves = part(batch, slice(0, at)), part(batch, slice(at, None))
    return halves if found else None


def check_split(adapter: Any, batch: Any, reduction: str, what: str, rtol: float) -> None:
    """Check that a plain loss function reduces ``batch`` as ``reduction`` says.

    Args:
        adapter: the backend's model adapter (``loss(batch)`` and ``batch_size(batch)``).
        batch: the first batch.
        reduction: ``"mean"`` or ``"sum"``, as declared.
        what: the loss, for messages.
        rtol: the relative difference within which two losses count as equal (a few
            hundred times the dtype's rounding).

    Raises:
        ValueError: the loss behaves as the other reduction (the message names
            ``reduction=``).

    Warns:
        UserWarning: the loss behaves as neither (not separable over samples, as a
            token-weighted mean with padding, or batch norm in training mode): batches are
            then combined as ``reduction`` says, which is an approximation.
    """
    try:
        size = adapter.batch_size(batch)
    except (ValueError, TypeError):
        return
    at = size // 2
    halves = split_batch(batch, size, at) if size >= 2 else None
    if halves is None:
        return
    try:
        whole, first, second = adapter.loss(batch), adapter.loss(halves[0]), adapter.loss(halves[1])
        n1, n2 = adapter.batch_size(halves[0]), adapter.batch_size(halves[1])
    except Exception:  # a batch that does not split (fixed shapes, a custom batch_size): nothing to say
        return
    if (n1, n2) != (at, size - at):
        return
    as_sum, as_mean = first + second, (n1 * first + n2 * second) / size
    scale = max(abs(whole), abs(first), abs(second), np.finfo(np.float64).tiny)
    fits = {"sum": abs(whole - as_sum) <= rtol * scale, "mean": abs(whole - as_mean) <= rtol * scale}
    if fits[reduction] or not all(np.isfinite((whole, first, second))):
        return
    other = "sum" if reduction == "mean" else "mean"
    if fits[other]:
        raise ValueError(
            f"the loss {what} {'sums' if other == 'sum' else 'averages'} over a batch's samples (the first batch's "
            f"loss {whole:.6g} is the {other} of its halves' {first:.6g} ({n1} samples) and {second:.6g} "
            f"({n2})), but reduction={reduction!r}: pass reduction={other!r}"
        )
    warnings.warn(
        f"the loss {what} is neither the sum nor the sample-weighted mean of its halves on the first batch "
        f"({whole:.6g} against {first:.6g} ({n1} samples) and {second:.6g} ({n2})): it is not separable over "
        f"samples, so batches are combined as reduction={reduction!r} says, which approximates the loss of "
        "all the data",
        stacklevel=3,
    )
