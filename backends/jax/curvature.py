"""Gauss-Newton and Fisher operators of a JAX model: ``J^T M J`` with ``M`` in output space.

The output-space matrices ``M`` (closed forms for optax's losses, autodiff otherwise)
and the operators' scaffolding are the core's (:mod:`specops.output_space`,
:mod:`specops.curvature`); this module supplies JAX's primitives and the compiled
product ``jit(vmap(vjp(M jvp)))``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specops.curvature import CurvaturePrimitives, FisherEstimator, curvature_operator, fisher_curvature
from specops.model import ModelOperator

from .adapter import JaxAdapter


def _loss_spec(loss_fn: Any, reduction: str = "mean") -> Any:
    """The :class:`~specops.output_space.LossSpec` of an optax loss specops reads exactly, or None.

    optax's losses are per sample or per position (classes on the last axis) or per
    entry; :func:`ggn` reduces them: a sum over each sample's values, then
    ``reduction`` over samples (``"mean"``: weight ``1/N`` for every term of a sample).
    """
    from specops.output_space import LossSpec

    try:
        import optax
    except ImportError:  # pragma: no cover - optax is optional
        return None
    known = {
        "softmax_cross_entropy_with_integer_labels": ("categorical", 1.0),
        "softmax_cross_entropy": ("categorical", 1.0),
        "sigmoid_binary_cross_entropy": ("bernoulli", 1.0),
        "squared_error": ("gaussian", 2.0),
        "l2_loss": ("gaussian", 1.0),
    }
    hit = next((v for k, v in known.items() if getattr(optax, k, None) is loss_fn), None)
    reduce = "samples" if reduction == "mean" else "sum"
    return None if hit is None else LossSpec(hit[0], -1, reduce, factor=hit[1])


_JAX_KNOWN_LOSSES = ("optax.softmax_cross_entropy_with_integer_labels or optax.softmax_cross_entropy "
                     "(categorical over the last axis), optax.sigmoid_binary_cross_entropy (Bernoulli), "
                     "optax.squared_error or optax.l2_loss (Gaussian), passed as loss_fn itself (per-sample "
                     "values, reduced by ggn/fisher)")


def _reduced_loss(loss_fn: Callable[..., Any], reduction: str) -> Callable[[Any, Any], Any]:
    """``loss_fn(outputs, targets)`` as a scalar.

    Per-sample or per-entry values are summed over each sample's entries, then averaged
    (``"mean"``) or summed over samples.
    """
    def scalar(outputs: Any, targets: Any) -> Any:
        value = loss_fn(outputs, targets)
        if jnp.ndim(value) == 0:
            return value
        per_sample = jnp.sum(jnp.reshape(value, (jnp.shape(value)[0], -1)), axis=1)
        return jnp.mean(per_sample) if reduction == "mean" else jnp.sum(per_sample)

    return scalar


def _output_ops() -> Any:
    """The JAX primitives of :class:`specops.output_space.OutputOps`."""
    from specops.output_space import OutputOps

    return OutputOps(
        softmax=lambda x, axis: jax.nn.softmax(x, axis=axis),
        sigmoid=jax.nn.sigmoid,
        sum=lambda x, axes: jnp.sum(x, axis=axes, keepdims=True),
        onehot_max=lambda x, axis: (x == jnp.max(x, axis=axis, keepdims=True)).astype(x.dtype),
        less=lambda x, y: (x < y).astype(y.dtype),
        numel=lambda x: x.size,
        grad=lambda loss, out: jax.grad(loss)(out),
        hvp=lambda loss, out, Z: jax.jvp(jax.grad(loss), (out,), (Z,))[1],
        asarray=lambda host, like: jnp.asarray(host, dtype=like.dtype),
        host=lambda x: np.asarray(x, dtype=np.float64),
    )


class _JaxCurvature:
    """``V -> J^T M J V`` for one batch of a :class:`JaxAdapter`, compiled once per shape."""

    def __init__(self, base: OutputsAdapter, kind: str, reduction: str, num_samples: int, seed: int,
                 datum: str = "sample", spec: Any = None) -> None:
        self.base, self.apply_fn, self.kind, self.reduction, self.datum = base, base.apply_fn, kind, reduction, datum
        self.spec = spec
        self.scalar_loss = _reduced_loss(base.loss_fn, reduction)
        self.num_samples, self.seed = num_samples, seed
        self.output_ops = _output_ops()
        self._noise: dict[int, Any] = {}
        self._block = jax.jit(self._product)

    def _output_matrix(self, out: Any, targets: Any, noise: Any) -> Callable[[Any], Any]:
        from specops.output_space import output_matrix

        return output_matrix(self.kind, self.spec, self.output_ops, out, targets,
                             lambda o: self.scalar_loss(o, targets), reduction=self.reduction, datum=self.datum,
                             noise=noise)

    def _outputs(self, inputs: Any) -> Any:
        return self.apply_fn(self.base._tree(self.base._flat, self.base._fixed), inputs)

    def validate(self, batch: Any) -> tuple[Any, float | None]:
        """Check the closed form on ``batch`` (see :func:`specops.output_space.validate`)."""
        from specops.output_space import validate

        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("ggn and fisher need batches (inputs, targets)")
        out, targets = self._outputs(batch[0]), batch[1]
        return validate(self.kind, self.spec, self.output_ops, out, targets, lambda o: self.scalar_loss(o, targets),
                        datum=self.datum, eps=float(jnp.finfo(out.dtype).eps), known=_JAX_KNOWN_LOSSES)

    def _product(self, flat: Any, fixed: Any, batch: Any, V: Any, noise: Any) -> Any:
        inputs, targets = batch

        def f(p: Any) -> Any:
            return self.apply_fn(self.base._tree(p, fixed), inputs)

        out, vjp_fn = jax.vjp(f, flat)
        M = self._output_matrix(jax.lax.stop_gradient(out), targets, noise)

        def column(v: Any) -> Any:
            return vjp_fn(M(jax.jvp(f, (flat,), (v,))[1]))[0]

        return jax.vmap(column, in_axes=1, out_axes=1)(V)

    def _draw(self, index: int, batch: Any) -> Any:
        from specops.output_space import mc_noise

        if self.kind != "mc":
            return None
        noise = self._noise.get(index)
        if noise is None:
            out = jax.eval_shape(lambda p: self.apply_fn(self.base._tree(p, self.base._fixed), batch[0]),
                                 self.base._flat)
            noise = self._noise[index] = self.base.ops.asarray(
                mc_noise(out.shape, self.spec, self.num_samples, self.seed, index))
        return noise

    def __call__(self, index: int, batch: Any, V: Any) -> Any:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("ggn and fisher need batches (inputs, targets)")
        base, c = self.base, self.base.chunk_size
        noise = self._draw(index, batch)
        blocks = [self._block(base._flat, base._fixed, tuple(batch), V[:, j:j + c], noise)
                  for j in range(0, V.shape[1], c)]
        return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def _loss_form(loss_fn: Any) -> str:
    """``"model"`` for a loss whose first parameter names the parameters or the model, else ``"outputs"``."""
    try:
        first = next(iter(inspect.signature(loss_fn).parameters), None)
    except (TypeError, ValueError):
        first = None
    return "model" if first in ("params", "model", "module", "net", "network") else "outputs"


class OutputsAdapter(JaxAdapter):
    """The Hessian adapter of ``loss_fn(apply_fn(params, inputs), targets)``, reduced over samples.

    The base of :func:`ggn` and :func:`fisher` (and of :func:`specops.curvature.curvature_like`
    on their operators): its ``loss_fn`` is the loss of the outputs, its ``apply_fn`` the
    model, and its products those of the Hessian of their composition.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``, pure and traceable.
        loss_fn: ``loss_fn(outputs, targets)``: a scalar, or per-sample / per-entry values.
        reduction: ``"mean"`` or ``"sum"``: how per-sample values are reduced over samples.
        params: as for :class:`JaxAdapter`.
        wrt: as for :class:`JaxAdapter`.
        dtype: as for :class:`JaxAdapter`.
        chunk_size: as for :class:`JaxAdapter`.

    Raises:
        TypeError: ``apply_fn`` or ``loss_fn`` not callable.
    """

    def __init__(self, apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], reduction: str, params: Any, *,
                 wrt: Any = None, dtype: Any = None, chunk_size: int = 16) -> None:
        if not (callable(apply_fn) and callable(loss_fn)):
            raise TypeError("ggn and fisher take apply_fn(params, inputs) -> outputs and loss_fn(outputs, targets)")
        scalar = _reduced_loss(loss_fn, reduction)

        def loss(p: Any, batch: Any) -> Any:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"ggn and fisher need batches (inputs, targets), got {type(batch).__name__}")
            return scalar(apply_fn(p, batch[0]), batch[1])

        super().__init__(loss, params, wrt=wrt, dtype=dtype, chunk_size=chunk_size)
        # what the core reads (specops.curvature): the loss of the outputs and its form
        self.apply_fn, self.loss_fn, self.reduction = apply_fn, loss_fn, reduction
        self.loss_form = _loss_form(loss_fn)

    def subset(self, names: list[str]) -> OutputsAdapter:
        return OutputsAdapter(self.apply_fn, self.loss_fn, self.reduction, self.params, wrt=list(names),
                              chunk_size=self.chunk_size)

    def curvature_primitives(self) -> CurvaturePrimitives:
        """JAX's :class:`~specops.curvature.CurvaturePrimitives`, optax's losses read for this reduction.

        optax's per-sample values are reduced by the adapter (:func:`_reduced_loss`), so
        their spec depends on ``reduction`` as well as on the loss.
        """
        return dataclasses.replace(PRIMITIVES, loss_spec=lambda loss_fn: _loss_spec(loss_fn, self.reduction))


PRIMITIVES = CurvaturePrimitives(
    form_hint="pass apply_fn(params, inputs) and loss_fn(outputs, targets), e.g. "
              "optax.softmax_cross_entropy_with_integer_labels",
    engine="jit(vmap(vjp(M jvp)))",
    loss_reduction=lambda loss_fn: None,  # optax's losses are plain functions: reduction= decides
    loss_spec=lambda loss_fn: _loss_spec(loss_fn),  # reduction="mean"; an adapter reads its own
    product=_JaxCurvature,
    reduction_eps=lambda adapter: float(np.finfo(adapter.ops.dtype).eps),
)


def _curvature(curvature: Any, apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], params: Any, data: Any,
               *, wrt: Any, reduction: str | None, comm: Any, check_deterministic: bool, dtype: Any,
               chunk_size: int, **options: Any) -> ModelOperator:
    """The core's construction (:func:`specops.curvature.curvature_operator`) on an :class:`OutputsAdapter`."""
    base = OutputsAdapter(apply_fn, loss_fn, PRIMITIVES.reduction(loss_fn, reduction), params, wrt=wrt,
                          dtype=dtype, chunk_size=chunk_size)
    return curvature_operator(base, curvature, data, reduction=reduction, comm=comm,
                              check_deterministic=check_deterministic, **options)


