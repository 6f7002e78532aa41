"""Output-space matrices of the GGN and the Fishers, written once for every framework.

Every curvature product of :mod:`specops.curvature` is ``J^T M J V``; this module builds
``M``, the map on one column ``Z`` of output tangents (the shape of the model's
outputs), from a handful of framework primitives (:class:`OutputOps`):

- ``ggn``: ``M = d^2 L / df^2``. In closed form when the loss is one specops reads
  exactly (:class:`LossSpec`: its likelihood, the axis of its classes, the weighting of
  its reduction, the entries it leaves out), by autodiff of the loss with respect to
  the outputs otherwise. A closed form is used only after it agreed with autodiff on
  one probe of the first batch (:func:`check_closed_form`).
- ``empirical``: ``M = (1/w) sum_d r_d r_d^T`` with ``r = dL/df`` at the true targets,
  ``r_d`` its part on datum ``d`` and ``w`` the weight of one datum's loss in ``L``.
  A datum is a sample (``datum="sample"``, ``w = 1/N`` for a mean, 1 for a sum), or a
  loss term (``datum="term"``: one position of a cross-entropy's class axis, one row of
  the last axis of a squared error or binary cross-entropy, ``w`` the loss's own
  weight of a term, curvlinops' ``EFLinearOperator``).
- ``mc``: ``M = (a/S) sum_s R_s R_s^T`` per loss term, ``R_s`` the gradient of the
  negative log-likelihood at labels drawn from the model's predictive distribution;
  ``E[M]`` is the closed-form GGN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import warnings

import numpy as np

from specops import random as _random

Array = Any
#: the loss of the outputs alone, targets bound: ``out -> scalar``
LossOfOutputs = Callable[[Array], Array]
#: The likelihoods whose output Hessians specops writes in closed form.
Likelihood = Literal["categorical", "bernoulli", "gaussian"]
LIKELIHOODS: tuple[Likelihood, ...] = get_args(Likelihood)
#: what a mean divides by: samples, positions (entries / classes), entries; or a sum
REDUCES = ("samples", "positions", "entries", "sum")
#: What one datum of the empirical Fisher is: a sample, or a loss term.
Datum = Literal["sample", "term"]
DATUMS: tuple[Datum, ...] = get_args(Datum)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A loss whose output Hessian and likelihood specops knows exactly.

    The batch loss is ``L = factor * sum_t a_t nll_t`` over the loss terms ``t`` (the
    positions along ``axis``), ``nll_t`` the negative log-likelihood of one term (unit
    variance for the Gaussian) and ``a_t = mask_t / W``, ``W`` from ``reduce``: ``N``
    samples, the number of positions (or of unmasked positions), the number of entries,
    or 1 for ``"sum"``.

    Attributes:
        likelihood: ``"categorical"`` (softmax over ``axis``), ``"bernoulli"`` (sigmoid of
            each entry) or ``"gaussian"`` (squared error).
        axis: the class axis (categorical; 1 for PyTorch, -1 for optax and Keras) or the
            axis of one term's outputs (the last one otherwise).
        reduce: one of :data:`REDUCES`.
        factor: 1 for cross-entropies and ``0.5 (f - y)^2``; 2 for ``(f - y)^2``.
        mask: ``(targets, outputs) -> mask``, 1 on the terms the loss keeps and 0 on the
            ones it leaves out (PyTorch's ``ignore_index``), in the outputs' dtype and
            broadcastable to them, or None for targets without left-out terms; or None.
    """

    likelihood: str
    axis: int
    reduce: str
    factor: float = 1.0
    mask: Callable[[Array, Array], Array | None] | None = None

    def __post_init__(self) -> None:
        if self.likelihood not in LIKELIHOODS or self.reduce not in REDUCES:
            raise ValueError(f"unknown likelihood/reduction {self.likelihood!r}/{self.reduce!r}")


