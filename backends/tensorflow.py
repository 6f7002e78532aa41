"""The TensorFlow backend: loss Hessians of Keras models and of callables over ``tf.Variable`` s.

Two Hessian-vector product engines (``engine=``):

- ``"double_backward"`` (the default, ``"auto"``): reverse-over-reverse. A persistent
  ``tf.GradientTape`` records the gradient ``g``; column ``v`` is
  ``outer.gradient(g, variables, output_gradients=v)``. The forward and gradient passes
  run once per block, its columns in a ``tf.map_fn`` loop inside the traced function,
  so one trace serves every number of columns and tracing costs about two gradients'
  worth of graph building (13 s before the first product of a Keras MobileNetV3Small,
  against 52 s for ``"forward_over_reverse"``).
- ``"forward_over_reverse"``: a ``tf.autodiff.ForwardAccumulator`` carrying the tangent
  around the tape that computes the gradient, so ``acc.jvp(gradient) = H v``; the
  columns of a block are vectorized by ``tf.vectorized_map`` (``chunk_size`` at a time).
  Fastest per column on small models; the vectorization is slow to trace on large
  graphs (minutes for a MobileNetV3Small).
- ``"finite_difference"``: central differences of gradients
  (:func:`specops.checks.finite_difference_products`), for operations whose second
  derivatives TensorFlow gets wrong; ``"auto"`` switches to it, with a warning, when the
  construction check (:func:`specops.checks.check_engine`) finds the engine wrong.

Every product, gradient and loss is a ``tf.function`` traced once per batch structure:
the first call traces with the leading (batch) dimension and the column count left
unknown, so an unequal last batch or a new number of columns reuses the trace (one
trace for single vectors, one for blocks; ``H.adapter.num_traces`` counts them). A
model that needs a static batch size is traced for each batch shape instead.

Transformers: a dict batch's ``"labels"`` are the targets of ``loss_fn(targets,
outputs)`` and its other entries the model's inputs (one dict); a dict output (or one
with ``.logits``) gives the loss its ``"logits"``; ``loss_fn=None`` takes the model's own
``"loss"``. The same rules as the PyTorch backend's, in the Keras argument order.

Parameters are named by Keras 3 variable paths (``"sequential/dense/kernel"``), or by
``tf.Variable.name`` without ``":0"`` (repeated names get ``_1``, ``_2``, ...). Select
blocks with those names or glob patterns (``"sequential/dense/*"``).

Random layers (``random_layers=``): Keras runs dropout and noise layers only when the
model is called with ``training=True`` (a loss ``loss_fn(model, batch)`` that passes it).
Such a forward pass has no fixed Hessian, so by default (``"error"``) the operator raises
:class:`specops.NonDeterministicError` at construction when two evaluations of the first
batch's loss differ, naming the model's random layers. ``"fixed"`` opts in to one fixed
mask: the state of every layer's ``SeedGenerator`` is reset to the value it had at
construction before each loss, gradient and product, so every call draws the same
random numbers (batches of one shape share the mask). Randomness from outside Keras'
seed generators (``tf.random.*``) cannot be fixed and raises in both modes.

Second derivatives of normalization: ``tf.nn.moments`` (behind Keras' LayerNormalization,
GroupNormalization and BatchNormalization in training mode) takes the variance around
``stop_gradient(mean)``, which keeps the gradient exact and drops a term of the second
derivative (a tiny Keras GPT-2: products 17% off, top eigenvalues 3-7% low). While a product
is traced, ``tf.nn.moments`` is the same statistics without the ``stop_gradient``.

The variables are never changed by a product. ``loss_at(delta)`` assigns
``theta + delta``, evaluates, and assigns the saved values back (bit for bit), also
when the loss raises.
"""

from __future__ import annotations


import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from specops.checks import finite_difference_products, identity, machine_epsilon
from specops.layout import ParamLayout, select_names
from specops.model import (
    ModelAdapter, ModelOperator, NonDeterministicError, common_batch_size, renamed, resolve_loss_form,
)
from specops.operator import MatrixOperator, check_dense_symmetric
from specops.ops import VectorOps



def _device_name(device: str) -> str:
    spec = tf.DeviceSpec.from_string(device or "/device:CPU:0")
    return f"{spec.device_type or 'CPU'}:{spec.device_index or 0}"


