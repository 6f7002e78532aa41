"""torch.optim state as specops preconditioners and stability thresholds.

Read by :func:`preconditioner` at the optimizer's current step (the state its last
``step()`` left), for the Hessian's parameter layout:

* Adam / AdamW: ``P = sqrt(v / (1 - beta2^t)) + eps`` (``max_exp_avg_sq`` for amsgrad),
  as ``torch.optim.Adam`` divides by it;
* RMSprop: ``P = sqrt(v) + eps``, centered ``sqrt(v - g_avg^2) + eps``;
* Adagrad: ``P = sqrt(sum) + eps``;
* SGD (with or without momentum / Nesterov): ``P = I``.

:func:`stability_threshold` reads the learning rate and momentum of the parameter groups
(:func:`specops.preconditioner.stability_threshold` has the formulas and references).
"""

from __future__ import annotations

from typing import Any

import torch

from specops.model import ModelOperator
from specops.preconditioner import DiagonalPreconditioner, one_setting, unknown_optimizer
from specops.preconditioner import stability_threshold as _threshold

KNOWN = ("Adam", "AdamW", "RMSprop", "Adagrad", "SGD")


def _kind(optimizer: Any) -> str:
    if isinstance(optimizer, torch.optim.lr_scheduler.LRScheduler) or hasattr(optimizer, "get_last_lr"):
        raise TypeError(
            f"got the learning-rate scheduler {type(optimizer).__name__}, not an optimizer: pass its optimizer "
            "(scheduler.optimizer). specops reads the learning rate the optimizer holds now, which the scheduler "
            "has set for the next step"
        )
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls.__name__ in KNOWN:
            return cls.__name__
    raise unknown_optimizer(type(optimizer).__name__, "torch")


def _model_params(H: Any, wrt: Any) -> tuple[Any, Any, list[str], dict]:
    """``(ops, layout, names, name -> tensor)`` of the parameters ``H`` differentiates."""
    from .ops import TorchOps
    from .params import _resolve_params
    from specops.layout import ParamLayout

    if isinstance(H, ModelOperator):
        adapter = getattr(H.adapter, "base", H.adapter)  # a GGN / Fisher wraps the Hessian's adapter
        model = getattr(adapter, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError("H is not a PyTorch model's operator; build it with specops.backends.torch.hessian")
        if wrt is not None:
            raise TypeError("wrt= goes to hessian(...); the preconditioner follows H's parameters")
        layout, ops = H.layout, H.ops
    elif isinstance(H, torch.nn.Module):
        model = H
        names = _resolve_params(model, wrt)
        named = dict(model.named_parameters())
        layout = ParamLayout(names, [tuple(named[n].shape) for n in names])
        first = named[names[0]]
        ops = TorchOps(first.dtype, first.device)
    else:
        raise TypeError(f"pass the Hessian operator (or the model) whose parameter order P must follow, got "
                        f"{type(H).__name__}")
    named = dict(model.named_parameters())
    return ops, layout, layout.names, {n: named[n] for n in layout.names}


def _groups(optimizer: Any) -> dict[int, dict]:
    """id(parameter) -> its parameter group."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _step(state: dict) -> float:
    s = state["step"]
    return float(s.item() if isinstance(s, torch.Tensor) else s)


def _diagonal(kind: str, p: torch.Tensor, group: dict, state: dict, name: str) -> torch.Tensor:
    """The optimizer's divisor for parameter ``p`` (float64)."""
    if kind == "SGD":
        return torch.ones(p.shape, dtype=torch.float64, device=p.device)
    if not state:
        raise ValueError(
            f"the optimizer holds no state for parameter {name!r} yet: it has not stepped (or that parameter had "
            "no gradient at every step so far). Read the preconditioner after optimizer.step()"
        )
    eps = group["eps"]
    if kind in ("Adam", "AdamW"):
        beta2 = group["betas"][1]
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        return (v.double() / (1 - beta2 ** _step(state))).sqrt() + eps
    if kind == "RMSprop":
        v = state["square_avg"].double()
        if group.get("centered"):
            v = v - state["grad_avg"].double() ** 2
        return v.clamp_min(0).sqrt() + eps
    return state["sum"].double().sqrt() + eps  # Adagrad


def preconditioner(optimizer: torch.optim.Optimizer, H: Any, *, wrt: Any = None) -> DiagonalPreconditioner:
    """The diagonal preconditioner ``P`` of a torch.optim optimizer at its current step.

    ``P`` is what the optimizer divides the (momentum of the) gradient by:
    ``sqrt(v_hat) + eps`` for Adam/AdamW (``max_exp_avg_sq`` with amsgrad), ``sqrt(v) + eps``
    for RMSprop (centered: ``sqrt(v - g_avg^2) + eps``), ``sqrt(sum) + eps`` for Adagrad, and
    the identity for SGD; each parameter group with its own ``eps`` and ``betas``. Adam's
    effective step is ``lr * m_hat / P``, so ``specops.preconditioned(H, P)`` is the operator
    whose top eigenvalue meets the threshold ``38 / lr`` at the edge of stability (Cohen et
    al. 2022, "Adaptive gradient methods at the edge of stability").

    Args:
        optimizer: a ``torch.optim`` Adam, AdamW, RMSprop, Adagrad or SGD (subclasses too).
        H: the Hessian operator (``specops.backends.torch.hessian``) whose parameters and order
            ``P`` follows, or the model (with ``wrt=`` as ``hessian`` takes it).
        wrt: with a model: the parameters (names / glob patterns / modules; None: all).

    Returns:
        A :class:`~specops.preconditioner.DiagonalPreconditioner` (computed in float64, stored in ``H``'s dtype).

    Raises:
        TypeError: an optimizer specops does not read (the message says how to pass a diagonal by
            hand), or a learning-rate scheduler.
        ValueError: the optimizer has not stepped, or does not hold one of ``H``'s parameters.
    """
    kind = _kind(optimizer)
    ops, layout, names, params = _model_params(H, wrt)
    groups = _groups(optimizer)
    missing = [n for n in names if id(params[n]) not in groups]
    if missing:
        raise ValueError(
            f"the optimizer does not hold the parameter(s) {', '.join(missing[:4])} of the operator (it was built "
            "for other tensors, or the model was copied after): build the operator with wrt= naming the "
            "parameters the optimizer trains, or the optimizer over the model's own parameters"
        )
    parts, steps = {}, set()
    for n in names:
        p = params[n]
        state = optimizer.state.get(p, {})
        parts[n] = _diagonal(kind, p, groups[id(p)], state, n)
        if state and "step" in state:
            steps.add(_step(state))
    settings = {"optimizer": kind, "steps": sorted(steps),
                "groups": [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "amsgrad", "centered",
                                                                  "momentum", "alpha", "lr_decay")}
                           for g in optimizer.param_groups]}
    return DiagonalPreconditioner(layout.flatten(parts, ops), ops, layout=layout, optimizer=kind, settings=settings)