@dataclasses.dataclass(frozen=True)
class OutputOps:
    """The framework primitives the output-space matrices need (one instance per backend).

    Attributes:
        softmax: ``(x, axis) -> softmax``.
        sigmoid: ``x -> sigmoid``.
        sum: ``(x, axes) -> sum`` over ``axes``, dimensions kept.
        onehot_max: ``(x, axis) -> 1.0`` where ``x`` is largest along ``axis``, else 0.
        less: ``(x, y) -> 1.0`` where ``x < y``, else 0 (in ``y``'s dtype).
        numel: ``x -> `` its number of entries, a scalar of ``x``'s dtype (or a number).
        grad: ``(loss, out) -> dL/df`` at ``out``.
        hvp: ``(loss, out, Z) -> d^2L/df^2 Z`` at ``out``.
        asarray: ``(host, like) -> `` a native array of ``like``'s dtype and device.
        host: ``x ->`` a float64 NumPy array.
    """

    softmax: Callable[[Array, int], Array]
    sigmoid: Callable[[Array], Array]
    sum: Callable[[Array, tuple[int, ...]], Array]
    onehot_max: Callable[[Array, int], Array]
    less: Callable[[Array, Array], Array]
    numel: Callable[[Array], Any]
    grad: Callable[[LossOfOutputs, Array], Array]
    hvp: Callable[[LossOfOutputs, Array, Array], Array]
    asarray: Callable[[np.ndarray, Array], Array]
    host: Callable[[Array], np.ndarray]


def check_datum(datum: Any) -> str:
    """Check the ``datum`` of an empirical Fisher.

    Args:
        datum: ``"sample"`` or ``"term"``.

    Returns:
        ``datum``.

    Raises:
        ValueError: another value.
    """
    if datum not in DATUMS:
        raise ValueError(f"datum must be 'sample' (each sample one datum) or 'term' (each loss term, "
                         f"curvlinops' EFLinearOperator), got {datum!r}")
    return str(datum)


def _axes(x: Array) -> tuple[int, ...]:
    return tuple(range(len(x.shape)))


def _sum(ops: OutputOps, x: Array, axes: tuple[int, ...]) -> Array:
    return ops.sum(x, axes) if axes else x


def _samples(ops: OutputOps, out: Array) -> Any:
    return ops.numel(out) / ops.numel(out[0])


def _denominator(spec: LossSpec, ops: OutputOps, out: Array, mask: Array) -> Any:
    """``W`` of :class:`LossSpec`: what the loss's mean divides by (1 for a sum)."""
    if spec.reduce == "sum":
        return 1.0
    if mask is not None and spec.reduce == "positions":
        return ops.sum(mask, _axes(mask))  # PyTorch: the mean over the kept terms
    if spec.reduce == "samples":
        return _samples(ops, out)
    return ops.numel(out) if spec.reduce == "entries" else ops.numel(out) / out.shape[spec.axis]


def term_weight(spec: LossSpec, ops: OutputOps, out: Array, targets: Array) -> Any:
    """``a`` of :class:`LossSpec` without ``factor``: scalar, or an array broadcastable to ``out``.

    Args:
        spec: the loss.
        ops: the backend's primitives.
        out: the batch's outputs.
        targets: the batch's targets.

    Returns:
        The weight of each loss term in the batch loss (``mask_t / W``).
    """
    mask = None if spec.mask is None else spec.mask(targets, out)
    W = _denominator(spec, ops, out, mask)
    return (1.0 if mask is None else mask) / W


def closed_form_ggn(spec: LossSpec, ops: OutputOps, out: Array, targets: Array) -> Callable[[Array], Array]:
    """``Z -> d^2 L/df^2 Z`` from the likelihood of ``spec``.

    Args:
        spec: the loss.
        ops: the backend's primitives.
        out: the batch's outputs.
        targets: the batch's targets.

    Returns:
        The output Hessian as a map of one column ``Z``.
    """
    a = spec.factor * term_weight(spec, ops, out, targets)
    if spec.likelihood == "categorical":
        p = ops.softmax(out, spec.axis)
        return lambda Z: a * (p * Z - p * ops.sum(p * Z, (spec.axis,)))
    if spec.likelihood == "bernoulli":
        s = ops.sigmoid(out)
        d = a * s * (1 - s)
        return lambda Z: d * Z
    return lambda Z: a * Z


