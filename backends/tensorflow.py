"""The TensorFlow backend: loss Hessians of Keras models and of callables over ``tf.Variable`` s.

The Hessian-vector product is forward-over-reverse: a
``tf.autodiff.ForwardAccumulator`` carrying the tangent ``v`` around the
``tf.GradientTape`` that computes the gradient, so ``acc.jvp(gradient) = H v``. The
columns of a block are mapped by ``tf.vectorized_map`` (the gradient pass does not
depend on the column and is computed once), and the whole product is one
``tf.function`` built once per operator (``reduce_retracing=True``: an unequal last
batch or a new number of columns traces once more, never once per product).

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

The variables are never changed by a product. ``loss_at(delta)`` assigns
``theta + delta``, evaluates, and assigns the saved values back (bit for bit), also
when the loss raises.
"""

from __future__ import annotations


from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

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


class TFAdapter(ModelAdapter):
    """The per-batch functions for a TensorFlow model and loss, traced once.

    Args:
        model: a Keras model or layer, a ``tf.Module``, or any callable; used as is
            (Keras calls it in inference mode unless your loss passes ``training=True``).
        loss_fn: ``loss_fn(targets, outputs)`` in the Keras order (a ``keras.losses``
            object works as is), applied to ``model(inputs)`` for batches
            ``(inputs, targets)``; or ``loss_fn(model, batch)`` for any batch.
        wrt: ``None`` (the model's trainable variables), or names / glob
            patterns, variables, Keras layers, alone or in a list.
        loss_form: ``"outputs"``, ``"model"`` or ``"auto"`` (``"model"`` when the
            first parameter of ``loss_fn`` is named model, module, net or network).
        chunk_size: columns per vectorized product.
        random_layers: ``"error"`` or ``"fixed"`` (see the module docstring).

    Raises:
        TypeError: a variable that is not floating, or variables of mixed dtypes.
    """

    engine = "tensorflow: tf.function(vectorized_map(ForwardAccumulator over GradientTape))"
    ops: TFOps

    def __init__(self, model: Any, loss_fn: Callable[..., Any], *, wrt: Any = None, loss_form: str = "auto",
                 chunk_size: int = 16, random_layers: str = "error") -> None:
        if random_layers not in RANDOM_LAYERS:
            raise ValueError(f"random_layers must be one of {RANDOM_LAYERS}, got {random_layers!r}")
        self.random_layers = random_layers
        self._random = _random_layers(model)
        # the seed generators' states at construction, restored before every call with "fixed"
        self._seed_states = [(g.state, tf.identity(g.state.value)) for g in
                             (getattr(layer, "seed_generator", None) for layer in self._random) if g is not None]
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
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
        self.num_traces = 0
        self._loss = tf.function(self._scalar_loss, reduce_retracing=True)
        self._grad = tf.function(self._flat_gradient, reduce_retracing=True)
        self._hvp = tf.function(self._hvp_block, reduce_retracing=True)

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
        if self.loss_form == "model":
            value = self.loss_fn(self.model, batch)
        else:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    "with loss_fn(targets, outputs) every batch must be a pair (inputs, targets); for "
                    "other batches write the loss as loss_fn(model, batch) and pass loss_form='model'"
                )
            inputs, targets = batch
            value = self.loss_fn(targets, self.model(inputs))
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
        return grads

    def _flatten(self, tensors: Any) -> Any:
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def _flat_gradient(self, batch: Any) -> Any:
        return self._flatten(self._gradients(batch))

    def _unflatten(self, v: Any) -> list:
        return [tf.reshape(t, self.layout.shapes[n]) for t, n in zip(tf.split(v, self.layout.sizes), self.layout.names)]

    def _hvp_block(self, batch: Any, V: Any) -> Any:
        self.num_traces += 1  # runs only while tracing: counts traces

        def column(v):
            with tf.autodiff.ForwardAccumulator(self._vars, self._unflatten(v)) as acc:
                grads = self._gradients(batch)
            return self._flatten(acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO))

        return tf.transpose(tf.vectorized_map(column, tf.transpose(V)))

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
            return float(self._loss(batch))
        saved = [tf.identity(v) for v in self._vars]
        try:
            for var, d in zip(self._vars, self._unflatten(delta)):
                var.assign_add(d)
            return float(self._loss(batch))
        finally:
            for var, value in zip(self._vars, saved):
                var.assign(value)

    def gradient(self, batch: Any) -> Any:
        self._fix_randomness()
        return self._grad(self._prepare(batch))

    def hvp(self, index: int, batch: Any, V: Any) -> Any:
        batch, c = self._prepare(batch), self.chunk_size
        if self.random_layers == "fixed" and V.shape[1] > c:
            return tf.concat([self.hvp(index, batch, V[:, j : j + c]) for j in range(0, V.shape[1], c)], axis=1)
        self._fix_randomness()
        if V.shape[1] <= c:
            return self._hvp(batch, V)
        return tf.concat([self._hvp(batch, V[:, j : j + c]) for j in range(0, V.shape[1], c)], axis=1)

    def params_vector(self) -> Any:
        return self._flatten([tf.identity(v) for v in self._vars])

    def subset(self, names: list[str]) -> TFAdapter:
        chosen = [self._vars[self.layout.names.index(n)] for n in names]
        sub = TFAdapter(self.model, self.loss_fn, wrt=chosen, loss_form=self.loss_form,
                        chunk_size=self.chunk_size, random_layers=self.random_layers)
        sub._seed_states = self._seed_states
        sub.layout = ParamLayout(list(names), [self.layout.shapes[n] for n in names])
        return sub

    def determinism_hints(self) -> list[str]:
        return [
            "the loss calls the model with training=True (dropout, batch statistics)",
            ("a tf.data.Dataset that reshuffles each iteration (shuffle(..., reshuffle_each_iteration="
             "False) or no shuffle) or random augmentation"),
        ]


