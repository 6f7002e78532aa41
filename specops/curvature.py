"""Curvature beyond the Hessian: generalized Gauss-Newton and Fisher operators.

For a batch with outputs ``f = model(x; theta)`` and a loss ``L(f, y)`` the Hessian
splits as ``H = J^T (d^2 L / df^2) J + sum_o (dL/df_o) d^2 f_o / dtheta^2``: the first
term is the generalized Gauss-Newton matrix (GGN), positive semi-definite whenever the
loss is convex in the outputs; the second is the residual term ``H - G``.

Every operator here is one product skeleton, written once per backend:
``J^T M (J V)``: one Jacobian-vector product through the model (k columns batched), an
output-space matrix ``M``, one vector-Jacobian product. Only ``M`` differs; it is
built once for every framework by :mod:`specops.output_space` from a few
primitives each backend supplies: ``ggn``: ``M = d^2 L / df^2``, in closed form for
the losses specops reads exactly (checked against autodiff at construction), by
autodiff of the loss otherwise; ``fisher(kind="empirical")``: ``(1/w) sum_d r_d r_d^T``
over the data ``d`` (samples, or loss terms with ``datum="term"``) of the output
gradients ``r`` at the true targets; ``fisher(kind="mc")``: the same at labels
sampled from the model's predictive distribution (in expectation the GGN).

:class:`CurvatureAdapter` wraps a backend's Hessian adapter: data handling, weighting,
parameter selection, blocks, MPI and the checks are the Hessian's, only the product is
replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from specops import output_space
from specops.layout import ParamLayout
from specops.model import ModelAdapter, ModelOperator
from specops.ops import Array

A = TypeVar("A", bound=ModelAdapter)
#: ``product(index, batch, V)``: the curvature of batch ``index`` times native ``V`` (n, k).
Product = Callable[[int, Any, Array], Array]

KINDS = ("ggn", "empirical", "mc")
#: Curvature names (``specops analyze --curvature``, the tracker, the study) -> the ``kind``
#: of :func:`curvature_like` (None: the Hessian itself).
CURVATURES = {"hessian": None, "ggn": "ggn", "fisher": "empirical", "mc-fisher": "mc"}
FISHER_KINDS = ("empirical", "mc")
def check_kind(kind: str, allowed: Sequence[str] = FISHER_KINDS) -> str:
    """Check a curvature kind.

    Args:
        kind: the kind asked for.
        allowed: the kinds the caller takes.

    Returns:
        ``kind``.

    Raises:
        ValueError: ``kind`` is not one of ``allowed``.
    """
    if kind not in allowed:
        raise ValueError(f"kind must be one of {allowed}, got {kind!r}")
    return kind


def check_num_samples(num_samples: Any) -> int:
    """Check the number of Monte-Carlo label samples per input of ``fisher(kind="mc")``.

    Args:
        num_samples: the number asked for.

    Returns:
        ``num_samples`` as an ``int``.

    Raises:
        ValueError: ``num_samples`` is not a positive integer.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return int(num_samples)


def model_form_error(what: str, backend_hint: str) -> ValueError:
    """The error for a ``ggn``/``fisher`` whose loss is not a function of the outputs alone.

    Args:
        what: the operator asked for, for the message (``"ggn"``).
        backend_hint: how this backend's loss must look, for the message.

    Returns:
        The error, to raise.
    """
    return ValueError(
        f"{what} needs a loss of the model's outputs alone, applied to model(inputs) for batches "
        f"(inputs, targets): {backend_hint}. A general loss of the model and the batch (loss_form='model') "
        "has no Gauss-Newton split; terms that depend on the parameters directly (weight decay "
        "lam/2 |theta|^2) add their own Hessian: use G.shift(lam) for that one"
    )


def validated_adapter(base: ModelAdapter, kind: str, make: Callable[[ModelAdapter, Any], Any], spec: Any,
                      first_batch: Any, engine: str, *, num_samples: int, datum: str) -> CurvatureAdapter:
    """The curvature adapter of a backend, its closed form checked on the first batch.

    Args:
        base: the backend's Hessian adapter.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        make: ``make(adapter, spec) -> product``, the backend's per-batch product (with a
            ``validate(batch) -> (spec, error)`` method) for an adapter and a loss spec.
        spec: the :class:`~specops.output_space.LossSpec` the backend read, or None.
        first_batch: the batch to check the closed form on (None: no check).
        engine: the backend's description of the product.
        num_samples: Monte-Carlo labels per sample (for the description).
        datum: of the empirical Fisher (for the description).

    Returns:
        The :class:`CurvatureAdapter`; ``output_check_error`` is the difference measured.

    Raises:
        ValueError: a Fisher that needs a likelihood this loss has not (see
            :func:`specops.output_space.validate`).
        RuntimeError: the same when the closed form disagrees with autodiff.
    """
    error = None
    if first_batch is not None:
        spec, error = make(base, spec).validate(first_batch)
    how = {"ggn": "output Hessian " + ("in closed form" if spec else "by autodiff"),
           "empirical": f"output gradients per {datum}", "mc": f"{num_samples} sampled label(s) per sample"}[kind]
    adapter = CurvatureAdapter(base, lambda b: make(b, spec), kind, f"{kind}: {engine}, {how}",
                               positive_semidefinite=output_space.positive_semidefinite(kind, spec))
    adapter.output_check_error = error
    return adapter