def autodiff_ggn(ops: OutputOps, out: Array, loss: LossOfOutputs) -> Callable[[Array], Array]:
    """``Z -> d^2 L/df^2 Z`` by autodiff of the loss with respect to the outputs."""
    return lambda Z: ops.hvp(loss, out, Z)


def empirical(ops: OutputOps, out: Array, loss: LossOfOutputs, *, reduction: str, datum: str = "sample",
              spec: LossSpec | None = None, targets: Array = None) -> Callable[[Array], Array]:
    """``Z -> (1/w) sum_d r_d <r_d, Z_d>`` of the empirical Fisher (see the module docstring).

    Args:
        ops: the backend's primitives.
        out: the batch's outputs.
        loss: the batch loss of the outputs.
        reduction: ``"mean"`` or ``"sum"``, the loss's reduction over samples.
        datum: ``"sample"`` or ``"term"``.
        spec: the loss's :class:`LossSpec` (needed for ``datum="term"``).
        targets: the batch's targets (for ``datum="term"``).

    Returns:
        The empirical Fisher's output-space matrix as a map of one column ``Z``.
    """
    r = ops.grad(loss, out)
    if datum == "sample":
        scale = _samples(ops, out) if reduction == "mean" else 1.0
        rest = _axes(out)[1:]
        return lambda Z: scale * r * _sum(ops, r * Z, rest)
    assert spec is not None  # checked at construction
    # 1/w = W for every kept term; a masked term has r = 0
    W = _denominator(spec, ops, out, None if spec.mask is None else spec.mask(targets, out))
    return lambda Z: W * r * ops.sum(r * Z, (spec.axis,))


def mc_residuals(spec: LossSpec, ops: OutputOps, out: Array, noise: Array) -> list[Array]:
    """The gradients ``R_s`` of the negative log-likelihood at sampled labels, one per sample ``s``."""
    if spec.likelihood == "categorical":
        p = ops.softmax(out, spec.axis)
        return [p - ops.onehot_max(out + noise[s], spec.axis) for s in range(noise.shape[0])]
    if spec.likelihood == "bernoulli":
        s_ = ops.sigmoid(out)
        return [s_ - ops.less(noise[s], s_) for s in range(noise.shape[0])]
    return [noise[s] for s in range(noise.shape[0])]


def monte_carlo(spec: LossSpec, ops: OutputOps, out: Array, targets: Array, noise: Array
                ) -> Callable[[Array], Array]:
    """``Z -> (a/S) sum_s R_s <R_s, Z>`` per loss term: the Monte-Carlo Fisher's output matrix.

    Args:
        spec: the loss (its likelihood).
        ops: the backend's primitives.
        out: the batch's outputs.
        targets: the batch's targets (for the mask and weights only).
        noise: native noise of :func:`mc_noise`, shape ``(S, *out.shape)``.

    Returns:
        The map of one column ``Z``.
    """
    a = spec.factor * term_weight(spec, ops, out, targets) / noise.shape[0]
    R = mc_residuals(spec, ops, out, noise)

    def apply(Z: Array) -> Array:
        total = R[0] * ops.sum(R[0] * Z, (spec.axis,))
        for Rs in R[1:]:
            total = total + Rs * ops.sum(Rs * Z, (spec.axis,))
        return a * total

    return apply


def mc_noise(outputs_shape: Sequence[int], spec: LossSpec, num_samples: int, seed: int, index: int) -> np.ndarray:
    """Host noise for the labels of batch ``index``: shape ``(num_samples, *outputs_shape)``.

    Categorical: standard Gumbel noise ``g``, the sampled class being
    ``argmax(logits + g)`` along the class axis (the Gumbel-max trick). Bernoulli:
    uniform ``u``, the label being ``u < sigmoid(f)``. Gaussian: standard normal ``e``,
    the sampled target being ``f + e``.

    Args:
        outputs_shape: the shape of the batch's outputs.
        spec: the loss, which gives the likelihood.
        num_samples: label samples per input.
        seed: seed of the Monte-Carlo Fisher.
        index: the batch's index in the data (each batch has its own noise).

    Returns:
        The noise, float64.
    """
    rng = _random.generator(seed, "mc-fisher", index)
    shape = (num_samples, *tuple(int(s) for s in outputs_shape))
    if spec.likelihood == "categorical":
        return rng.gumbel(size=shape)
    if spec.likelihood == "bernoulli":
        return rng.random(shape)
    return rng.standard_normal(shape)