def hessian(model: Any, loss_fn: Callable[..., Any], data: Any, *, wrt: Any = None, reduction: str = "mean",
            comm: Any = None, check_deterministic: bool = True, loss_form: str = "auto", chunk_size: int = 16,
            random_layers: str = "error", variables: Any = None) -> ModelOperator:
    """The Hessian of a TensorFlow model's loss over data, as a specops operator on flat tensors.

    Args:
        model: a Keras model or layer, a ``tf.Module`` or any callable over
            ``tf.Variable`` s; called as is (Keras layers run in inference mode unless
            the loss passes ``training=True``).
        loss_fn: ``loss_fn(targets, outputs)`` (Keras order; e.g.
            ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``) applied to
            ``model(inputs)`` for batches ``(inputs, targets)``; or ``loss_fn(model, batch)``
            for any batch. Must return a scalar.
        data: one batch (a tuple or dict) or a re-iterable of batches (a list, a
            ``tf.data.Dataset`` that does not reshuffle). Floating tensors are cast to
            the variables' dtype.
        wrt: ``None`` (the model's trainable variables), or names / glob
            patterns (``"sequential/dense_1/*"``), variables, Keras layers, alone or in
            a list. Needed for plain callables without ``trainable_variables``.
        reduction: ``"mean"`` if ``loss_fn`` averages over a batch, ``"sum"`` if it sums.
        comm: ``None`` or a communicator; each rank passes its own shard of the data.
        check_deterministic: check every batch's loss is finite and that two identical
            products agree.
        loss_form: ``"outputs"``, ``"model"`` or ``"auto"`` (see :class:`TFAdapter`).
        chunk_size: columns per vectorized product.
        random_layers: ``"error"`` (default): a random forward pass (dropout or noise
            layers called with ``training=True``) raises
            :class:`specops.NonDeterministicError` naming the layers; ``"fixed"``: one
            fixed random mask, the Keras seed generators reset before every call.
        variables: the former name of ``wrt`` (deprecated).

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
                        random_layers=random_layers)
    for batch in ModelOperator._batches_of(data):
        adapter.check_random_forward(batch)
        break
    return ModelOperator(adapter, data, reduction=reduction, comm=comm,
                         check_deterministic=check_deterministic)


# --- curvature: Gauss-Newton and Fisher (see specops.curvature) -------------------------
def _output_loss(loss_fn: Any) -> Any:
    """The :class:`~specops.curvature.OutputLoss` of a Keras loss specops recognizes, or None."""
    from specops.curvature import OutputLoss

    try:
        import keras
    except ImportError:  # pragma: no cover - Keras ships with TensorFlow
        return None
    reduction = getattr(loss_fn, "reduction", None)
    kwargs = getattr(loss_fn, "_fn_kwargs", {}) or {}
    if isinstance(loss_fn, (keras.losses.SparseCategoricalCrossentropy, keras.losses.CategoricalCrossentropy)):
        if not kwargs.get("from_logits") or kwargs.get("axis", -1) != -1 or kwargs.get("ignore_class") is not None:
            return None
        if reduction in ("sum_over_batch_size", "mean"):
            return OutputLoss("categorical", "samples")
        return OutputLoss("categorical", "sum") if reduction == "sum" else None
    if isinstance(loss_fn, keras.losses.MeanSquaredError) and reduction in ("sum_over_batch_size", "mean"):
        return OutputLoss("gaussian", "entries", factor=2.0)
    return None


_TF_KNOWN_LOSSES = ("keras.losses.SparseCategoricalCrossentropy / CategoricalCrossentropy with "
                    "from_logits=True (categorical), keras.losses.MeanSquaredError with its default "
                    "reduction (Gaussian)")


def _per_sample_dot(R: Any, Z: Any) -> Any:
    """``<R_i, Z_i>`` over each sample's entries (leading axes of ``R`` beyond ``Z``'s are kept)."""
    lead = R.shape.rank - Z.shape.rank
    flat = tf.reshape(R * Z, tf.concat([tf.shape(R)[: lead + 1], [-1]], axis=0))
    return tf.reshape(tf.reduce_sum(flat, axis=-1), tf.concat([tf.shape(R)[: lead + 1],
                                                               [1] * (Z.shape.rank - 1)], axis=0))


class _TFCurvature:
    """``V -> J^T M J V`` for one batch of a :class:`TFAdapter`, traced once per shape."""

    def __init__(self, base: TFAdapter, kind: str, reduction: str, num_samples: int, seed: int) -> None:
        self.base, self.kind, self.reduction = base, kind, reduction
        self.num_samples, self.seed = num_samples, seed
        self.known = _output_loss(base.loss_fn)
        self._noise: dict[int, Any] = {}
        self._block = tf.function(self._product, reduce_retracing=True)

    def _output_matrix(self, out: Any, targets: Any, noise: Any) -> Callable[[Any], Any]:
        # shapes are dynamic: reduce_retracing traces one program for every batch size
        known, loss_fn = self.known, self.base.loss_fn
        N = tf.cast(tf.shape(out)[0], out.dtype)
        if self.kind == "empirical":
            with tf.GradientTape() as tape:
                tape.watch(out)
                value = loss_fn(targets, out)
            r = tape.gradient(value, out)
            scale = N if self.reduction == "mean" else 1.0  # 1 / (per-sample weight)
            return lambda Z: scale * r * _per_sample_dot(r, Z)
        if known is None:
            def hessian_product(Z):
                with tf.autodiff.ForwardAccumulator(out, Z) as acc:
                    with tf.GradientTape() as tape:
                        tape.watch(out)
                        value = loss_fn(targets, out)
                    g = tape.gradient(value, out)
                return acc.jvp(g, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return hessian_product
        weight = known.weight(N, tf.cast(tf.size(out), out.dtype))
        if known.likelihood == "categorical":
            p = tf.nn.softmax(out, axis=-1)
            if self.kind == "ggn":
                return lambda Z: weight * (p * Z - p * tf.reduce_sum(p * Z, axis=-1, keepdims=True))
            labels = tf.argmax(out[None] + noise, axis=-1)
            R = p[None] - tf.one_hot(labels, out.shape[-1], dtype=out.dtype)
        else:
            if self.kind == "ggn":
                return lambda Z: weight * Z
            R = noise
        S = tf.cast(tf.shape(R)[0], out.dtype)
        return lambda Z: (weight / S) * tf.reduce_sum(R * _per_sample_dot(R, Z), axis=0)

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
        from specops.curvature import mc_noise

        if self.kind != "mc":
            return None
        noise = self._noise.get(index)
        if noise is None:
            shape = tuple(self.base.model(batch[0]).shape)
            noise = self._noise[index] = self.base.ops.asarray(
                mc_noise(shape, self.known, self.num_samples, self.seed, index))
        return noise

    def __call__(self, index: int, batch: Any, V: Any) -> Any:
        base, c = self.base, self.base.chunk_size
        batch = base._prepare(batch)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("ggn and fisher need batches (inputs, targets)")
        batch = tuple(batch)
        noise = self._draw(index, batch)
        blocks = []
        for j in range(0, V.shape[1], c):
            base._fix_randomness()
            blocks.append(self._block(batch, V[:, j:j + c], noise))
        return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=1)


def _curvature_adapter(base: TFAdapter, kind: str, reduction: str, num_samples: int = 1,
                       seed: int = 0) -> ModelAdapter:
    """``base`` (a Hessian adapter) with its product replaced by that of ``kind``; the input checks."""
    from specops.curvature import CurvatureAdapter, check_num_samples, model_form_error, \
        unknown_likelihood_error
    from specops.random import check_seed

    what = "ggn(...)" if kind == "ggn" else f"fisher(kind={kind!r})"
    if base.loss_form != "outputs":
        raise model_form_error(what, "loss_fn(targets, outputs), e.g. "
                                     "keras.losses.SparseCategoricalCrossentropy(from_logits=True)")
    known = _output_loss(base.loss_fn)
    if kind == "mc" and known is None:
        raise unknown_likelihood_error(_TF_KNOWN_LOSSES)
    num_samples, seed = check_num_samples(num_samples), check_seed(seed)
    how = {"ggn": "output Hessian " + ("in closed form" if known else "by autodiff"),
           "empirical": "per-sample output gradients", "mc": f"{num_samples} sampled label(s) per sample"}[kind]
    return CurvatureAdapter(base, lambda b: _TFCurvature(b, kind, reduction, num_samples, seed),  # type: ignore[arg-type]  # b is base, a TFAdapter
                            kind,
                            f"{kind}: tf.function(vectorized_map(J^T M J)), {how}")


def _curvature_operator(kind: str, model: Any, loss_fn: Callable[..., Any], data: Any, *, wrt: Any, reduction: str,
                        comm: Any, check_deterministic: bool, loss_form: str, chunk_size: int, random_layers: str,
                        num_samples: int = 1, seed: int = 0) -> ModelOperator:
    base = TFAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, chunk_size=chunk_size,
                     random_layers=random_layers)
    adapter = _curvature_adapter(base, kind, reduction, num_samples, seed)
    for batch in ModelOperator._batches_of(data):
        base.check_random_forward(batch)
        break
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic)


def curvature_like(H: ModelOperator, kind: str = "ggn", *, num_samples: int = 1, seed: int = 0,
                   check_deterministic: bool = False) -> ModelOperator:
    """The GGN or a Fisher of the same model, loss, data, variables and reduction as ``H``.

    Args:
        H: an operator from :func:`hessian`, :func:`ggn` or :func:`fisher`.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        num_samples: of ``kind="mc"``, as for :func:`fisher`.
        seed: of ``kind="mc"``, as for :func:`fisher`.
        check_deterministic: run the construction checks again (``H`` passed them).

    Returns:
        A :class:`specops.ModelOperator` sharing ``H``'s data and communicator.

    Raises:
        TypeError: ``H`` is not a TensorFlow model operator. As :func:`fisher` otherwise.
    """
    from specops.curvature import KINDS, base_adapter, check_kind

    base = base_adapter(H, TFAdapter)
    adapter = _curvature_adapter(base, check_kind(kind, KINDS), H.reduction, num_samples, seed)
    return ModelOperator(adapter, H._data, reduction=H.reduction, comm=H.comm,
                         check_deterministic=check_deterministic)


def ggn(model: Any, loss_fn: Callable[..., Any], data: Any, *, wrt: Any = None, reduction: str = "mean",
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
           seed: int = 0, wrt: Any = None, reduction: str = "mean", comm: Any = None,
           check_deterministic: bool = True, loss_form: str = "auto", chunk_size: int = 16,
           random_layers: str = "error") -> ModelOperator:
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
                               num_samples=num_samples, seed=seed)
