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
autodiff of the loss otherwise; ``fisher(estimator="empirical")``: ``(1/w) sum_d r_d r_d^T``
over the data ``d`` (samples, or loss terms with ``datum="term"``) of the output
gradients ``r`` at the true targets; ``fisher(estimator="mc")``: the same at labels
sampled from the model's predictive distribution (in expectation the GGN).

:class:`CurvatureAdapter` wraps a backend's Hessian adapter: data handling, weighting,
parameter selection, blocks, MPI and the checks are the Hessian's, only the product is
replaced. The construction (:func:`curvature_operator`: the loss's form and reduction, the
random-forward check, the closed form checked on the first batch) is written here once; a
backend supplies :class:`CurvaturePrimitives` (its losses read, its ``J^T M J V`` product),
which its Hessian adapter returns from ``curvature_primitives()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, Protocol

from specops import _checks, output_space
from specops.layout import ParamLayout
from specops.model import ModelAdapter, ModelOperator
from specops.ops import Array

#: ``product(index, batch, V)``: the curvature of batch ``index`` times native ``V`` (n, k).
Product = Callable[[int, Any, Array], Array]

#: A curvature by name (a list, a record, the CLI, JSON).
Curvature = Literal["hessian", "ggn", "empirical_fisher", "mc_fisher"]
CURVATURES: tuple[Curvature, ...] = ("hessian", "ggn", "empirical_fisher", "mc_fisher")
#: Which Fisher: at the true targets, or at labels sampled from the model.
FisherEstimator = Literal["empirical", "mc"]
FISHER_ESTIMATORS: tuple[FisherEstimator, ...] = ("empirical", "mc")
# the curvature's output-space matrix, as specops.output_space names it
_OUTPUT_KIND = {"ggn": "ggn", "empirical_fisher": "empirical", "mc_fisher": "mc"}
_CURVATURE = {kind: curvature for curvature, kind in _OUTPUT_KIND.items()}


def check_estimator(estimator: Any) -> FisherEstimator:
    """Check a Fisher estimator.

    Args:
        estimator: one of :data:`FISHER_ESTIMATORS`.

    Returns:
        ``estimator``.

    Raises:
        ValueError: another value (the message lists the estimators).
    """
    return _checks.choice("estimator", estimator, FISHER_ESTIMATORS)


def fisher_curvature(estimator: Any) -> Curvature:
    """The curvature of ``fisher(estimator=...)``.

    Args:
        estimator: one of :data:`FISHER_ESTIMATORS`.

    Returns:
        ``"empirical_fisher"`` or ``"mc_fisher"``.

    Raises:
        ValueError: another value (the message lists the estimators).
    """
    return "empirical_fisher" if check_estimator(estimator) == "empirical" else "mc_fisher"


def check_num_samples(num_samples: Any) -> int:
    """Check the number of Monte-Carlo labels per sample of ``fisher(estimator="mc")``.

    Args:
        num_samples: the number asked for.

    Returns:
        ``num_samples`` as an ``int``.

    Raises:
        ValueError: ``num_samples`` is not a positive integer.
    """
    return _checks.positive_int("num_samples", num_samples)


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


class CurvatureProduct(Protocol):
    """A backend's ``J^T M J V`` for one batch (``M`` from :func:`specops.output_space.output_matrix`)."""

    def __call__(self, index: int, batch: Any, V: Array) -> Array:
        """The curvature of batch ``index`` times native ``V`` (n, k)."""

    def validate(self, batch: Any) -> tuple[Any, float | None]:
        """The closed form checked on ``batch``: ``(spec, error)`` (:func:`specops.output_space.validate`)."""