def check_outputs(spec: LossSpec, out: Array, targets: Array, need_targets: bool = True) -> str | None:
    """Why the closed form of ``spec`` does not apply to these outputs and targets, or None.

    Categorical: outputs with a class axis and class indices of the outputs' shape
    without it (soft or one-hot targets take autodiff). Others: targets of the outputs'
    shape.

    Args:
        spec: the loss.
        out: the batch's outputs.
        targets: the batch's targets.
        need_targets: check the targets too (the GGN's closed form reads them; the
            Monte-Carlo Fisher only the outputs).

    Returns:
        A description of the mismatch, or None.
    """
    shape = tuple(out.shape)
    tshape = tuple(getattr(targets, "shape", ()))
    if spec.likelihood == "categorical":
        if len(shape) < 2 or not -len(shape) <= spec.axis < len(shape):
            return f"logits of shape {shape} have no class axis {spec.axis}"
        without = shape[:spec.axis % len(shape)] + shape[spec.axis % len(shape) + 1:]
        if need_targets and tshape != without:
            return f"targets of shape {tshape} for logits of shape {shape} with classes on axis {spec.axis}"
        return None
    if need_targets and tshape != shape:
        return f"targets of shape {tshape} for outputs of shape {shape}"
    return None


def check_closed_form(spec: LossSpec, ops: OutputOps, out: Array, targets: Array, loss: LossOfOutputs,
                      seed: int = 0) -> float:
    """Relative difference of the closed-form output Hessian and autodiff's on one probe.

    Args:
        spec: the loss.
        ops: the backend's primitives.
        out: the outputs of one batch.
        targets: its targets.
        loss: its loss of the outputs.
        seed: the probe's seed.

    Returns:
        ``|M Z - H Z| / |H Z|`` for a Gaussian probe ``Z`` (0 when both vanish).
    """
    probe = _random.generator(seed, "output-space-check").standard_normal(tuple(int(s) for s in out.shape))
    Z = ops.asarray(probe, out)
    mine, truth = ops.host(closed_form_ggn(spec, ops, out, targets)(Z)), ops.host(ops.hvp(loss, out, Z))
    scale = float(np.linalg.norm(truth))
    diff = float(np.linalg.norm(mine - truth))
    return 0.0 if diff == 0.0 else diff / max(scale, np.finfo(np.float64).tiny)


def tolerance(dtype_eps: float) -> float:
    """The largest relative difference :func:`check_closed_form` accepts: ``sqrt(eps)`` of the dtype."""
    return float(np.sqrt(dtype_eps))


def unknown_likelihood_error(known: str, why: str = "This loss is not one of them") -> ValueError:
    """The error for a Fisher that needs a likelihood specops does not know for this loss.

    Args:
        known: the losses this backend recognizes, for the message.
        why: what is wrong with this loss.

    Returns:
        The error, to raise.
    """
    return ValueError(
        "fisher(estimator='mc') samples labels from the model's predictive distribution and fisher(datum='term') "
        f"splits the loss into its terms, so both need a loss specops reads exactly: {known}. {why}; pass "
        "one of those as loss_fn, or use fisher(estimator='empirical') (datum='sample') or ggn(...), which work "
        "for any loss of the outputs"
    )


def positive_semidefinite(kind: str, spec: LossSpec | None) -> bool | None:
    """Whether ``M`` (and so ``J^T M J``) of a curvature ``kind`` is positive semi-definite by construction.

    Both Fishers are sums of outer products ``r r^T`` with positive weights: always. The
    GGN is when the loss is convex in the outputs, as every :class:`LossSpec` is
    (cross-entropies and squared errors); for another loss (autodiff of its output
    Hessian) nothing is known: None.

    Args:
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        spec: the loss's :class:`LossSpec` as :func:`validate` left it (None: autodiff).

    Returns:
        True, or None when unknown.
    """
    return True if kind != "ggn" or spec is not None else None