def base_adapter(H: Any, adapter_type: type[A]) -> A:
    """The backend's Hessian adapter behind a model operator ``H`` (of any curvature kind).

    Args:
        H: a model operator.
        adapter_type: the backend's Hessian adapter class.

    Returns:
        The adapter (for a curvature operator, the Hessian adapter it wraps).

    Raises:
        TypeError: ``H`` is not a model operator of that backend.
    """
    adapter = getattr(H, "adapter", None)
    if isinstance(adapter, CurvatureAdapter):
        adapter = adapter.base
    if not isinstance(adapter, adapter_type):
        raise TypeError(f"expected a model operator of {adapter_type.__name__}, got {type(H).__name__}"
                        + (f" of {type(adapter).__name__}" if adapter is not None else ""))
    return adapter


def curvature_like(H: ModelOperator, kind: str = "ggn", **kwargs: Any) -> ModelOperator:
    """The GGN or a Fisher of the same model, loss, data and parameters as ``H``.

    ``H`` is a PyTorch or TensorFlow model operator; ``kind="ggn"`` gives the GGN,
    ``"empirical"`` or ``"mc"`` a Fisher.

    JAX's ``hessian`` takes one ``loss_fn(params, batch)``, which does not separate the
    model from the loss: build the JAX operators with ``specops.backends.jax.ggn`` /
    ``fisher`` from ``apply_fn`` and ``loss_fn(outputs, targets)``.

    Args:
        H: a model operator from a backend's ``hessian``, ``ggn`` or ``fisher``.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        **kwargs: ``num_samples``, ``seed``, ``check_deterministic`` of the backend's
            ``curvature_like``.

    Returns:
        The curvature operator, a :class:`~specops.ModelOperator`.

    Raises:
        TypeError: an operator of another backend (JAX, NumPy) or not model-backed.
    """
    backend = getattr(H, "backend", None)
    if backend == "torch":
        from specops.backends import torch as module
    elif backend == "tensorflow":
        from specops.backends import tensorflow as module
    else:
        raise TypeError(
            f"curvature_like takes PyTorch or TensorFlow model operators, got a {backend!r} operator; for JAX "
            "build specops.backends.jax.ggn(apply_fn, loss_fn, params, data) / fisher(...) directly"
        )
    return module.curvature_like(H, kind, **kwargs)


class CurvatureAdapter(ModelAdapter):
    """A backend's Hessian adapter with its product replaced by a curvature product.

    Args:
        base: the backend's :class:`~specops.model.ModelAdapter` (loss, gradient,
            parameters, subsets and checks are its own).
        make_product: ``make_product(base) -> product(index, batch, V)``, the
            curvature times native ``V`` (n, k) for one batch; called again for the
            base adapter of every subset.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        engine: a short description of the product.
        positive_semidefinite: the curvature's definiteness
            (:func:`specops.output_space.positive_semidefinite`).
    """

    #: relative difference of the closed-form output Hessian and autodiff's at construction
    #: (None: not measured; see :func:`specops.output_space.validate`)
    output_check_error: float | None = None

    def __init__(self, base: ModelAdapter, make_product: Callable[[ModelAdapter], Product], kind: str,
                 engine: str, *, positive_semidefinite: bool | None = None) -> None:
        self.base = base
        self.kind = kind
        self.positive_semidefinite = positive_semidefinite
        self.ops = base.ops
        self.engine = engine
        self._make_product = make_product
        self._product = make_product(base)

    @property
    def layout(self) -> ParamLayout:  # type: ignore[override]  # the base adapter's, read-only
        """The base adapter's :class:`~specops.layout.ParamLayout`."""
        return self.base.layout

    def batch_size(self, batch: Any) -> int:
        """Number of samples in ``batch``."""
        return self.base.batch_size(batch)

    def loss(self, batch: Any, delta: Array | None = None) -> float:
        """The batch loss at ``theta + delta`` (the base adapter's)."""
        return self.base.loss(batch, delta)

    def gradient(self, batch: Any) -> Array:
        """Gradient of the batch loss: native (n,)."""
        return self.base.gradient(batch)

    def hvp(self, index: int, batch: Any, V: Array) -> Array:
        """The curvature (not the Hessian) of the batch loss times ``V``."""
        return self._product(index, batch, V)

    def params_vector(self) -> Array:
        """The current parameters, flattened: native (n,)."""
        return self.base.params_vector()

    def unflatten(self, v: Array) -> dict:
        """A flat vector or block as name -> array (the base adapter's)."""
        return self.base.unflatten(v)

    def flatten(self, arrays: Any) -> Array:
        """Per-parameter arrays as one flat vector or block (the base adapter's)."""
        return self.base.flatten(arrays)

    def as_params(self, v: Array) -> Any:
        """A flat vector or block in the framework's own parameter structure."""
        return self.base.as_params(v)

    def subset(self, names: list[str]) -> CurvatureAdapter:
        """The same curvature for the named parameters only (the others held fixed)."""
        sub = CurvatureAdapter(self.base.subset(names), self._make_product, self.kind, self.engine,
                               positive_semidefinite=self.positive_semidefinite)
        sub.output_check_error = self.output_check_error
        return sub

    def determinism_hints(self) -> list[str]:
        """Likely causes of a non-deterministic product, for the error message."""
        hints = self.base.determinism_hints()
        if self.kind == "mc":
            hints = hints + ["the Monte-Carlo labels are drawn once per batch index: batches must come in "
                             "the same order every pass"]
        return hints

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not yet set (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)