@dataclasses.dataclass(frozen=True)
class CurvaturePrimitives:
    """What a framework supplies for its GGN and Fisher operators, and to read its losses.

    A backend's Hessian adapter returns its instance from ``curvature_primitives()``;
    everything else (the order of the checks, the closed form's check, the adapter that
    replaces the product) is :func:`curvature_operator`'s.

    Attributes:
        form_hint: how a loss of the outputs is written in this framework, for messages.
        engine: the product, described (``G.engine``).
        loss_reduction: ``loss_fn -> "mean" | "sum" | its own word | None``: the reduction a
            loss object states (None: it states none).
        loss_spec: ``loss_fn -> LossSpec | None``: the loss read exactly, or None (autodiff).
        product: ``(base, kind, reduction, num_samples, seed, datum, spec) -> CurvatureProduct``:
            the per-batch ``J^T M J V`` of an output-space ``kind`` for the Hessian adapter ``base``.
        reduction_eps: ``adapter -> float``: the machine epsilon of the reduction check.
    """

    form_hint: str
    engine: str
    loss_reduction: Callable[[Any], str | None]
    loss_spec: Callable[[Any], output_space.LossSpec | None]
    product: Callable[..., CurvatureProduct]
    reduction_eps: Callable[[Any], float]

    def reduction(self, loss_fn: Any, reduction: str | None) -> str:
        """The loss's reduction: the one it states, or ``reduction`` (default ``"mean"``).

        Args:
            loss_fn: the loss (None: the model's own).
            reduction: the ``reduction=`` argument.

        Returns:
            ``"mean"`` or ``"sum"`` (see :func:`specops.reduction.resolve`).
        """
        from specops.reduction import loss_name, resolve

        return resolve(reduction, self.loss_reduction(loss_fn) if loss_fn is not None else None, loss_name(loss_fn))

    def check_reduction(self, adapter: Any, loss_fn: Any, reduction: str, first_batch: Any) -> None:
        """For a plain function, check on ``first_batch`` that it reduces as ``reduction`` says.

        Args:
            adapter: the Hessian adapter.
            loss_fn: the loss.
            reduction: the resolved reduction.
            first_batch: the batch to check on (None: no check).
        """
        from specops.reduction import check_plain

        check_plain(adapter, loss_fn, self.loss_reduction(loss_fn), reduction, first_batch,
                    self.reduction_eps(adapter))


