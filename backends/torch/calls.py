"""Calling the model on a batch: batch conventions, dict inputs, :class:`FunctionalModel`, the loss module."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


class _LossModule(nn.Module):
    """``batch -> scalar loss``, with the user's model as the submodule ``model``.

    Wrapping lets ``torch.func.functional_call`` substitute the parameters for the whole
    call, including a general ``loss_fn(model, batch)`` that touches the model freely.
    ``loss_fn=None`` takes the loss the model returns itself (``outputs.loss``: a Hugging
    Face model given a batch with ``labels``).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, loss_form: str, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.loss_form = loss_form
        self.dtype = dtype

    def forward(self, batch):
        if self.loss_fn is None:
            loss = _own_loss(_call(self.model, batch))
        elif self.loss_form == "model":
            loss = self.loss_fn(self.model, batch)
        else:
            inputs, targets = _split(batch)
            outputs = _logits(_call(self.model, inputs))
            try:
                loss = self.loss_fn(outputs, targets)
            except TypeError as e:
                raise TypeError(
                    f"loss_fn(outputs, targets) failed: {e}. specops called it with the model's outputs "
                    f"({_describe(outputs)}) and the targets; if it is written as loss_fn(model, batch), name "
                    "its first parameter `model` or pass loss_form='model'"
                ) from e
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            if isinstance(loss, dict) or hasattr(loss, "logits"):
                raise TypeError(
                    f"the loss function returned the model's outputs ({_describe(loss)}), not a scalar: return "
                    "outputs.loss, or a loss of outputs.logits"
                )
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"the loss function must return a scalar tensor, got {shape}; reduce it with "
                "reduction='mean' (or 'sum', and pass reduction='sum' to hessian)"
            )
        if loss.is_floating_point() and torch.finfo(loss.dtype).bits < torch.finfo(self.dtype).bits:
            raise ValueError(
                f"the loss is computed in {loss.dtype} while the parameters are {self.dtype}: its Hessian "
                f"would be only {loss.dtype}-accurate. Hugging Face's built-in losses (outputs.loss) cast "
                "the logits to float32; for a float64 model pass a loss of the logits instead, e.g. "
                "loss_fn=lambda logits, labels: F.cross_entropy(logits[:, :-1].flatten(0, 1), "
                "labels[:, 1:].flatten()) for a causal LM (batches {'input_ids': ..., 'labels': ...})"
            )
        return loss


def _call(model, inputs):
    """The model applied to a batch's inputs, as its ``forward`` takes them.

    A dict is passed as keywords (``model(**inputs)``, Hugging Face) unless ``forward`` takes
    one positional argument and not every key as a keyword: then whole (``model(inputs)``,
    curvlinops' convention). A tuple or list is spread (``model(*inputs)``); anything else is
    passed as is. A :class:`FunctionalModel` always gets the inputs whole.
    """
    if isinstance(model, FunctionalModel):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(inputs) if _takes_dict_whole(model, inputs) else model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _takes_dict_whole(model: Any, inputs: dict) -> bool:
    forward = model.forward if isinstance(model, nn.Module) else model
    function = getattr(forward, "__func__", None)  # a bound method: its function is cached, not the method
    return _dict_whole(function or forward, function is not None, tuple(inputs))


@functools.lru_cache(maxsize=256)
def _dict_whole(forward: Callable[..., Any], unbound: bool, inputs: tuple[str, ...]) -> bool:
    import inspect

    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    if unbound:
        parameters = parameters[1:]  # self
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return False
    keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if all(k in keywords for k in inputs):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in parameters if p.default is p.empty and p.kind is not p.VAR_POSITIONAL]
    return len(positional) >= 1 and len(required) <= 1


class FunctionalModel(nn.Module):
    """A functional model ``f(params, inputs)`` with a dict of parameter tensors, as a module.

    :func:`hessian` wraps ``model=f`` given with ``params={name: tensor}`` in one, as JAX's
    loss functions take their parameters. The tensors are not changed (the module holds
    them as parameters sharing their storage; specops never writes to parameters). Every
    batch's inputs reach ``f`` whole: ``f(params, inputs)``.

    Args:
        f: ``f(params, inputs) -> outputs``, ``params`` a dict name -> tensor like ``params``.
        params: the parameters, name -> floating tensor (names without dots).

    Raises:
        TypeError: ``params`` is not a dict of tensors.
        ValueError: a name holds a dot.
    """

    def __init__(self, f: Callable[..., Any], params: Mapping[str, torch.Tensor]):
        super().__init__()
        if not isinstance(params, Mapping) or not all(isinstance(t, torch.Tensor) for t in params.values()):
            raise TypeError("a functional model f(params, inputs) needs params= as a dict name -> tensor, got "
                            f"{type(params).__name__}")
        dotted = [k for k in params if "." in k or not k]
        if dotted:
            raise ValueError(f"parameter names of a functional model cannot hold dots or be empty: {dotted[:4]}; "
                             "use a flat dict (e.g. 'layer1_weight')")
        self.f = f
        self._names = list(params)
        for name, t in params.items():
            self.register_parameter(name, nn.Parameter(t.detach(), requires_grad=t.is_floating_point()))

    def forward(self, inputs: Any) -> Any:
        """``f(params, inputs)`` with the module's (or the substituted) parameters."""
        return self.f({n: getattr(self, n) for n in self._names}, inputs)


def _eager(model: Any) -> Any:
    """The module a ``torch.compile`` d model wraps (``model._orig_mod``), else ``model``.

    Compiled graphs have no double backward (aot_autograd), and which engine worked used to
    depend on what ran before in the process; the eager module computes the same function,
    so every engine differentiates it, the same way in every process.
    """
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    optimized = getattr(compiled, "OptimizedModule", None)
    if optimized is not None and isinstance(model, optimized):
        return model._orig_mod
    return model


def _split(batch):
    """``(inputs, targets)`` of a batch for ``loss_fn(outputs, targets)``."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise TypeError(
                f"with loss_fn(outputs, targets), a dict batch needs 'labels' (the targets; the other entries "
                f"are the model's inputs), got keys {sorted(batch)}; or write loss_fn(model, batch)"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            "with loss_fn(outputs, targets) every batch must be a pair (inputs, targets) or a dict with "
            f"'labels', got {type(batch).__name__}; for other batches (triples, ...) write the loss as "
            "loss_fn(model, batch) and pass loss_form='model'"
        )
    return batch


def _logits(outputs):
    """The tensor ``loss_fn(outputs, targets)`` gets: ``outputs.logits`` of a ``ModelOutput`` or dict."""
    if isinstance(outputs, torch.Tensor) or not (isinstance(outputs, dict) or hasattr(outputs, "logits")):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
    if logits is None:
        raise TypeError(
            f"the model returns {_describe(outputs)}; specops applies loss_fn(outputs, targets) to its "
            "'logits', which it has not: write the loss as loss_fn(model, batch)"
        )
    return logits


def _own_loss(outputs):
    """``outputs.loss`` for ``loss_fn=None``."""
    loss = (outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None))
    if loss is None:
        raise TypeError(
            f"loss_fn=None takes the loss the model returns, but it returned {_describe(outputs)} without one; "
            "Hugging Face models compute it only when the batch has 'labels' (add them), or pass "
            "loss_fn(outputs, targets), applied to outputs.logits"
        )
    return loss


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with fields {', '.join(map(str, obj.keys()))}"
    return f"a {type(obj).__name__}"


def _map_tensors(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(fn, v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        mapped = [_map_tensors(fn, v) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    return obj


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None