def output_matrix(kind: str, spec: LossSpec | None, ops: OutputOps, out: Array, targets: Array,
                  loss: LossOfOutputs, *, reduction: str, datum: str = "sample",
                  noise: Array = None) -> Callable[[Array], Array]:
    """The output-space matrix ``M`` of a curvature ``kind`` for one batch, as a map of ``Z``.

    Args:
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        spec: the loss's :class:`LossSpec` as :func:`validate` left it (None: autodiff).
        ops: the backend's primitives.
        out: the batch's outputs (no gradient recorded into them).
        targets: the batch's targets.
        loss: the batch loss of the outputs.
        reduction: ``"mean"`` or ``"sum"``.
        datum: of the empirical Fisher.
        noise: native noise of :func:`mc_noise` (``kind="mc"``).

    Returns:
        ``Z -> M Z``.

    Raises:
        ValueError: ``kind="mc"`` (or ``datum="term"``) on outputs the loss's closed form
            does not fit.
    """
    if kind == "empirical":
        return empirical(ops, out, loss, reduction=reduction, datum=datum, spec=spec, targets=targets)
    if kind == "ggn":
        if spec is None or check_outputs(spec, out, targets) is not None:
            return autodiff_ggn(ops, out, loss)
        return closed_form_ggn(spec, ops, out, targets)
    reason = "no likelihood" if spec is None else check_outputs(spec, out, targets, need_targets=False)
    if reason is not None or spec is None:
        raise ValueError(f"fisher(estimator='mc'): {reason}")
    return monte_carlo(spec, ops, out, targets, noise)


def validate(kind: str, spec: LossSpec | None, ops: OutputOps, out: Array, targets: Array,
             loss: LossOfOutputs, *, datum: str, eps: float, known: str) -> tuple[LossSpec | None, float | None]:
    """Check at construction, on the first batch, that the closed form of ``spec`` is the loss's.

    The closed-form output Hessian is compared with autodiff's on one probe; a
    disagreement beyond :func:`tolerance` means specops read the loss wrong: the GGN
    then uses autodiff (with a warning), and a Fisher that needs the likelihood raises.

    Args:
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        spec: the loss as the backend read it, or None.
        ops: the backend's primitives.
        out: the first batch's outputs.
        targets: its targets.
        loss: its loss of the outputs.
        datum: of the empirical Fisher.
        eps: the machine epsilon of the outputs' dtype.
        known: the losses the backend reads, for messages.

    Returns:
        The spec to use (None: autodiff) and the measured relative difference (None: not
        measured).

    Raises:
        ValueError: ``kind="mc"`` or ``datum="term"`` with a loss specops does not read,
            or whose closed form does not fit the outputs.
        RuntimeError: the same with a closed form that disagrees with autodiff.
    """
    needs = kind == "mc" or (kind == "empirical" and datum == "term")
    if kind == "empirical" and not needs:
        return spec, None
    if spec is None:
        if needs:
            raise unknown_likelihood_error(known)
        return None, None
    reason = check_outputs(spec, out, targets, need_targets=kind != "mc")
    if reason is not None:
        if needs:
            raise unknown_likelihood_error(known, f"The closed form does not fit this batch: {reason}")
        return None, None
    error = check_closed_form(spec, ops, out, targets, loss)
    if error > tolerance(eps):
        message = (f"the closed-form output Hessian of this loss ({spec.likelihood}, classes/terms on axis "
                   f"{spec.axis}, reduce {spec.reduce!r}) differs from autodiff's by {error:.2g} (relative) on "
                   "the first batch: specops read the loss wrong")
        if needs:
            raise RuntimeError(message + "; use fisher(estimator='empirical') or ggn(...), which do not need it, and "
                                         "report the loss")
        warnings.warn(message + "; using autodiff of the loss instead", stacklevel=3)
        return None, error
    return spec, error
