"""``model_loss``: a ``loss(params, batch)`` from a model's ``apply_fn`` and a loss of its outputs.

The batch conventions of the PyTorch backend's transformer support, for JAX: dict
batches with ``"labels"``, outputs with ``logits``, or the model's own ``loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _describe_output(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with keys {', '.join(map(str, obj))}"
    if hasattr(obj, "shape"):
        return f"an array of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


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

    def loss(params: Any, batch: Any) -> Any:
        if loss_fn is None:
            outputs = _apply(apply_fn, params, batch)
            value = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
            if value is None:
                raise TypeError(
                    f"loss_fn=None takes the loss the model returns given the whole batch (labels included), "
                    f"but it returned {_describe_output(outputs)} without 'loss'; pass loss_fn(outputs, "
                    "targets), applied to the outputs' 'logits'"
                )
            return value
        if isinstance(batch, dict):
            if "labels" not in batch:
                raise TypeError(
                    f"a dict batch needs 'labels' (the targets; the other entries are the model's inputs, "
                    f"passed as keywords), got keys {sorted(batch)}; or write loss_fn(params, batch) and pass "
                    "it to hessian directly"
                )
            inputs, targets = {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
        else:
            raise TypeError(f"model_loss needs batches (inputs, targets) or dicts with 'labels', got "
                            f"{type(batch).__name__}")
        outputs = _apply(apply_fn, params, inputs)
        if isinstance(outputs, dict) or hasattr(outputs, "logits"):
            logits = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
            if logits is None:
                raise TypeError(f"the model returns {_describe_output(outputs)}; model_loss applies loss_fn to its "
                                "'logits', which it has not: write loss_fn(params, batch) yourself")
            outputs = logits
        value = loss_fn(outputs, targets)
        if isinstance(value, dict) or hasattr(value, "logits"):
            raise TypeError(f"the loss function returned the model's outputs ({_describe_output(value)}), "
                            "not a scalar: return outputs['loss'], or a loss of outputs['logits']")
        return value

    return loss