class TFOps(VectorOps):
    """Vector operations on TensorFlow tensors of one dtype on one device.

    Args:
        dtype: float32 or float64 (a ``tf.DType`` or NumPy dtype).
        device: a TensorFlow device name (``"CPU:0"``, ``"GPU:1"``).
    """

    name = "tensorflow"

    def __init__(self, dtype: Any = np.float64, device: str = "CPU:0") -> None:
        super().__init__(tf.as_dtype(dtype).as_numpy_dtype, _device_name(device))
        self.tf_dtype = tf.as_dtype(self.dtype)

    def is_native(self, x: Any) -> bool:
        return isinstance(x, tf.Tensor)

    def asarray(self, x: Any) -> Any:
        with tf.device(self.device):
            if isinstance(x, (tf.Tensor, tf.Variable)):
                return tf.identity(tf.cast(x, self.tf_dtype))
            return tf.convert_to_tensor(np.asarray(x, dtype=self.dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(x, dtype=np.float64)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        with tf.device(self.device):
            return tf.zeros(shape, dtype=self.tf_dtype)

    def concat(self, arrays: Any, axis: int) -> Any:
        return tf.concat(list(arrays), axis=axis)

    def inner(self, X: Any, Y: Any) -> Any:
        return tf.linalg.matmul(X, Y, transpose_a=True)

    def combine(self, X: Any, C: Any) -> Any:
        return tf.linalg.matmul(X, self.asarray(C))

    def column_norms(self, X: Any) -> np.ndarray:
        return np.asarray(tf.norm(X, axis=0), dtype=np.float64)

    def qr(self, X: Any) -> tuple[Any, Any]:
        return tf.linalg.qr(X, full_matrices=False)

    def all_finite(self, X: Any) -> bool:
        return bool(tf.reduce_all(tf.math.is_finite(X)))

    def einsum(self, spec: str, *arrays: Any) -> Any:
        return tf.einsum(spec, *(self.asarray(a) for a in arrays))

    def reshape(self, x: Any, shape: Any) -> Any:
        return tf.reshape(x, tuple(shape))

    def transpose(self, X: Any) -> Any:
        return tf.transpose(X)


def matrix_operator(x: Any, symmetric: bool | None = None) -> MatrixOperator:
    """A dense TensorFlow matrix as an operator whose products stay in TensorFlow.

    Args:
        x: a square ``tf.Tensor`` or variable; float32 stays float32, anything else
            becomes float64.
        symmetric: as for :func:`specops.aslinearoperator`.

    Raises:
        ValueError: a non-square, non-finite or (with ``symmetric=None``) non-symmetric matrix.
    """
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"specops operators are square; got shape {tuple(x.shape)}")
    ops = TFOps(np.float32 if x.dtype == tf.float32 else np.float64, x.device)
    x = ops.asarray(x)
    host = ops.to_numpy(x)
    if not np.isfinite(host).all():
        raise ValueError("the matrix has NaN or infinite entries")
    if symmetric is None:
        check_dense_symmetric(host, "TensorFlow matrix")
    return MatrixOperator(x, ops, symmetric=symmetric is not False)


# --- variables --------------------------------------------------------------------------
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


RANDOM_LAYERS = ("error", "fixed")
_RANDOM_NAME_PARTS = ("Dropout", "Noise", "Random")


def _layers(model: Any) -> list:
    """The model and every layer nested in it (Keras), or ``[]`` for other callables."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=True, recursive=True))
    return []


def _random_layers(model: Any) -> list:
    """Keras layers that draw random numbers when called with ``training=True``."""
    return [layer for layer in _layers(model)
            if getattr(layer, "seed_generator", None) is not None
            or any(part in type(layer).__name__ for part in _RANDOM_NAME_PARTS)]


def _describe(layer: Any) -> str:
    rate = next((getattr(layer, a) for a in ("rate", "stddev") if hasattr(layer, a)), None)
    return f"{layer.name} ({type(layer).__name__}" + ("" if rate is None else f", {rate:g}") + ")"


def _batch_size(batch: Any) -> int:
    return common_batch_size(tf.nest.flatten(batch))


def _moments(x: Any, axes: Any, shift: Any = None, keepdims: bool = False, name: Any = None) -> tuple[Any, Any]:
    """``tf.nn.moments`` differentiable twice: the variance of ``x - mean``.

    TensorFlow's takes the variance around ``stop_gradient(mean)``: the gradient is the same
    (the variance's derivative in the mean is zero at the mean), the second derivative is not.
    """
    y = tf.cast(x, tf.float32) if x.dtype == tf.float16 else x
    mean = tf.reduce_mean(y, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(y, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    if x.dtype == tf.float16:
        mean, variance = tf.cast(mean, x.dtype), tf.cast(variance, x.dtype)
    return mean, variance


@contextlib.contextmanager
def _twice_differentiable() -> Iterator[None]:
    """``tf.nn.moments`` as :func:`_moments` (the Python body of a traced function runs only while tracing)."""
    original = tf.nn.moments
    tf.nn.moments = _moments
    try:
        yield
    finally:
        tf.nn.moments = original


def _second_order(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced under :func:`_twice_differentiable`."""
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with _twice_differentiable():
            return fn(*args, **kwargs)

    return traced


def _batch_spec(batch: Any, relaxed: bool) -> Any:
    """``batch`` with every tensor replaced by its spec, the leading dimension unknown if ``relaxed``."""
    def spec(x):
        if not isinstance(x, tf.Tensor):
            return x
        shape = x.shape.as_list()
        return tf.TensorSpec([None] + shape[1:] if relaxed and shape else shape, x.dtype)

    return tf.nest.map_structure(spec, batch)


def _split(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch for ``loss_fn(targets, outputs)``."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise TypeError(
                f"with loss_fn(targets, outputs), a dict batch needs 'labels' (the targets; the other entries "
                f"are the model's inputs, passed to it as one dict), got keys {sorted(batch)}; or write "
                "loss_fn(model, batch)"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            "with loss_fn(targets, outputs) every batch must be a pair (inputs, targets) or a dict with "
            f"'labels', got {type(batch).__name__}; for other batches write the loss as loss_fn(model, batch) "
            "and pass loss_form='model'"
        )
    return batch[0], batch[1]


def _describe_output(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with keys {', '.join(map(str, obj))}"
    if isinstance(obj, tf.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _logits(outputs: Any) -> Any:
    """What ``loss_fn(targets, outputs)`` gets: ``outputs['logits']`` (or ``.logits``) of a dict output."""
    if isinstance(outputs, tf.Tensor) or not (isinstance(outputs, dict) or hasattr(outputs, "logits")):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
    if logits is None:
        raise TypeError(
            f"the model returns {_describe_output(outputs)}; specops applies loss_fn(targets, outputs) to its "
            "'logits', which it has not: write the loss as loss_fn(model, batch)"
        )
    return logits


def _own_loss(outputs: Any) -> Any:
    """``outputs['loss']`` (or ``.loss``) for ``loss_fn=None``."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        raise TypeError(
            f"loss_fn=None takes the loss the model returns given the whole batch (labels included), but it "
            f"returned {_describe_output(outputs)} without 'loss'; pass loss_fn(targets, outputs), applied to "
            "the outputs' 'logits'"
        )
    return loss


ENGINES = ("auto", "double_backward", "forward_over_reverse", "finite_difference")


class TFAdapter(ModelAdapter):
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
        self._traced: set[tuple[str, str]] = set()  # (function, batch spec) traced
        self._static: set[str] = set()  # functions traced per batch shape
        self._loss = tf.function(self._scalar_loss, reduce_retracing=True)
        self._grad = tf.function(self._flat_gradient, reduce_retracing=True)
        forward = self.engine == "forward_over_reverse"
        self._hvp = tf.function(self._hvp_vectorized if forward else self._hvp_loop, reduce_retracing=True)
        self._hvp1 = tf.function(self._hvp_single if forward else self._hvp_single_backward,
                                 reduce_retracing=True)

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
            value = _own_loss(self.model(batch))
        elif self.loss_form == "model":
            value = self.loss_fn(self.model, batch)
        else:
            inputs, targets = _split(batch)
            outputs = _logits(self.model(inputs))
            try:
                value = self.loss_fn(targets, outputs)
            except TypeError as e:
                raise TypeError(
                    f"loss_fn(targets, outputs) failed: {e}. specops called it with the targets and the "
                    f"model's outputs ({_describe_output(outputs)}), in the Keras order; if it is written as "
                    "loss_fn(model, batch), name its first parameter `model` or pass loss_form='model'"
                ) from e
        if isinstance(value, dict) or hasattr(value, "logits"):
            raise TypeError(
                f"the loss function returned the model's outputs ({_describe_output(value)}), not a scalar: "
                "return outputs['loss'], or a loss of outputs['logits']"
            )
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

    def _flatten(self, tensors: Any) -> Any:
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def _flat_gradient(self, batch: Any) -> Any:
        return self._flatten(self._gradients(batch))

    def _unflatten(self, v: Any) -> list:
        return [tf.reshape(t, self.layout.shapes[n]) for t, n in zip(tf.split(v, self.layout.sizes), self.layout.names)]

    @_second_order
    def _hvp_single(self, batch: Any, v: Any) -> Any:
        """Forward-over-reverse ``H v`` for one vector (n,)."""
        self.num_traces += 1
        with tf.autodiff.ForwardAccumulator(self._vars, self._unflatten(v)) as acc:
            grads = self._gradients(batch)
        return self._flatten(acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO))

    @_second_order
    def _hvp_vectorized(self, batch: Any, V: Any) -> Any:
        """Forward-over-reverse ``H V``, the columns of V (n, k) vectorized."""
        self.num_traces += 1

        def column(v):
            with tf.autodiff.ForwardAccumulator(self._vars, self._unflatten(v)) as acc:
                grads = self._gradients(batch)
            return self._flatten(acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO))

        return tf.transpose(tf.vectorized_map(column, tf.transpose(V)))

    @_second_order
    def _hvp_single_backward(self, batch: Any, v: Any) -> Any:
        """Reverse-over-reverse ``H v``: the gradient of ``<g, v>``."""
        self.num_traces += 1
        with tf.GradientTape() as outer:
            g = self._flatten(self._gradients(batch))
            gv = tf.tensordot(g, v, 1)
        return self._flatten(outer.gradient(gv, self._vars, unconnected_gradients=tf.UnconnectedGradients.ZERO))

    @_second_order
    def _hvp_loop(self, batch: Any, V: Any) -> Any:
        """Reverse-over-reverse ``H V``: one gradient pass, then the columns in a loop."""
        self.num_traces += 1
        with tf.GradientTape(persistent=True) as outer:
            g = self._flatten(self._gradients(batch))

        def column(v):
            return self._flatten(outer.gradient(g, self._vars, output_gradients=v,
                                                unconnected_gradients=tf.UnconnectedGradients.ZERO))

        columns = tf.map_fn(column, tf.transpose(V), parallel_iterations=1,
                            fn_output_signature=tf.TensorSpec([self.layout.num_params], self.ops.tf_dtype))
        return tf.transpose(columns)

    def _call(self, name: str, batch: Any, *vectors: Any) -> Any:
        """The traced function ``self.<name>`` at ``(batch, *vectors)``.

        Each function is traced once for an unknown batch size and column count, and
        later batches and blocks of any size reuse that trace (``tf.function``
        dispatches to the more general one). A function that cannot be traced so (a
        model or loss that needs a static batch size) is replaced by one traced once
        per batch shape (the column count still unknown).
        """
        fn = getattr(self, name)
        static = name in self._static
        spec = _batch_spec(batch, relaxed=not static)
        key = (name, repr(spec))
        if key not in self._traced:
            self._traced.add(key)
            vector_specs = [tf.TensorSpec([self.layout.num_params] + [None] * (len(v.shape) - 1), v.dtype)
                            for v in vectors]
            try:
                fn.get_concrete_function(spec, *vector_specs)
            except (TypeError, ValueError):
                if static:
                    raise
                self._static.add(name)
                setattr(self, name, tf.function(fn.python_function))
                return self._call(name, batch, *vectors)
        return fn(batch, *vectors)

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
        return _batch_size(batch)

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
            return float(self._call("_loss", batch))
        saved = [tf.identity(v) for v in self._vars]
        try:
            for var, d in zip(self._vars, self._unflatten(delta)):
                var.assign_add(d)
            return float(self._call("_loss", batch))
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

    def check_product(self, batch: Any, V: Any) -> Any:
        return self.hvp(0, batch, V)

    def use_finite_differences(self) -> None:
        self.engine = "finite_difference"

    def verdict_key(self, batch: Any) -> tuple[Any, Any] | None:
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in tf.nest.flatten(batch) if hasattr(x, "shape"))
        key = (identity(self.loss_fn), self.loss_form, tuple(self.layout.names), self.ops.dtype.name,
               self.requested_engine, self.random_layers, shapes)
        return self.model, key

    def _finite_difference(self, batch: Any, V: Any) -> Any:
        theta = self.ops.to_numpy(self.params_vector())
        scale = max(1.0, float(np.sqrt(np.mean(theta ** 2))))
        return finite_difference_products(lambda d: self.gradient_at(batch, d), V, self.ops,
                                          eps=machine_epsilon(self.ops.dtype), scale=scale)[0]

    def gradient(self, batch: Any) -> Any:
        self._fix_randomness()
        return self._call("_grad", self._prepare(batch))

    def hvp_vector(self, index: int, batch: Any, v: Any) -> Any:
        if self.engine == "finite_difference":
            return self._finite_difference(batch, v[:, None])[:, 0]
        self._fix_randomness()
        return self._call("_hvp1", self._prepare(batch), v)

    def hvp(self, index: int, batch: Any, V: Any) -> Any:
        if self.engine == "finite_difference":
            return self._finite_difference(batch, V)
        if V.shape[1] == 1:
            return self.hvp_vector(index, batch, V[:, 0])[:, None]
        batch = self._prepare(batch)
        c = V.shape[1] if self.engine == "double_backward" else self.chunk_size
        blocks = []
        for j in range(0, V.shape[1], c):
            self._fix_randomness()  # the same random mask for every chunk
            blocks.append(self._call("_hvp", batch, V[:, j : j + c]))
        return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=1)

    def params_vector(self) -> Any:
        return self._flatten([tf.identity(v) for v in self._vars])

    def subset(self, names: list[str]) -> TFAdapter:
        chosen = [self._vars[self.layout.names.index(n)] for n in names]
        sub = TFAdapter(self.model, self.loss_fn, wrt=chosen, loss_form=self.loss_form,
                        chunk_size=self.chunk_size, random_layers=self.random_layers, engine=self.engine)
        sub._seed_states = self._seed_states
        sub.layout = ParamLayout(list(names), [self.layout.shapes[n] for n in names])
        return sub

    def determinism_hints(self) -> list[str]:
        return [
            "the loss calls the model with training=True (dropout, batch statistics)",
            ("a tf.data.Dataset that reshuffles each iteration (shuffle(..., reshuffle_each_iteration="
             "False) or no shuffle) or random augmentation"),
        ]


def hessian(model: Any, loss_fn: Callable[..., Any], data: Any, *, wrt: Any = None, reduction: str | None = None,
            comm: Any = None, check_deterministic: bool = True, loss_form: str = "auto", chunk_size: int = 16,
            random_layers: str = "error", engine: str = "auto", variables: Any = None,
            cross_check: bool = True) -> ModelOperator:
    """The Hessian of a TensorFlow model's loss over data, as a specops operator on flat tensors.

    Args:
        model: a Keras model or layer, a ``tf.Module`` or any callable over
            ``tf.Variable`` s; called as is (Keras layers run in inference mode unless
            the loss passes ``training=True``).
        loss_fn: ``loss_fn(targets, outputs)`` (Keras order; e.g.
            ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``) applied to
            ``model(inputs)`` for batches ``(inputs, targets)`` or dicts with ``"labels"``
            (the other entries are the inputs, passed as one dict; a dict output gives
            its ``"logits"``); or ``loss_fn(model, batch)`` for any batch; or ``None``:
            the ``"loss"`` the model returns given the whole batch. Must return a scalar.
        data: one batch (a tuple or dict) or a re-iterable of batches (a list, a
            ``tf.data.Dataset`` that does not reshuffle). Floating tensors are cast to
            the variables' dtype.
        wrt: ``None`` (the model's trainable variables), or names / glob
            patterns (``"sequential/dense_1/*"``), variables, Keras layers, alone or in
            a list. Needed for plain callables without ``trainable_variables``.
        reduction: ``"mean"`` if ``loss_fn`` averages over a batch, ``"sum"`` if it sums.
            ``None`` (default): a Keras loss's own (``"sum_over_batch_size"`` is a mean); a
            value that contradicts it raises. For a plain function (default ``"mean"``) the
            first batch's loss is compared with its halves' at construction: one that
            behaves as the other reduction raises.
        comm: ``None`` or a communicator; each rank passes its own shard of the data.
        check_deterministic: check every batch's loss is finite and that two identical
            products agree.
        loss_form: ``"outputs"``, ``"model"`` or ``"auto"`` (see :class:`TFAdapter`).
        chunk_size: columns per vectorized product of ``engine="forward_over_reverse"``.
        random_layers: ``"error"`` (default): a random forward pass (dropout or noise
            layers called with ``training=True``) raises
            :class:`specops.NonDeterministicError` naming the layers; ``"fixed"``: one
            fixed random mask, the Keras seed generators reset before every call.
        engine: ``"auto"`` (``"double_backward"``: reverse-over-reverse, cheap to trace,
            columns in a loop), ``"forward_over_reverse"`` (columns vectorized: faster
            per column on small models, minutes to trace on large ones) or
            ``"finite_difference"`` (central differences of gradients).
        variables: the former name of ``wrt`` (deprecated).
        cross_check: check the engine on the first batch at construction: symmetry on two
            probes and central differences of gradients at two steps
            (:func:`specops.checks.check_engine`). An engine they find wrong is replaced by
            ``"finite_difference"`` with a warning under ``engine="auto"``, and raises when
            requested explicitly; ``H.engine_check`` holds what was measured.

    Returns:
        A :class:`specops.ModelOperator`: ``H @ v`` takes and returns ``tf.Tensor`` s;
        ``H.as_params(v)`` gives a list matching ``model.trainable_variables``.

    Raises:
        ValueError: a loss that is not a scalar; variables the loss does not use; a
            selection that matches nothing.
        TypeError: integer variables or mixed dtypes.
        specops.NonFiniteError: a non-finite loss (naming the batch).
        specops.NonDeterministicError: a random forward pass (see ``random_layers``).
    """
    wrt = renamed("hessian", "wrt", wrt, "variables", variables)
    adapter = TFAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, chunk_size=chunk_size,
                        random_layers=random_layers, engine=engine)
    reduction = _reduction(loss_fn, reduction)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic,
                         cross_check=cross_check,
                         first_batch_check=lambda first: _check_reduction(adapter, loss_fn, reduction, first))


# --- curvature: Gauss-Newton and Fisher (see specops.curvature, specops.output_space) ---
_KERAS_MEAN = ("sum_over_batch_size", "mean")


def _loss_reduction(loss_fn: Any) -> str | None:
    """The reduction a Keras loss states (``"mean"``, ``"sum"``, or its own word for another), or None."""
    try:
        import keras
    except ImportError:  # pragma: no cover - Keras ships with TensorFlow
        return None
    if not isinstance(loss_fn, keras.losses.Loss):
        return None
    reduction = getattr(loss_fn, "reduction", None)
    return "mean" if reduction in _KERAS_MEAN else "sum" if reduction == "sum" else str(reduction)


def _loss_spec(loss_fn: Any) -> Any:
    """The :class:`~specops.output_space.LossSpec` of a Keras loss specops reads exactly, or None.

    Keras' losses reduce over the last axis first (classes, or the mean of a squared
    error's or binary cross-entropy's entries), then ``"sum_over_batch_size"`` divides
    the sum of those values by their number: over positions for a cross-entropy, over
    every entry for the others.
    """
    from specops.output_space import LossSpec

    try:
        import keras
    except ImportError:  # pragma: no cover - Keras ships with TensorFlow
        return None
    reduction = getattr(loss_fn, "reduction", None)
    kwargs = getattr(loss_fn, "_fn_kwargs", {}) or {}
    if reduction not in _KERAS_MEAN + ("sum",) or kwargs.get("label_smoothing"):
        return None
    mean = reduction in _KERAS_MEAN
    if isinstance(loss_fn, (keras.losses.SparseCategoricalCrossentropy, keras.losses.CategoricalCrossentropy)):
        if not kwargs.get("from_logits") or kwargs.get("axis", -1) != -1 or kwargs.get("ignore_class") is not None:
            return None
        return LossSpec("categorical", -1, "positions" if mean else "sum")
    if isinstance(loss_fn, keras.losses.BinaryCrossentropy):
        if not kwargs.get("from_logits") or kwargs.get("axis", -1) != -1:
            return None
        return LossSpec("bernoulli", -1, "entries" if mean else "sum")
    if isinstance(loss_fn, keras.losses.MeanSquaredError):
        # the sum of each row's mean: (1/C) sum over entries
        return LossSpec("gaussian", -1, "entries", factor=2.0) if mean else None
    return None


_TF_KNOWN_LOSSES = ("keras.losses.SparseCategoricalCrossentropy / CategoricalCrossentropy with "
                    "from_logits=True (categorical over the last axis), keras.losses.BinaryCrossentropy with "
                    "from_logits=True (Bernoulli), keras.losses.MeanSquaredError with a mean reduction "
                    "(Gaussian); no label_smoothing or ignore_class")


def _output_ops() -> Any:
    """The TensorFlow primitives of :class:`specops.output_space.OutputOps`."""
    from specops.output_space import OutputOps

    def grad(loss: Callable[[Any], Any], out: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(out)
            value = loss(out)
        return tape.gradient(value, out, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def hvp(loss: Callable[[Any], Any], out: Any, Z: Any) -> Any:
        with tf.autodiff.ForwardAccumulator(out, Z) as acc:
            g = grad(loss, out)
        return acc.jvp(g, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return OutputOps(
        softmax=lambda x, axis: tf.nn.softmax(x, axis=axis),
        sigmoid=tf.sigmoid,
        sum=lambda x, axes: tf.reduce_sum(x, axis=list(axes), keepdims=True),
        onehot_max=lambda x, axis: tf.cast(tf.equal(x, tf.reduce_max(x, axis=axis, keepdims=True)), x.dtype),
        less=lambda x, y: tf.cast(x < y, y.dtype),
        numel=lambda x: tf.cast(tf.size(x), x.dtype),
        grad=grad,
        hvp=hvp,
        asarray=lambda host, like: tf.constant(host, dtype=like.dtype),
        host=lambda x: np.asarray(x, dtype=np.float64),
    )


class _TFCurvature:
    """``V -> J^T M J V`` for one batch of a :class:`TFAdapter`, traced once per shape."""

    def __init__(self, base: TFAdapter, kind: str, reduction: str, num_samples: int, seed: int,
                 datum: str = "sample", spec: Any = None) -> None:
        self.base, self.kind, self.reduction, self.datum = base, kind, reduction, datum
        self.num_samples, self.seed = num_samples, seed
        self.spec = spec
        self.output_ops = _output_ops()
        self._noise: dict[int, Any] = {}
        self._block = tf.function(self._product, reduce_retracing=True)

    def _output_matrix(self, out: Any, targets: Any, noise: Any) -> Callable[[Any], Any]:
        from specops.output_space import output_matrix

        # shapes are dynamic: reduce_retracing traces one program for every batch size
        loss_fn = self.base.loss_fn
        return output_matrix(self.kind, self.spec, self.output_ops, out, targets, lambda o: loss_fn(targets, o),
                             reduction=self.reduction, datum=self.datum, noise=noise)

    def validate(self, batch: Any) -> tuple[Any, float | None]:
        """Check the closed form on ``batch`` (see :func:`specops.output_space.validate`)."""
        from specops.output_space import validate

        inputs, targets = self._pair(batch)
        out, loss_fn = self.base.model(inputs), self.base.loss_fn
        return validate(self.kind, self.spec, self.output_ops, out, targets, lambda o: loss_fn(targets, o),
                        datum=self.datum, eps=float(np.finfo(out.dtype.as_numpy_dtype).eps), known=_TF_KNOWN_LOSSES)

    def _product(self, batch: Any, V: Any, noise: Any) -> Any:
        base = self.base
        inputs, targets = batch
        with tf.GradientTape(persistent=True) as tape:
            out = base.model(inputs)
        M = self._output_matrix(tf.stop_gradient(out), targets, noise)

        def column(v):
            with tf.autodiff.ForwardAccumulator(base._vars, base._unflatten(v)) as acc:
                o = base.model(inputs)
            Z = acc.jvp(o, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            grads = tape.gradient(out, base._vars, output_gradients=M(Z),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return base._flatten(grads)

        return tf.transpose(tf.vectorized_map(column, tf.transpose(V)))

    def _draw(self, index: int, batch: Any) -> Any:
        from specops.output_space import mc_noise

        if self.kind != "mc":
            return None
        noise = self._noise.get(index)
        if noise is None:
            shape = tuple(self.base.model(batch[0]).shape)
            noise = self._noise[index] = self.base.ops.asarray(
                mc_noise(shape, self.spec, self.num_samples, self.seed, index))
        return noise

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        batch = self.base._prepare(batch)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("ggn and fisher need batches (inputs, targets)")
        return tuple(batch)

    def __call__(self, index: int, batch: Any, V: Any) -> Any:
        base, c = self.base, self.base.chunk_size
        batch = self._pair(batch)
        noise = self._draw(index, batch)
        blocks = []
        for j in range(0, V.shape[1], c):
            base._fix_randomness()
            blocks.append(self._block(batch, V[:, j:j + c], noise))
        return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=1)


def _check_form(base: Any, kind: str) -> None:
    """Raise for a loss that is not a function of the outputs alone (no Gauss-Newton split)."""
    from specops.curvature import model_form_error

    if base.loss_fn is None or base.loss_form != "outputs":
        what = "ggn(...)" if kind == "ggn" else f"fisher(kind={kind!r})"
        raise model_form_error(what, "loss_fn(targets, outputs), e.g. "
                                         "keras.losses.SparseCategoricalCrossentropy(from_logits=True)")


def _curvature_adapter(base: TFAdapter, kind: str, reduction: str, num_samples: int = 1,
                       seed: int = 0, datum: str = "sample", first_batch: Any = None) -> ModelAdapter:
    """``base`` (a Hessian adapter) with its product replaced by that of ``kind``; the input checks."""
    from specops.curvature import check_num_samples, validated_adapter
    from specops.output_space import check_datum
    from specops.random import check_seed

    _check_form(base, kind)
    num_samples, seed, datum = check_num_samples(num_samples), check_seed(seed), check_datum(datum)
    return validated_adapter(
        base, kind, lambda b, spec: _TFCurvature(b, kind, reduction, num_samples, seed, datum, spec),  # type: ignore[arg-type]  # b is base, a TFAdapter
        _loss_spec(base.loss_fn), first_batch, "tf.function(vectorized_map(J^T M J))",
        num_samples=num_samples, datum=datum)


def _reduction(loss_fn: Any, reduction: str | None) -> str:
    """The loss's reduction: the one it states, or ``reduction`` (default ``"mean"``) for a plain function."""
    from specops.reduction import loss_name, resolve

    return resolve(reduction, _loss_reduction(loss_fn) if loss_fn is not None else None, loss_name(loss_fn))


def _check_reduction(adapter: Any, loss_fn: Any, reduction: str, first_batch: Any) -> None:
    """For a plain function, check on ``first_batch`` that it reduces as ``reduction`` says."""
    from specops.reduction import check_plain

    check_plain(adapter, loss_fn, _loss_reduction(loss_fn), reduction, first_batch, float(np.finfo(adapter.ops.dtype).eps))


def _first_batch(data: Any) -> Any:
    for batch in ModelOperator._batches_of(data):
        return batch
    return None


def _curvature_operator(kind: str, model: Any, loss_fn: Callable[..., Any], data: Any, *, wrt: Any,
                        reduction: str | None, comm: Any, check_deterministic: bool, loss_form: str, chunk_size: int,
                        random_layers: str, num_samples: int = 1, seed: int = 0,
                        datum: str = "sample") -> ModelOperator:
    base = TFAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, chunk_size=chunk_size,
                     random_layers=random_layers)
    _check_form(base, kind)
    reduction = _reduction(loss_fn, reduction)
    first = _first_batch(data)
    if first is not None:
        base.check_random_forward(first)
    _check_reduction(base, loss_fn, reduction, first)
    adapter = _curvature_adapter(base, kind, reduction, num_samples, seed, datum, first)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic)


def curvature_like(H: ModelOperator, kind: str = "ggn", *, num_samples: int = 1, seed: int = 0,
                   check_deterministic: bool = False, datum: str = "sample") -> ModelOperator:
    """The GGN or a Fisher of the same model, loss, data, variables and reduction as ``H``.

    Args:
        H: an operator from :func:`hessian`, :func:`ggn` or :func:`fisher`.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        num_samples: of ``kind="mc"``, as for :func:`fisher`.
        seed: of ``kind="mc"``, as for :func:`fisher`.
        check_deterministic: run the construction checks again (``H`` passed them).
        datum: of ``kind="empirical"``, as for :func:`fisher`.

    Returns:
        A :class:`specops.ModelOperator` sharing ``H``'s data and communicator.

    Raises:
        TypeError: ``H`` is not a TensorFlow model operator. As :func:`fisher` otherwise.
    """
    from specops.curvature import KINDS, base_adapter, check_kind

    base = base_adapter(H, TFAdapter)
    adapter = _curvature_adapter(base, check_kind(kind, KINDS), H.reduction, num_samples, seed, datum,
                                 _first_batch(H._data))
    return ModelOperator(adapter, H._data, reduction=H.reduction, comm=H.comm,
                         check_deterministic=check_deterministic)


def ggn(model: Any, loss_fn: Callable[..., Any], data: Any, *, wrt: Any = None, reduction: str | None = None,
        comm: Any = None, check_deterministic: bool = True, loss_form: str = "auto", chunk_size: int = 16,
        random_layers: str = "error") -> ModelOperator:
    """The generalized Gauss-Newton matrix ``J^T (d^2 L/df^2) J`` of a TensorFlow model's loss.

    Products are one forward-mode JVP (``ForwardAccumulator``) and one VJP
    (``GradientTape``) through the model, vectorized over k columns; the output Hessian is
    in closed form for Keras' softmax cross-entropy losses (``from_logits=True``) and
    ``MeanSquaredError``, by autodiff otherwise.

    Args:
        model: as for :func:`hessian`.
        loss_fn: as for :func:`hessian`; ``loss_fn(targets, outputs)`` (Keras order).
        data: as for :func:`hessian`.
        reduction: as for :func:`hessian`.
        comm: as for :func:`hessian`.
        check_deterministic: as for :func:`hessian`.
        chunk_size: as for :func:`hessian`.
        random_layers: as for :func:`hessian`.
        wrt: the variable selection, as for :func:`hessian`.
        loss_form: ``"auto"`` or ``"outputs"``; ``"model"`` is refused.

    Returns:
        A :class:`specops.ModelOperator` (``G.adapter.kind == "ggn"``).

    Raises:
        ValueError: a loss that is not a function of the outputs alone. As :func:`hessian` otherwise.
    """
    return _curvature_operator("ggn", model, loss_fn, data, wrt=wrt,
                               reduction=reduction,
                               comm=comm, check_deterministic=check_deterministic, loss_form=loss_form,
                               chunk_size=chunk_size, random_layers=random_layers)


def fisher(model: Any, loss_fn: Callable[..., Any], data: Any, *, kind: str = "empirical", num_samples: int = 1,
           seed: int = 0, wrt: Any = None, reduction: str | None = None, comm: Any = None,
           check_deterministic: bool = True, loss_form: str = "auto", chunk_size: int = 16,
           random_layers: str = "error", datum: str = "sample") -> ModelOperator:
    """The empirical (``kind="empirical"``) or Monte-Carlo (``kind="mc"``) Fisher of a TensorFlow model.

    See ``specops.backends.torch.fisher`` for the definitions; the Monte-Carlo labels are
    the same noise as on the other backends for the same ``seed``.

    Args:
        kind: ``"empirical"`` or ``"mc"`` (needs a Keras loss whose likelihood is known).
        num_samples: sampled labels per sample for ``kind="mc"``.
        seed: the seed of the sampled labels.
        model: as for :func:`ggn`.
        loss_fn: as for :func:`ggn`.
        data: as for :func:`ggn`.
        wrt: as for :func:`ggn`.
        reduction: as for :func:`ggn`.
        comm: as for :func:`ggn`.
        check_deterministic: as for :func:`ggn`.
        loss_form: as for :func:`ggn`.
        chunk_size: as for :func:`ggn`.
        random_layers: as for :func:`ggn`.
        datum: of ``kind="empirical"``: ``"sample"`` (default) or ``"term"`` (each loss term
            one datum: each position of a cross-entropy's last axis, each row of the last
            axis otherwise; needs a Keras loss specops reads). See ``docs/curvature.md``.

    Returns:
        A :class:`specops.ModelOperator` (``F.adapter.kind`` is ``kind``).

    Raises:
        ValueError: ``kind="mc"`` with a loss whose likelihood is not known; a bad ``kind``,
            ``num_samples`` or ``seed``; a loss that is not a function of the outputs alone.
    """
    from specops.curvature import check_kind

    return _curvature_operator(check_kind(kind), model, loss_fn, data,
                               wrt=wrt,
                               reduction=reduction, comm=comm, check_deterministic=check_deterministic,
                               loss_form=loss_form, chunk_size=chunk_size, random_layers=random_layers,
                               num_samples=num_samples, seed=seed, datum=datum)


from specops.backends.tensorflow_optim import preconditioner, stability_threshold  # noqa: E402,F401 (Keras optimizer state, issue 25)
