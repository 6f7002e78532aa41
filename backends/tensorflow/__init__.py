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

from collections.abc import Callable
from typing import Any

from specops.curvature import curvature_like
from specops.model import ModelOperator

from .adapter import TFAdapter
from .curvature import PRIMITIVES, fisher, ggn
from .engines import ENGINES
from .formulas import _twice_differentiable  # noqa: F401 (tests call it)
from .ops import TFOps, matrix_operator
from .optim import preconditioner, stability_threshold
from .random_layers import RANDOM_LAYERS

# the names of the API reference (preconditioner and stability_threshold are documented with .optim)
__all__ = ["ENGINES", "RANDOM_LAYERS", "TFAdapter", "TFOps", "curvature_like", "fisher", "ggn", "hessian",
           "matrix_operator"]


def hessian(model: Any, loss_fn: Callable[..., Any], data: Any, *, wrt: Any = None, reduction: str | None = None,
            comm: Any = None, check_deterministic: bool = True, loss_form: str = "auto", chunk_size: int = 16,
            random_layers: str = "error", engine: str = "auto", cross_check: bool = True) -> ModelOperator:
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
    adapter = TFAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, chunk_size=chunk_size,
                        random_layers=random_layers, engine=engine)
    reduction = PRIMITIVES.reduction(loss_fn, reduction)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic,
                         cross_check=cross_check,
                         first_batch_check=lambda first: PRIMITIVES.check_reduction(adapter, loss_fn, reduction, first))
