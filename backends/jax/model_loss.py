"""``model_loss``: a ``loss(params, batch)`` from a model's ``apply_fn`` and a loss of its outputs.

The batch conventions of every backend (:mod:`specops.batches`), for JAX: dict batches
with ``"labels"``, outputs with ``logits``, or the model's own ``loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from specops import batches


def _apply(apply_fn: Callable[..., Any], params: Any, inputs: Any) -> Any:
    """``apply_fn(params, **inputs)`` for a dict of inputs, else ``apply_fn(params, inputs)``."""
    return apply_fn(params, **inputs) if isinstance(inputs, dict) else apply_fn(params, inputs)


def model_loss(apply_fn: Callable[..., Any], loss_fn: Callable[..., Any] | None = None) -> Callable[[Any, Any], Any]:
    """``loss(params, batch)`` for :func:`hessian` from a model and a loss of its outputs.

    The rules of the PyTorch backend's transformer support: a dict batch's ``"labels"``
    are the targets and its other entries the model's inputs, passed as keywords
    (``apply_fn(params, input_ids=..., attention_mask=...)``); a pair batch is
    ``(inputs, targets)``. A model returning a dict (or an object with ``.logits``, as
    Hugging Face's Flax models do) gives ``loss_fn`` its ``logits``. With
    ``loss_fn=None`` the model gets the whole batch, labels included, and its own
    ``"loss"`` (or ``.loss``) is the loss. Label shifting for a causal LM is left to
    the model or the loss, as written.

    Args:
        apply_fn: ``apply_fn(params, ...) -> outputs``, pure and traceable (e.g.
            ``lambda p, **kw: model.apply({"params": p}, **kw)`` for Flax linen).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (the PyTorch / optax order),
            or ``None`` for the model's own loss.

    Returns:
        ``loss(params, batch)``, to pass to :func:`hessian` as ``loss_fn``.

    Raises:
        TypeError: (when the loss is first traced) a dict batch without ``"labels"``;
            a batch that is neither a dict nor a pair; a dict output without
            ``"logits"``; no ``"loss"`` with ``loss_fn=None``; a loss that returns the
            model's outputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from specops.backends import jax as sj
        >>> apply = lambda p, input_ids: {"logits": p["w"] * input_ids}
        >>> loss = sj.model_loss(apply, lambda logits, labels: jnp.mean((logits - labels) ** 2))
        >>> H = sj.hessian(loss, {"w": jnp.array(1.0)}, {"input_ids": jnp.array([1.0, 2.0]),
        ...                                                "labels": jnp.array([0.0, 0.0])})
        >>> float((H @ jnp.array([1.0]))[0])
        5.0
    """
    if not callable(apply_fn) or not (loss_fn is None or callable(loss_fn)):
        raise TypeError("model_loss takes apply_fn(params, ...) -> outputs and loss_fn(outputs, targets) or None")

    call, general = "loss_fn(outputs, targets)", "loss_fn(params, batch) and pass it to hessian directly"

    def loss(params: Any, batch: Any) -> Any:
        if loss_fn is None:
            return batches.own_loss(_apply(apply_fn, params, batch), call)
        inputs, targets = batches.split(batch, call, general)
        value = loss_fn(batches.logits(_apply(apply_fn, params, inputs), call, general), targets)
        batches.check_not_outputs(value)
        return value

    return loss