def ggn(apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], params: Any, data: Any, *, wrt: Any = None,
        reduction: str | None = None, comm: Any = None, check_deterministic: bool = True, dtype: Any = None,
        chunk_size: int = 16) -> ModelOperator:
    """The generalized Gauss-Newton matrix ``J^T (d^2 L/df^2) J`` over ``data``.

    The Gauss-Newton split needs the model and the loss apart: ``apply_fn(params, inputs)``
    gives the outputs ``f`` (a Flax ``model.apply``, an Equinox call, any function), and
    ``loss_fn(outputs, targets)`` the loss. A scalar loss is used as is; a per-sample or
    per-entry one (optax's losses) is summed over each sample's entries and reduced over
    samples by ``reduction``. Products are one ``jvp`` and one ``vjp`` through
    ``apply_fn``, vectorized over k columns and compiled once; the output Hessian is in
    closed form for optax's softmax cross-entropy and squared-error losses and by
    autodiff otherwise.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``, pure and traceable.
        loss_fn: ``loss_fn(outputs, targets)``: a scalar, or per-sample / per-entry values.
        params: as for :func:`hessian`.
        data: as for :func:`hessian`; every batch is a pair ``(inputs, targets)``.
        wrt: as for :func:`hessian`.
        reduction: as for :func:`hessian`.
        comm: as for :func:`hessian`.
        check_deterministic: as for :func:`hessian`.
        dtype: as for :func:`hessian`.
        chunk_size: as for :func:`hessian`.

    Returns:
        A :class:`specops.ModelOperator` (``G.adapter.kind == "ggn"``).

    Raises:
        ValueError: a ``loss_fn(params, batch)`` (the loss must be a function of the
            outputs alone). As :func:`hessian` otherwise.
    """
    return _curvature("ggn", apply_fn, loss_fn, params, data, wrt=wrt, reduction=reduction, comm=comm,
                      check_deterministic=check_deterministic, dtype=dtype, chunk_size=chunk_size)


