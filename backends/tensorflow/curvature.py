"""The Gauss-Newton matrix and the Fishers of TensorFlow models (see specops.curvature, specops.output_space)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from specops.curvature import CurvaturePrimitives, FisherEstimator, curvature_operator, fisher_curvature
from specops.model import ModelOperator
from specops.output_space import LossSpec, OutputOps, mc_noise, output_matrix, validate

from .adapter import TFAdapter


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


def _loss_spec(loss_fn: Any) -> LossSpec | None:
    """The :class:`~specops.output_space.LossSpec` of a Keras loss specops reads exactly, or None.

    Keras' losses reduce over the last axis first (classes, or the mean of a squared
    error's or binary cross-entropy's entries), then ``"sum_over_batch_size"`` divides
    the sum of those values by their number: over positions for a cross-entropy, over
    every entry for the others.
    """
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


def _output_ops() -> OutputOps:
    """The TensorFlow primitives of :class:`specops.output_space.OutputOps`."""
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
        # shapes are dynamic: reduce_retracing traces one program for every batch size
        loss_fn = self.base.loss_fn
        return output_matrix(self.kind, self.spec, self.output_ops, out, targets, lambda o: loss_fn(targets, o),
                             reduction=self.reduction, datum=self.datum, noise=noise)

    def validate(self, batch: Any) -> tuple[Any, float | None]:
        """Check the closed form on ``batch`` (see :func:`specops.output_space.validate`)."""
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


PRIMITIVES = CurvaturePrimitives(
    form_hint="loss_fn(targets, outputs), e.g. keras.losses.SparseCategoricalCrossentropy(from_logits=True)",
    engine="tf.function(vectorized_map(J^T M J))",
    # the readers are looked up when called (tests replace them)
    loss_reduction=lambda loss_fn: _loss_reduction(loss_fn),
    loss_spec=lambda loss_fn: _loss_spec(loss_fn),
    product=_TFCurvature,
    reduction_eps=lambda adapter: float(np.finfo(adapter.ops.dtype).eps),
)


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
        A :class:`specops.ModelOperator` (``G.adapter.curvature == "ggn"``).

    Raises:
        ValueError: a loss that is not a function of the outputs alone. As :func:`hessian` otherwise.
    """
    base = TFAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, chunk_size=chunk_size,
                     random_layers=random_layers)
    return curvature_operator(base, "ggn", data, reduction=reduction, comm=comm,
                              check_deterministic=check_deterministic)


def fisher(model: Any, loss_fn: Callable[..., Any], data: Any, *, estimator: FisherEstimator = "empirical",
           num_samples: int = 1, seed: int = 0, wrt: Any = None, reduction: str | None = None, comm: Any = None,
           check_deterministic: bool = True, loss_form: str = "auto", chunk_size: int = 16,
           random_layers: str = "error", datum: str = "sample") -> ModelOperator:
    """The empirical (``estimator="empirical"``) or Monte-Carlo (``"mc"``) Fisher of a TensorFlow model.

    See ``specops.backends.torch.fisher`` for the definitions; the Monte-Carlo labels are
    the same noise as on the other backends for the same ``seed``.

    Args:
        estimator: ``"empirical"`` or ``"mc"`` (needs a Keras loss whose likelihood is known).
        num_samples: sampled labels per sample for ``estimator="mc"``.
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
        datum: of ``estimator="empirical"``: ``"sample"`` (default) or ``"term"`` (each loss term
            one datum: each position of a cross-entropy's last axis, each row of the last
            axis otherwise; needs a Keras loss specops reads). See ``docs/curvature.md``.

    Returns:
        A :class:`specops.ModelOperator` (``F.adapter.curvature`` is ``"empirical_fisher"`` or
        ``"mc_fisher"``).

    Raises:
        ValueError: ``estimator="mc"`` with a loss whose likelihood is not known; a bad
            ``estimator``, ``num_samples`` or ``seed``; a loss that is not a function of the
            outputs alone.
    """
    curvature = fisher_curvature(estimator)
    base = TFAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, chunk_size=chunk_size,
                     random_layers=random_layers)
    return curvature_operator(base, curvature, data, reduction=reduction, comm=comm,
                              check_deterministic=check_deterministic, num_samples=num_samples, seed=seed,
                              datum=datum)