def validated_adapter(base: ModelAdapter, kind: str, make: Callable[[ModelAdapter, Any], Any], spec: Any,
                      first_batch: Any, engine: str, *, num_samples: int, datum: str) -> CurvatureAdapter:
    """The curvature adapter of a backend, its closed form checked on the first batch.

    Args:
        base: the backend's Hessian adapter.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"`` (the output-space kind).
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


def first_batch(data: Any) -> Any:
    """The first batch of ``data`` (one batch or an iterable of batches), or None if it has none."""
    for batch in ModelOperator._batches_of(data):
        return batch
    return None


def primitives_of(adapter: Any) -> CurvaturePrimitives:
    """The :class:`CurvaturePrimitives` of a backend's Hessian adapter.

    Args:
        adapter: a model adapter.

    Returns:
        Its ``curvature_primitives()``.

    Raises:
        TypeError: an adapter without them (JAX's ``hessian``, NumPy, a sharded model).
    """
    primitives = getattr(adapter, "curvature_primitives", None)
    if primitives is None:
        raise TypeError(
            f"curvature_like takes PyTorch or TensorFlow model operators, or JAX's ggn/fisher operators, got one of "
            f"{type(adapter).__name__}; for JAX build specops.backends.jax.ggn(apply_fn, loss_fn, params, data) / "
            "fisher(...) directly"
        )
    return primitives()


def _check_form(base: ModelAdapter, curvature: Curvature) -> CurvaturePrimitives:
    """The primitives of ``base``; raise for a loss that is not a function of the outputs alone."""
    primitives = primitives_of(base)
    if getattr(base, "loss_fn", None) is None or getattr(base, "loss_form", None) != "outputs":
        what = "ggn(...)" if curvature == "ggn" else f"fisher(estimator={_OUTPUT_KIND[curvature]!r})"
        raise model_form_error(what, primitives.form_hint)
    return primitives


def curvature_adapter(base: ModelAdapter, curvature: Curvature, reduction: str, *, num_samples: int = 1,
                      seed: int = 0, datum: str = "sample", first: Any = None) -> CurvatureAdapter:
    """``base`` (a Hessian adapter) with its product replaced by that of ``curvature``.

    Args:
        base: the backend's Hessian adapter.
        curvature: ``"ggn"``, ``"empirical_fisher"`` or ``"mc_fisher"``.
        reduction: the resolved reduction.
        num_samples: Monte-Carlo labels per sample of ``"mc_fisher"``.
        seed: the seed of those labels.
        datum: of ``"empirical_fisher"``: ``"sample"`` or ``"term"``.
        first: the batch the closed form is checked on (None: no check).

    Returns:
        The :class:`CurvatureAdapter`.

    Raises:
        ValueError: a loss that is not a function of the outputs alone; a bad ``num_samples``,
            ``seed`` or ``datum``; a Fisher whose likelihood this loss has not.
    """
    from specops.random import check_seed

    primitives = _check_form(base, curvature)
    kind = _OUTPUT_KIND[curvature]
    num_samples, seed = check_num_samples(num_samples), check_seed(seed)
    datum = output_space.check_datum(datum)
    return validated_adapter(
        base, kind, lambda b, spec: primitives.product(b, kind, reduction, num_samples, seed, datum, spec),
        primitives.loss_spec(base.loss_fn), first, primitives.engine,  # type: ignore[attr-defined]  # checked above
        num_samples=num_samples, datum=datum)


def curvature_operator(base: ModelAdapter, curvature: Curvature, data: Any, *, reduction: str | None, comm: Any,
                       check_deterministic: bool, num_samples: int = 1, seed: int = 0,
                       datum: str = "sample", operator: Callable[..., ModelOperator] = ModelOperator
                       ) -> ModelOperator:
    """The GGN or a Fisher of a backend's Hessian adapter over ``data``: the checks in their order.

    The loss's form, its reduction (read from the loss, or checked on the first batch for
    a plain function, after the random-forward check), the closed form on the first batch,
    then the operator (with its determinism checks).

    Args:
        base: the backend's Hessian adapter, just built.
        curvature: ``"ggn"``, ``"empirical_fisher"`` or ``"mc_fisher"``.
        data: one batch or an iterable of batches.
        reduction: the ``reduction=`` argument (None: the loss's own).
        comm: ``None`` or a communicator.
        check_deterministic: as for the backend's ``hessian``.
        num_samples: Monte-Carlo labels per sample of ``"mc_fisher"``.
        seed: the seed of those labels.
        datum: of ``"empirical_fisher"``.
        operator: the operator class (a backend's subclass of :class:`~specops.ModelOperator`,
            as the Hessian of a sharded model has).

    Returns:
        The :class:`~specops.ModelOperator`.
    """
    primitives = _check_form(base, curvature)
    loss_fn = base.loss_fn  # type: ignore[attr-defined]  # checked by _check_form
    resolved = primitives.reduction(loss_fn, reduction)
    first = first_batch(data)
    if first is not None:
        base.check_random_forward(first)
    primitives.check_reduction(base, loss_fn, resolved, first)
    adapter = curvature_adapter(base, curvature, resolved, num_samples=num_samples, seed=seed, datum=datum,
                                first=first)
    return operator(adapter, data, reduction=resolved, comm=comm, check_deterministic=check_deterministic)


def curvature_like(H: ModelOperator, curvature: Curvature = "ggn", *, num_samples: int = 1, seed: int = 0,
                   check_deterministic: bool = False, datum: str = "sample") -> ModelOperator:
    """A curvature of the same model, loss, data, parameters and reduction as ``H``.

    ``H`` is a PyTorch or TensorFlow model operator (of any curvature), or a JAX
    ``ggn``/``fisher`` operator; its adapter supplies the framework's products. JAX's
    ``hessian`` takes one ``loss_fn(params, batch)``, which does not separate the model
    from the loss: build the JAX operators with ``specops.backends.jax.ggn`` / ``fisher``
    from ``apply_fn`` and ``loss_fn(outputs, targets)``.

    Args:
        H: a model operator from a backend's ``hessian``, ``ggn`` or ``fisher``.
        curvature: one of :data:`CURVATURES`; ``"hessian"`` gives ``H`` itself for a
            Hessian, the Hessian of the same model otherwise.
        num_samples: Monte-Carlo labels per sample of ``"mc_fisher"``, as for ``fisher``.
        seed: the seed of those labels, as for ``fisher``.
        check_deterministic: run the construction checks again (``H`` passed them).
        datum: of ``"empirical_fisher"``, as for ``fisher``.

    Returns:
        The curvature operator, a :class:`~specops.ModelOperator` sharing ``H``'s data and
        communicator.

    Raises:
        TypeError: an operator of another backend (JAX's ``hessian``, NumPy) or not model-backed.
        ValueError: an unknown ``curvature``; as the backend's ``fisher`` otherwise.
    """
    _checks.choice("curvature", curvature, CURVATURES)
    adapter = getattr(H, "adapter", None)
    base = adapter.base if isinstance(adapter, CurvatureAdapter) else adapter
    if base is None:
        raise TypeError(f"curvature_like takes a model operator, got a {type(H).__name__}")
    if curvature == "hessian":
        return H if base is adapter else type(H)(base, H._data, reduction=H.reduction, comm=H.comm,
                                                 check_deterministic=check_deterministic)
    made = curvature_adapter(base, curvature, H.reduction, num_samples=num_samples, seed=seed, datum=datum,
                             first=first_batch(H._data))
    # type(H): a backend's subclass (a sharded model's weights its batches itself)
    return type(H)(made, H._data, reduction=H.reduction, comm=H.comm, check_deterministic=check_deterministic)


class CurvatureAdapter(ModelAdapter):
    """A backend's Hessian adapter with its product replaced by a curvature product.

    Args:
        base: the backend's :class:`~specops.model.ModelAdapter` (loss, gradient,
            parameters, subsets and checks are its own).
        make_product: ``make_product(base) -> product(index, batch, V)``, the
            curvature times native ``V`` (n, k) for one batch; called again for the
            base adapter of every subset.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"`` (the output-space kind).
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

    @property
    def curvature(self) -> Curvature:
        """The curvature's name (one of :data:`CURVATURES`)."""
        return _CURVATURE[self.kind]  # type: ignore[return-value]  # the values of _OUTPUT_KIND's keys

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
