"""Calling the model on a batch: batch conventions, dict inputs, :class:`FunctionalModel`, the loss module."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from specops import batches

#: how this backend calls a loss of the outputs (for messages)
_CALL = "loss_fn(outputs, targets)"


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
            loss = batches.own_loss(_call(self.model, batch), _CALL)
        elif self.loss_form == "model":
            loss = self.loss_fn(self.model, batch)
        else:
            inputs, targets = batches.split(batch, _CALL)
            outputs = batches.logits(_call(self.model, inputs), _CALL)
            try:
                loss = self.loss_fn(outputs, targets)
            except TypeError as e:
                raise batches.loss_call_error(_CALL, outputs, e) from e
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            batches.check_not_outputs(loss)
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


def _map_tensors(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(fn, v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        mapped = [_map_tensors(fn, v) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    return obj


def _tensors(obj):
    """Every tensor of a batch (nested in dicts, tuples and lists), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        yield from _tensors(v)
