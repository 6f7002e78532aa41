"""Keras 3 optimizer state as specops preconditioners and stability thresholds.

Read by :func:`preconditioner` after the optimizer's last update (``iterations = t``),
with ``eps`` as Keras applies it:

* Adam / AdamW: Keras steps ``lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``,
  that is ``lr * m_hat / P`` with ``P = sqrt(v_hat) + eps / sqrt(1 - beta2^t)`` (``v_hat``
  the bias-corrected ``v``; the ``velocity_hat`` maximum with amsgrad);
* RMSprop: ``P = sqrt(v + eps)``, centered ``sqrt(v - g_avg^2 + eps)``;
* Adagrad: ``P = sqrt(accumulator + eps)``;
* SGD (with or without momentum / Nesterov): the identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from specops.model import ModelOperator
from specops.preconditioner import DiagonalPreconditioner, unknown_optimizer
from specops.preconditioner import stability_threshold as _threshold

KNOWN = ("AdamW", "Adam", "RMSprop", "Adagrad", "SGD")


def _kind(optimizer: Any) -> str:
    import keras

    if isinstance(optimizer, keras.optimizers.schedules.LearningRateSchedule):
        raise TypeError("got a learning-rate schedule, not an optimizer: pass the optimizer; specops reads its "
                        "current learning rate (the schedule's value at optimizer.iterations)")
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("keras") and cls.__name__ in KNOWN:
            return cls.__name__
    raise unknown_optimizer(type(optimizer).__name__, "keras")


def _value(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)


def preconditioner(optimizer: Any, H: ModelOperator) -> DiagonalPreconditioner:
    """The diagonal preconditioner ``P`` of a Keras 3 optimizer, in ``H``'s variable order.

    ``P`` is what the optimizer divides the (momentum of the) gradient by after its last
    update (module docstring), each variable's own slots.

    Args:
        optimizer: a ``keras.optimizers`` Adam, AdamW, RMSprop, Adagrad or SGD that has updated.
        H: the operator from ``specops.backends.tensorflow.hessian`` (its ``wrt=`` selects variables).

    Returns:
        A :class:`~specops.preconditioner.DiagonalPreconditioner`; ``settings`` states the values used.

    Raises:
        TypeError: an optimizer specops does not read (the message says how to pass ``P`` by hand),
            or a schedule.
        ValueError: the optimizer has not updated, or does not hold one of ``H``'s variables.
    """
    kind = _kind(optimizer)
    adapter: Any = getattr(H, "adapter", None)
    adapter = getattr(adapter, "base", adapter)  # a GGN / Fisher wraps the Hessian's adapter
    if not isinstance(H, ModelOperator) or not hasattr(adapter, "_vars"):
        raise TypeError("pass the operator from specops.backends.tensorflow.hessian, whose variable order P follows")
    layout, ops = H.layout, H.ops
    t = int(_value(optimizer.iterations))
    if not getattr(optimizer, "built", False) or t == 0:
        raise ValueError(f"the {kind} optimizer has not updated yet (iterations = {t}): read the preconditioner "
                         "after optimizer.apply_gradients / model.fit")
    index = {}
    for name, var in zip(layout.names, adapter._vars):
        try:
            index[name] = optimizer._get_variable_index(var)
        except KeyError:
            raise ValueError(f"the optimizer does not hold the variable {name!r} of the operator: it was built for "
                             "other variables; build the operator with wrt= naming the variables it trains") from None
    eps = float(optimizer.epsilon) if hasattr(optimizer, "epsilon") else None
    settings: dict = {"optimizer": kind, "iterations": t, "epsilon": eps}
    if kind == "SGD":
        parts = {n: np.ones(layout.shapes[n]) for n in layout.names}
    elif kind in ("Adam", "AdamW"):
        b2 = float(optimizer.beta_2)
        corr = 1 - b2 ** t
        slots = optimizer._velocity_hats if optimizer.amsgrad else optimizer._velocities
        parts = {n: np.sqrt(_value(slots[i]) / corr) + eps / np.sqrt(corr) for n, i in index.items()}
        settings.update(beta_2=b2, amsgrad=bool(optimizer.amsgrad))
    elif kind == "RMSprop":
        parts = {}
        for n, i in index.items():
            v = _value(optimizer._velocities[i])
            if optimizer.centered:
                v = v - _value(optimizer._average_gradients[i]) ** 2
            parts[n] = np.sqrt(v + eps)
        settings.update(rho=float(optimizer.rho), centered=bool(optimizer.centered))
    else:  # Adagrad
        parts = {n: np.sqrt(_value(optimizer._accumulators[i]) + eps) for n, i in index.items()}
    return DiagonalPreconditioner(layout.flatten(parts, ops), ops, layout=layout, optimizer=f"keras {kind}", settings=settings)


def stability_threshold(optimizer: Any) -> float:
    """The stability threshold of a Keras 3 optimizer at its current learning rate.

    ``(2 + 2 beta_1) / ((1 - beta_1) lr)`` for Adam/AdamW (Cohen et al. 2022); SGD ``2 / lr``,
    with momentum ``(2 + 2 momentum) / lr``, Nesterov ``(2 + 2 momentum) / ((1 + 2 momentum) lr)``;
    RMSprop ``2 / lr``, with momentum ``(2 + 2 momentum) / lr``; Adagrad ``2 / lr`` (Cohen et
    al. 2021; :func:`specops.preconditioner.stability_threshold`). With a learning-rate
    schedule ``lr`` is its value now (``optimizer.learning_rate``, the schedule at
    ``optimizer.iterations``): the rate of the next update.

    Args:
        optimizer: a Keras Adam, AdamW, RMSprop, Adagrad or SGD.

    Returns:
        The threshold.

    Raises:
        TypeError: an optimizer specops does not read, or a schedule.
    """
    kind = _kind(optimizer)
    lr = float(_value(optimizer.learning_rate))
    if kind in ("Adam", "AdamW"):
        b1 = float(optimizer.beta_1)
        return _threshold(lr, momentum=b1, dampening=b1)
    if kind == "SGD":
        return _threshold(lr, momentum=float(optimizer.momentum), nesterov=bool(optimizer.nesterov))
    if kind == "RMSprop":
        return _threshold(lr, momentum=float(optimizer.momentum))
    return _threshold(lr)
