"""optax optimizer states as specops preconditioners and stability thresholds.

An optax state holds the moments but not most hyperparameters (``eps``, ``b2``, the
learning rate): :func:`preconditioner` and :func:`stability_threshold` take them as
keywords, stated in the result's ``settings``, unless the optimizer was built with
``optax.inject_hyperparams`` (then they are read from its state). The preconditioners,
as optax divides by them:

* ``adam`` / ``adamw`` (``ScaleByAdamState``): ``P = sqrt(nu / (1 - b2^count) + eps_root) + eps``;
* ``amsgrad`` (``ScaleByAmsgradState``): the same with ``nu_max``;
* ``rmsprop`` (``ScaleByRmsState``, bias-corrected ``...WithCountState``): ``sqrt(nu + eps)``
  (``eps_in_sqrt=True``, optax's default) or ``sqrt(nu) + eps``; centered
  (``ScaleByRStdDevState``): ``nu - mu^2`` in place of ``nu``;
* ``adagrad`` (``ScaleByRssState``): ``sqrt(sum_of_squares + eps)``;
* ``sgd`` (``TraceState`` or no state): the identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import tree_util

from specops.model import ModelOperator
from specops.preconditioner import DiagonalPreconditioner, unknown_optimizer
from specops.preconditioner import stability_threshold as _threshold

ADAM, AMSGRAD, RMS, STDDEV, RSS, TRACE = ("ScaleByAdamState", "ScaleByAmsgradState", "ScaleByRmsState",
                                          "ScaleByRStdDevState", "ScaleByRssState", "TraceState")
_FAMILIES = {ADAM: "adam", AMSGRAD: "amsgrad", RMS: "rmsprop", "ScaleByRmsWithCountState": "rmsprop",
             STDDEV: "rmsprop (centered)", "ScaleByRStdDevWithCountState": "rmsprop (centered)", RSS: "adagrad"}
# optax's defaults, quoted in the error when a value is missing
_DEFAULTS = {"adam": "b2=0.999, eps=1e-8, eps_root=0.0", "amsgrad": "b2=0.999, eps=1e-8, eps_root=0.0",
             "rmsprop": "decay=0.9, eps=1e-8, eps_in_sqrt=True", "rmsprop (centered)": "decay=0.9, eps=1e-8, "
             "eps_in_sqrt=True", "adagrad": "eps=1e-7", "sgd": "momentum=None, nesterov=False"}


def _states(state: Any) -> list[Any]:
    """The optax transformation states inside a (chained, injected, masked) state, in order."""
    name = type(state).__name__
    if name in _FAMILIES or name == TRACE:
        return [state]
    if name == "InjectHyperparamsState" or hasattr(state, "inner_state"):
        return _states(state.inner_state)
    if isinstance(state, (tuple, list)):
        return [s for part in state for s in _states(part)]
    return []


def _hyperparams(state: Any) -> dict:
    """The hyperparameters held by ``optax.inject_hyperparams`` states, else empty."""
    if hasattr(state, "hyperparams") and isinstance(state.hyperparams, dict):
        return {k: (float(np.asarray(v)) if np.ndim(v) == 0 else v) for k, v in state.hyperparams.items()}
    if isinstance(state, (tuple, list)):
        out: dict = {}
        for part in state:
            out.update(_hyperparams(part))
        return out
    return {}


def _family(opt_state: Any) -> tuple[str, Any, Any]:
    """``(family, the scaling state or None, the momentum TraceState or None)``."""
    if callable(getattr(opt_state, "update", None)) and callable(getattr(opt_state, "init", None)):
        raise TypeError("got an optax GradientTransformation; pass its state (opt_state = optimizer.init(params), "
                        "after the updates of training)")
    states = _states(opt_state)
    scaling = [s for s in states if type(s).__name__ in _FAMILIES]
    trace = next((s for s in states if type(s).__name__ == TRACE), None)
    if len(scaling) > 1:
        raise TypeError(f"the state chains several scalings ({[type(s).__name__ for s in scaling]}); specops reads "
                        "one; build P by hand and pass it to specops.preconditioned(H, P)")
    if scaling:
        return _FAMILIES[type(scaling[0]).__name__], scaling[0], trace
    if trace is not None or _is_empty(opt_state):
        return "sgd", None, trace
    raise unknown_optimizer(f"an optax state of {type(opt_state).__name__}", "optax")


def _is_empty(state: Any) -> bool:
    if type(state).__name__ in ("EmptyState", "ScaleByScheduleState"):
        return True
    if hasattr(state, "inner_state"):
        return _is_empty(state.inner_state)
    return isinstance(state, (tuple, list)) and all(_is_empty(s) for s in state)


def _need(values: dict, names: tuple[str, ...], family: str) -> list[float]:
    missing = [n for n in names if values.get(n) is None]
    if missing:
        raise ValueError(
            f"an optax {family} state does not hold {', '.join(missing)}: pass the values your optimizer was built "
            f"with ({', '.join(f'{n}=...' for n in missing)}; optax's defaults are {_DEFAULTS[family]}), or build "
            "it with optax.inject_hyperparams so the state holds them"
        )
    return [values[n] for n in names]


def _named_leaves(tree: Any) -> dict:
    from .params import _path_name

    return {_path_name(p): leaf for p, leaf in tree_util.tree_flatten_with_path(tree)[0]}


def preconditioner(opt_state: Any, H: ModelOperator, *, eps: float | None = None, b2: float | None = None,
                   eps_root: float | None = None, decay: float | None = None,
                   eps_in_sqrt: bool | None = None) -> DiagonalPreconditioner:
    """The diagonal preconditioner ``P`` of an optax optimizer state, in ``H``'s parameter order.

    ``P`` is what optax divides the (momentum of the) gradient by, at the state's current
    step (module docstring). optax's state does not hold ``eps``, ``b2`` (Adam's bias
    correction), ``eps_root``, ``decay`` (bias-corrected RMSprop) or ``eps_in_sqrt``: pass the
    values the optimizer was built with (an error names the missing ones and optax's
    defaults), unless the state comes from ``optax.inject_hyperparams``.

    Args:
        opt_state: the state of ``optax.adam``, ``adamw``, ``amsgrad``, ``rmsprop``, ``adagrad`` or
            ``sgd`` (a chain of them with schedules, weight decay, clipping, masks).
        H: the operator from ``specops.backends.jax.hessian`` (its ``wrt=`` selects the leaves).
        eps: the optimizer's ``eps``.
        b2: Adam's ``b2``.
        eps_root: Adam's ``eps_root``.
        decay: RMSprop's ``decay`` (needed only with ``bias_correction=True``).
        eps_in_sqrt: RMSprop's ``eps_in_sqrt``.

    Returns:
        A :class:`~specops.preconditioner.DiagonalPreconditioner`; ``settings`` states every value used.

    Raises:
        TypeError: a state specops does not read (the message says how to pass ``P`` by hand), or
            a GradientTransformation in place of its state.
        ValueError: a missing hyperparameter, a state that has not stepped, a parameter the state
            does not hold or holds with another shape.
    """
    adapter = getattr(H, "adapter", None)
    if not isinstance(H, ModelOperator) or not hasattr(getattr(adapter, "base", adapter), "params"):
        raise TypeError("pass the operator from specops.backends.jax.hessian, whose parameter order P follows")
    family, state, _ = _family(opt_state)
    given = {"eps": eps, "b2": b2, "eps_root": eps_root, "decay": decay, "eps_in_sqrt": eps_in_sqrt}
    values = {**_hyperparams(opt_state), **{k: v for k, v in given.items() if v is not None}}
    settings: dict = {"optimizer": f"optax {family}"}
    layout, ops = H.layout, H.ops
    if family == "sgd":
        return DiagonalPreconditioner(ops.asarray(np.ones(layout.num_params)), ops, layout=layout, optimizer="optax sgd",
                              settings=settings)
    count = state.count if "count" in getattr(state, "_fields", ()) else None  # a NamedTuple's .count is a method
    if count is not None and int(np.asarray(count)) == 0:
        raise ValueError("the optax state has not stepped (count = 0): read the preconditioner after an update")
    f64 = lambda tree: {k: np.asarray(v, np.float64) for k, v in _named_leaves(tree).items()}  # noqa: E731
    if family in ("adam", "amsgrad"):
        b2v, epsv = _need(values, ("b2", "eps"), family)
        root = float(values.get("eps_root") or 0.0)
        t = int(np.asarray(count))
        settings.update(count=t, b2=b2v, eps=epsv, eps_root=root)
        # optax keeps amsgrad's nu_max bias-corrected already
        corr = 1.0 if family == "amsgrad" else 1 - b2v ** t
        moments = f64(state.nu_max if family == "amsgrad" else state.nu)
        formula = {n: np.sqrt(v / corr + root) + epsv for n, v in moments.items()}
    elif family.startswith("rmsprop"):
        (epsv,) = _need(values, ("eps",), family)
        (insqrt,) = _need(values, ("eps_in_sqrt",), family)
        steps = None if count is None else int(np.asarray(count))
        d = _need(values, ("decay",), family)[0] if steps is not None else None
        settings.update(eps=epsv, eps_in_sqrt=bool(insqrt), bias_correction=steps is not None, decay=d, count=steps)
        corr = 1.0 if steps is None or d is None else 1 - d ** steps
        moments = f64(state.nu)
        if steps is None and not any(np.any(v) for v in moments.values()):
            raise ValueError("the optax rmsprop state's nu is zero everywhere: it has not stepped; read the "
                             "preconditioner after an update")
        mu = f64(state.mu) if "centered" in family else {}
        var = {n: v / corr - (mu[n] / corr) ** 2 if mu else v / corr for n, v in moments.items()}
        formula = {n: np.sqrt(v + epsv) if insqrt else np.sqrt(np.maximum(v, 0)) + epsv for n, v in var.items()}
    else:  # adagrad
        (epsv,) = _need(values, ("eps",), family)
        settings.update(eps=epsv)
        moments = f64(state.sum_of_squares)
        formula = {n: np.sqrt(v + epsv) for n, v in moments.items()}
    missing = [n for n in layout.names if n not in moments]
    if missing:
        raise ValueError(f"the optax state holds no moments for {', '.join(missing[:4])} (it holds "
                         f"{', '.join(list(moments)[:6])}): build the state with optimizer.init on the same "
                         "params pytree as the operator")
    wrong = [n for n in layout.names if tuple(np.shape(moments[n])) != layout.shapes[n]]
    if wrong:
        n = wrong[0]
        raise ValueError(f"the optax state holds {n!r} with shape {np.shape(moments[n])}, the operator "
                         f"with {layout.shapes[n]}: build the state on the same params as the operator")
    parts = {n: formula[n] for n in layout.names}
    return DiagonalPreconditioner(layout.flatten(parts, ops), ops, layout=layout, optimizer=f"optax {family}",
                          settings=settings)


def stability_threshold(opt_state: Any, *, learning_rate: float | None = None, b1: float | None = None,
                        momentum: float | None = None, nesterov: bool | None = None) -> float:
    """The stability threshold of an optax optimizer at its current learning rate.

    The optimizer's kind is read from the state, the values it does not hold from the
    keywords (or ``optax.inject_hyperparams``' state): ``(2 + 2 b1) / ((1 - b1) lr)`` for
    adam/adamw/amsgrad (Cohen et al. 2022); ``optax.nadam`` holds the same state as adam, so
    pass ``nesterov=True`` for it: ``(2 + 2 b1) / ((1 + 2 b1)(1 - b1) lr)`` (Nesterov's threshold
    at the step ``(1 - b1) lr``, 13.6 / lr at b1 = 0.9); for sgd and rmsprop ``2 / lr``, with momentum (a
    ``TraceState``) ``(2 + 2 momentum) / lr``, Nesterov ``(2 + 2 momentum) / ((1 + 2 momentum) lr)``
    (Cohen et al. 2021; :func:`specops.preconditioner.stability_threshold`); adagrad ``2 / lr``.

    Args:
        opt_state: the optimizer's state.
        learning_rate: the learning rate of the next update. With a schedule, its value now:
            ``schedule(count)``.
        b1: Adam's ``b1``.
        momentum: sgd's / rmsprop's ``momentum``.
        nesterov: whether the momentum is Nesterov's (sgd's ``nesterov=True``; ``optax.nadam``).

    Returns:
        The threshold.

    Raises:
        ValueError: a missing hyperparameter.
        TypeError: a schedule passed as the learning rate, or an unknown state.
    """
    if callable(learning_rate):
        raise TypeError("learning_rate is a schedule: pass its value now, schedule(count), where count is the "
                        "number of updates so far; the threshold is that of the next step")
    family, _, trace = _family(opt_state)
    values = {**_hyperparams(opt_state), **{k: v for k, v in (("learning_rate", learning_rate), ("b1", b1),
                                                                ("momentum", momentum), ("nesterov", nesterov))
                                            if v is not None}}
    (lr,) = _need(values, ("learning_rate",), family)
    if family in ("adam", "amsgrad"):
        (beta1,) = _need(values, ("b1",), family)
        if values.get("nesterov"):  # nadam: Nesterov momentum on the gradient scaled by 1 - b1
            return _threshold(lr * (1 - beta1), momentum=beta1, nesterov=True)
        return _threshold(lr, momentum=beta1, dampening=beta1)
    if trace is None or family == "adagrad":
        return _threshold(lr)
    m, nest = _need(values, ("momentum", "nesterov"), "sgd")
    return _threshold(lr, momentum=m, nesterov=bool(nest))
