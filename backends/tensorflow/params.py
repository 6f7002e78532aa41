"""Parameter selection: ``wrt=`` as names, glob patterns, variables or Keras layers -> named ``tf.Variable`` s."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from specops.layout import select_names


def _tf_variable(v: Any) -> Any:
    """The ``tf.Variable`` behind a Keras 3 variable (what the tapes must watch)."""
    if isinstance(v, tf.Variable):
        return v
    inner = getattr(v, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"expected a tf.Variable or a Keras variable, got {type(v).__name__}")


def _named(variables: Any) -> dict:
    """Unique name -> variable, in order."""
    out: dict[str, Any] = {}
    for v in variables:
        base = getattr(v, "path", None) or v.name.split(":")[0]
        name, i = base, 0
        while name in out:
            i += 1
            name = f"{base}_{i}"
        out[name] = v
    return out


def _resolve_variables(model: Any, variables: Any) -> dict:
    available = getattr(model, "trainable_variables", None)
    named = _named(available or [])
    if variables is None:
        if not named:
            raise ValueError(
                "the model has no trainable_variables; pass wrt=[...] with the tf.Variables "
                "the loss depends on"
            )
        return named
    items = variables if isinstance(variables, (list, tuple)) else [variables]
    by_id = {id(_tf_variable(v)): n for n, v in named.items()}
    chosen, loose = [], []
    for item in items:
        if isinstance(item, str):
            chosen += select_names(list(named), [item])
        elif hasattr(item, "trainable_variables") and not isinstance(item, tf.Variable):
            chosen += [by_id[id(_tf_variable(v))] for v in item.trainable_variables]
        else:
            var = _tf_variable(item)
            if id(var) in by_id:
                chosen.append(by_id[id(var)])
            else:
                loose.append(item)
    result = {n: named[n] for n in named if n in set(chosen)}
    result.update({n: v for n, v in _named(loose).items() if n not in result})
    return result
