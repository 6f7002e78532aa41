"""The adapter of a TensorFlow model and loss: loss and gradient per batch, the construction checks' primitives."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from specops import batches
from specops.checks import identity
from specops.layout import ParamLayout
from specops.model import NonDeterministicError, resolve_loss_form

from .engines import ENGINES, Traced, _Engines
from .ops import TFOps
from .params import _resolve_variables, _tf_variable
from .random_layers import RANDOM_LAYERS, _describe, _random_layers

if TYPE_CHECKING:
    from specops.curvature import CurvaturePrimitives


#: how this backend calls a loss of the outputs (Keras' order; for messages)
_CALL = "loss_fn(targets, outputs)"


class TFAdapter(_Engines):
    """The per-batch functions for a TensorFlow model and loss, traced once.

    Args:
        model: a Keras model or layer, a ``tf.Module``, or any callable; used as is
            (Keras calls it in inference mode unless your loss passes ``training=True``).
        loss_fn: ``loss_fn(targets, outputs)`` in the Keras order (a ``keras.losses``
            object works as is), applied to ``model(inputs)`` for batches
            ``(inputs, targets)`` or dicts with ``"labels"`` (the other entries are the
            inputs, passed as one dict; a dict output gives its ``"logits"``); or
            ``loss_fn(model, batch)`` for any batch; or ``None``: the model's own
            ``"loss"`` output, given the whole batch.
        wrt: ``None`` (the model's trainable variables), or names / glob
            patterns, variables, Keras layers, alone or in a list.
        loss_form: ``"outputs"``, ``"model"`` or ``"auto"`` (``"model"`` when the
            first parameter of ``loss_fn`` is named model, module, net or network).
        chunk_size: columns per vectorized product of ``engine="forward_over_reverse"``
            (``"double_backward"`` runs a block's columns in one loop).
        random_layers: ``"error"`` or ``"fixed"`` (see the module docstring).
        engine: one of :data:`ENGINES` (see the module docstring); ``"auto"`` is
            ``"double_backward"``.

    Raises:
        TypeError: a variable that is not floating, or variables of mixed dtypes.
        ValueError: an unknown ``engine`` or ``random_layers``, a bad ``chunk_size``.
    """

    ops: TFOps

    def __init__(self, model: Any, loss_fn: Callable[..., Any], *, wrt: Any = None, loss_form: str = "auto",
                 chunk_size: int = 16, random_layers: str = "error", engine: str = "auto") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.requested_engine = engine
        self.engine = "double_backward" if engine == "auto" else engine
        if random_layers not in RANDOM_LAYERS:
            raise ValueError(f"random_layers must be one of {RANDOM_LAYERS}, got {random_layers!r}")
        self.random_layers = random_layers
        self._random = _random_layers(model)
        # the seed generators' states at construction, restored before every call with "fixed"
        self._seed_states = [(g.state, tf.identity(g.state.value)) for g in
                             (getattr(layer, "seed_generator", None) for layer in self._random) if g is not None]
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.model, self.loss_fn, self.chunk_size = model, loss_fn, int(chunk_size)
        self.loss_form = resolve_loss_form(loss_fn, loss_form)
        named = _resolve_variables(model, wrt)
        self._vars = [_tf_variable(v) for v in named.values()]
        bad = [f"{n!r} ({v.dtype.name})" for n, v in zip(named, self._vars) if not v.dtype.is_floating]
        if bad:
            raise TypeError(
                f"only floating variables can be differentiated, but the selection has {', '.join(bad)}; "
                "leave them out with wrt=[...]"
            )
        dtypes = {v.dtype.name for v in self._vars}
        if len(dtypes) > 1:
            raise TypeError(
                f"the selected variables mix dtypes {sorted(dtypes)}; build the model in one dtype "
                "(e.g. keras.config.set_floatx('float64') before creating it)"
            )
        self.ops = TFOps(self._vars[0].dtype if self._vars else np.float32,
                         self._vars[0].device if self._vars else "CPU:0")
        self.layout = ParamLayout(list(named), [tuple(v.shape) for v in self._vars])
        self.num_traces = 0  # traces of the product functions (their Python bodies run only then)
        self._loss = Traced(self._scalar_loss)
        self._grad = Traced(self._flat_gradient)
        self._init_engines()

    def as_params(self, v: Any) -> list:
        """``v`` (n,) or (n, k) as a list matching ``model.trainable_variables``.

        The selected variables come from ``v`` (with a leading axis of length k for a
        block; the others are zeros), or the list is over the selected variables for a
        model without ``trainable_variables``.
        """
        pieces = list(self.unflatten(v).values())
        model_vars = [_tf_variable(x) for x in (getattr(self.model, "trainable_variables", None) or [])]
        mine = {id(var): piece for var, piece in zip(self._vars, pieces)}
        if not model_vars or not all(id(var) in {id(m) for m in model_vars} for var in self._vars):
            return pieces
        lead = () if len(v.shape) == 1 else (int(v.shape[1]),)
        return [mine.get(id(var), tf.zeros(lead + tuple(var.shape), self.ops.tf_dtype)) for var in model_vars]

    # --- traced functions -----------------------------------------------------------
    def _scalar_loss(self, batch: Any) -> Any:
        if self.loss_fn is None:
            value = batches.own_loss(self.model(batch), _CALL)
        elif self.loss_form == "model":
            value = self.loss_fn(self.model, batch)
        else:
            inputs, targets = batches.split(batch, _CALL)
            outputs = batches.logits(self.model(inputs), _CALL)
            try:
                value = self.loss_fn(targets, outputs)
            except TypeError as e:
                raise batches.loss_call_error(_CALL, outputs, e) from e
        batches.check_not_outputs(value)
        value = tf.convert_to_tensor(value)
        if value.shape.rank != 0:
            raise ValueError(
                f"the loss function must return a scalar, got shape {tuple(value.shape)}; reduce it "
                "over the batch (a keras.losses object with its default reduction, or tf.reduce_mean; "
                "tf.reduce_sum with reduction='sum')"
            )
        if value.dtype != self.ops.tf_dtype:
            raise TypeError(
                f"the loss is {value.dtype.name} but the variables are {self.ops.dtype.name}; compute it "
                f"in {self.ops.dtype.name} (Keras losses take dtype='{self.ops.dtype.name}', or call "
                f"keras.config.set_floatx('{self.ops.dtype.name}') before building the model and loss)"
            )
        return value

    def _gradients(self, batch: Any) -> Any:
        with tf.GradientTape() as tape:
            value = self._scalar_loss(batch)
        grads = tape.gradient(value, self._vars)
        unused = [n for n, g in zip(self.layout.names, grads) if g is None]
        if unused:
            raise ValueError(
                f"the loss does not depend on the variables {', '.join(map(repr, unused))}; leave them "
                "out with wrt=[...] (names, glob patterns or layers the loss uses)"
            )
        # embeddings' gradients are IndexedSlices, which forward-mode accumulators do not take
        return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]

    def _flat_gradient(self, batch: Any) -> Any:
        return self._flatten(self._gradients(batch))

    # --- ModelAdapter -----------------------------------------------------------------
    def _prepare(self, batch: Any) -> Any:
        """Tensors on the variables' device; floating ones in their dtype."""
        def convert(x):
            if isinstance(x, (str, bytes)) or x is None:
                return x
            t = tf.convert_to_tensor(x)
            return tf.cast(t, self.ops.tf_dtype) if t.dtype.is_floating else t

        with tf.device(self.ops.device):
            return tf.nest.map_structure(convert, batch)

    def batch_size(self, batch: Any) -> int:
        return batches.batch_size(tf.nest.flatten(batch))

    def _fix_randomness(self) -> None:
        if self.random_layers == "fixed":
            for state, value in self._seed_states:
                state.assign(value)

    def check_random_forward(self, batch: Any) -> None:
        """Raise if two evaluations of ``batch``'s loss differ (a random forward pass)."""
        first, second = self.loss(batch), self.loss(batch)
        rtol = 1e-5 if self.ops.dtype == np.float32 else 1e-12
        if abs(first - second) <= rtol * max(abs(first), abs(second)) or not np.isfinite(first):
            return
        layers = ", ".join(_describe(layer) for layer in self._random[:4]) or "none found"
        if self.random_layers == "fixed":
            raise NonDeterministicError(
                f"random_layers='fixed' could not fix the random numbers of the forward pass (the first "
                f"batch's loss is {first!r}, then {second!r}): only Keras layers' seed generators are "
                f"reset (random layers: {layers}); random numbers from tf.random.* or a global generator "
                "are drawn anew each call. Call the model with training=False"
            )
        raise NonDeterministicError(
            f"the forward pass is random: two evaluations of the first batch's loss give {first!r} and "
            f"{second!r}. Random layers: {layers}; the loss calls the model with training=True, which "
            "runs them, so the loss has no fixed Hessian. Call the model with training=False (the "
            "default of model(x)), or pass random_layers='fixed' to keep one fixed random mask"
        )

    def loss(self, batch: Any, delta: Any = None) -> float:
        self._fix_randomness()
        batch = self._prepare(batch)
        if delta is None:
            return float(self._loss(batch))
        saved = [tf.identity(v) for v in self._vars]
        try:
            for var, d in zip(self._vars, self._unflatten(delta)):
                var.assign_add(d)
            return float(self._loss(batch))
        finally:
            for var, value in zip(self._vars, saved):
                var.assign(value)

    # --- primitives of the core's engine check (specops.checks) -----------------------
    @property
    def cross_check_error(self) -> float | None:
        """The construction check's relative difference from finite differences (None: not run)."""
        check = self.engine_check
        return None if check is None else check.disagreement

    def gradient_at(self, batch: Any, delta: Any) -> Any:
        saved = [tf.identity(v) for v in self._vars]
        try:
            for var, value, d in zip(self._vars, saved, self._unflatten(delta)):
                var.assign(value + d)
            return self.gradient(batch)
        finally:
            for var, value in zip(self._vars, saved):
                var.assign(value)

    def verdict_key(self, batch: Any) -> tuple[Any, Any] | None:
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in tf.nest.flatten(batch) if hasattr(x, "shape"))
        key = (identity(self.loss_fn), self.loss_form, tuple(self.layout.names), self.ops.dtype.name,
               self.requested_engine, self.random_layers, shapes)
        return self.model, key

    def gradient(self, batch: Any) -> Any:
        self._fix_randomness()
        return self._grad(self._prepare(batch))

    def params_vector(self) -> Any:
        return self._flatten([tf.identity(v) for v in self._vars])

    def subset(self, names: list[str]) -> TFAdapter:
        chosen = [self._vars[self.layout.names.index(n)] for n in names]
        sub = TFAdapter(self.model, self.loss_fn, wrt=chosen, loss_form=self.loss_form,
                        chunk_size=self.chunk_size, random_layers=self.random_layers, engine=self.engine)
        sub._seed_states = self._seed_states
        sub.layout = ParamLayout(list(names), [self.layout.shapes[n] for n in names])
        return sub

    def curvature_primitives(self) -> CurvaturePrimitives:
        """The TensorFlow primitives of GGN and Fisher operators (:mod:`specops.curvature`)."""
        from .curvature import PRIMITIVES

        return PRIMITIVES

    def determinism_hints(self) -> list[str]:
        return [
            "the loss calls the model with training=True (dropout, batch statistics)",
            ("a tf.data.Dataset that reshuffles each iteration (shuffle(..., reshuffle_each_iteration="
             "False) or no shuffle) or random augmentation"),
        ]