def stability_threshold(optimizer: torch.optim.Optimizer, *, group: int | None = None) -> float:
    """The stability threshold of a torch.optim optimizer at its current learning rate.

    On a quadratic, gradient descent is stable while the top eigenvalue of ``P^{-1} H`` (``P``
    from :func:`preconditioner`; the identity for SGD) stays below it:

    * SGD: ``2 / lr``; with momentum ``(2 + 2 momentum) / ((1 - dampening) lr)``; Nesterov
      ``(2 + 2 momentum) / ((1 + 2 momentum) lr)`` (Cohen et al. 2021, ICLR; derivation in
      :func:`specops.preconditioner.stability_threshold`);
    * Adam / AdamW: ``(2 + 2 beta1) / ((1 - beta1) lr)``, 38 / lr at beta1 = 0.9 (Cohen et al.
      2022, arXiv:2207.14484); weight decay is not included (L2 decay adds to ``H``);
    * RMSprop: ``2 / lr``, with momentum ``(2 + 2 momentum) / lr``;
    * Adagrad: ``2 / lr_t`` at the next step's decayed rate ``lr_t = lr / (1 + t lr_decay)`` after ``t`` steps.

    The learning rate is the one the optimizer holds now (a scheduler writes the next step's
    rate into ``param_groups``), so call it after ``scheduler.step()``.

    Args:
        optimizer: as for :func:`preconditioner`.
        group: the index of one parameter group, when groups differ in learning rate or momentum.

    Returns:
        The threshold.

    Raises:
        ValueError: groups with different learning rates or momenta and no ``group=``.
        TypeError: an unknown optimizer, or a scheduler.
    """
    kind = _kind(optimizer)
    groups = optimizer.param_groups if group is None else [optimizer.param_groups[group]]
    keys = {"SGD": ("lr", "momentum", "dampening", "nesterov"), "RMSprop": ("lr", "momentum"),
            "Adagrad": ("lr", "lr_decay")}.get(kind, ("lr", "betas"))
    g = one_setting(list(groups), keys, kind, "Pass group=i for one group's threshold.")
    lr = float(g["lr"])
    if kind == "SGD":
        return _threshold(lr, momentum=g["momentum"], dampening=g["dampening"], nesterov=g["nesterov"])
    if kind == "RMSprop":
        return _threshold(lr, momentum=g["momentum"])
    if kind == "Adagrad":
        steps = {_step(optimizer.state[p]) for grp in groups for p in grp["params"] if optimizer.state.get(p)}
        t = max(steps) if steps else 0.0  # the next step is t + 1: its rate is lr / (1 + t lr_decay)
        return _threshold(lr / (1 + t * g["lr_decay"]))
    beta1 = g["betas"][0]
    return _threshold(lr, momentum=beta1, dampening=beta1)