def fisher(apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], params: Any, data: Any, *,
           estimator: FisherEstimator = "empirical", num_samples: int = 1, seed: int = 0, wrt: Any = None,
           reduction: str | None = None, comm: Any = None, check_deterministic: bool = True, dtype: Any = None,
           chunk_size: int = 16, datum: str = "sample") -> ModelOperator:
    """The empirical (``estimator="empirical"``) or Monte-Carlo (``estimator="mc"``) Fisher over ``data``.

    Arguments as for :func:`ggn`; see ``specops.backends.torch.fisher`` for the
    definitions. ``estimator="mc"`` needs one of optax's cross-entropy or squared-error
    losses as ``loss_fn`` (its likelihood); the labels are drawn once per batch from
    ``seed``, the same noise as on the other backends.

    Args:
        estimator: ``"empirical"`` or ``"mc"``.
        num_samples: sampled labels per sample for ``estimator="mc"``.
        seed: the seed of the sampled labels.
        apply_fn: as for :func:`ggn`.
        loss_fn: as for :func:`ggn`.
        params: as for :func:`ggn`.
        data: as for :func:`ggn`.
        wrt: as for :func:`ggn`.
        reduction: as for :func:`ggn`.
        comm: as for :func:`ggn`.
        check_deterministic: as for :func:`ggn`.
        dtype: as for :func:`ggn`.
        chunk_size: as for :func:`ggn`.
        datum: of ``estimator="empirical"``: ``"sample"`` (default) or ``"term"`` (each loss
            term one datum: each position of a cross-entropy's last axis, each row of the last
            axis of a squared error; needs one of the optax losses specops reads). See
            ``docs/curvature.md``.

    Returns:
        A :class:`specops.ModelOperator` (``F.adapter.kind`` is ``estimator``).

    Raises:
        ValueError: ``estimator="mc"`` with a loss whose likelihood is not known; a bad
            ``estimator``, ``num_samples`` or ``seed``.
    """
    return _curvature(fisher_curvature(estimator), apply_fn, loss_fn, params, data, wrt=wrt, reduction=reduction,
                      comm=comm, check_deterministic=check_deterministic, dtype=dtype, chunk_size=chunk_size,
                      num_samples=num_samples, seed=seed, datum=datum)
