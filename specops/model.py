"""Model-backed operators: the loss Hessian of a model over a data set.

A backend supplies a :class:`ModelAdapter`: pure functions for one batch (loss,
gradient, Hessian-matrix product) and the layout of the parameters. The
:class:`ModelOperator` here handles everything else once, for every backend:
iterating the data, weighting batches by their sample count, ``mean``/``sum``
reductions, the reduction over MPI ranks, counting products, and the checks for
non-finite losses and non-deterministic products.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from specops._checks import positive_int
from specops.distributed import as_comm
from specops.layout import ParamLayout, select_names  # noqa: F401 (select_names: re-exported)
from specops.operator import LinearOperator, NonFiniteError
from specops.ops import Array, VectorOps
from specops.reduction import REDUCTIONS

T = TypeVar("T")

#: How a loss function is called: ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)``.
LossForm = Literal["auto", "outputs", "model"]
LOSS_FORMS: tuple[LossForm, ...] = get_args(LossForm)
_MODEL_ARG_NAMES = ("model", "module", "net", "network")


class NonDeterministicError(RuntimeError):
    """Two identical products differ: the operator is not a fixed matrix."""


class ModelAdapter(abc.ABC):
    """What a backend provides for one model, loss and parameter selection.

    Attributes:
        ops: vector operations of the parameter vectors.
        layout: the :class:`~specops.layout.ParamLayout` of the selected parameters
            (names, shapes and offsets in the flat vector).
        engine: a short name of the Hessian-product engine in use.
        positive_semidefinite: the definiteness of the curvature the adapter's products
            give (see :attr:`specops.LinearOperator.positive_semidefinite`): False for a
            Hessian, indefinite in general; a curvature adapter says its own.
    """

    ops: VectorOps
    layout: ParamLayout
    engine: str = ""
    positive_semidefinite: bool | None = False

    @property
    def num_params(self) -> int:
        """Number of selected parameters (entries of the flat vector)."""
        return self.layout.num_params

    @property
    def param_blocks(self) -> dict:
        """Parameter name -> slice of the flat parameter vector, in order."""
        return dict(self.layout.blocks)

    @property
    def param_shapes(self) -> dict:
        """Parameter name -> its array shape."""
        return dict(self.layout.shapes)

    @abc.abstractmethod
    def batch_size(self, batch: Any) -> int:
        """Number of samples in ``batch``."""

    @abc.abstractmethod
    def loss(self, batch: Any, delta: Array | None = None) -> float:
        """The batch loss (as the user's loss function reduces it) at ``theta + delta``."""

    @abc.abstractmethod
    def gradient(self, batch: Any) -> Array:
        """Gradient of the batch loss: native (n,)."""

    @abc.abstractmethod
    def hvp(self, index: int, batch: Any, V: Array) -> Array:
        """Hessian of the batch loss times native ``V`` (n, k); ``index`` numbers the batch."""

    def hvp_vector(self, index: int, batch: Any, v: Array) -> Array:
        """Hessian of the batch loss times one native vector ``v`` (n,).

        Backends with compiled products override it to skip the reshapes.
        """
        return self.hvp(index, batch, v[:, None])[:, 0]

    @abc.abstractmethod
    def params_vector(self) -> Array:
        """The current parameters, flattened: native (n,)."""

    @abc.abstractmethod
    def subset(self, names: list[str]) -> ModelAdapter:
        """An adapter for the named parameters only (the others held fixed)."""

    def unflatten(self, v: Array) -> dict:
        """A flat vector (n,) or block (n, k) as name -> array of shape ``shape`` / ``(k, *shape)``."""
        return self.layout.unflatten(v, self.ops)

    def flatten(self, arrays: dict | Iterable[Array]) -> Array:
        """Per-parameter arrays (name -> array, or a sequence in order) as one flat vector or block."""
        return self.layout.flatten(arrays, self.ops)

    def as_params(self, v: Array) -> Any:
        """A flat vector or block in the framework's own parameter structure.

        This default is :meth:`unflatten` (a dict name -> array); backends whose users
        hold parameters in another structure (a JAX pytree, a list of Keras variables)
        override it.
        """
        return self.unflatten(v)

    def determinism_hints(self) -> list[str]:
        """Likely causes of a non-deterministic product, for the error message."""
        return []

    # --- primitives of the construction checks (specops.checks) -------------------
    #: the engine the user asked for (``"auto"`` or a name)
    requested_engine: str = "auto"
    #: the construction check's findings (set by :class:`ModelOperator`), or None
    engine_check: Any = None
    #: relative difference of two independent exact engines that agree (set by :meth:`cross_check`)
    engines_agree: float | None = None

    #: the lowest precision the loss is computed in (bounds the products' accuracy); None: ``ops.dtype``
    compute_dtype: Any = None

    def check_random_forward(self, batch: Any) -> float | None:
        """Raise if a forward pass of ``batch`` draws random numbers (backends that can tell).

        Returns:
            The loss of ``batch`` when the check computed it in its forward pass (the loss
            check then takes it instead of a second forward), else None.
        """
        return None

    def keeping_random_state(self) -> contextlib.AbstractContextManager:
        """A context in which the framework's global random state is restored on exit.

        The construction checks run in it, so that building an operator leaves the caller's
        generator as it was even when a forward pass draws random numbers.
        """
        return contextlib.nullcontext()

    def cross_check(self, batch: Any) -> None:  # noqa: B027 (optional hook)
        """Backend-specific engine comparisons on ``batch``, run before :func:`specops.checks.check_engine`."""

    def replays_exactly(self) -> bool:
        """Whether a product repeats exactly what the previous one computed (a cached graph on CPU).

        The determinism check then compares batches instead of a second product.
        """
        return False

    def check_same_batch(self, index: int, batch: Any) -> None:
        """Raise :class:`NonDeterministicError` if batch ``index`` is not the one cached.

        Used with :meth:`replays_exactly`: the cached computation was built from it.
        """

    def check_batch(self, batch: Any) -> Any:
        """The part of the first batch the engine checks run on (default: all of it).

        A wrong second-derivative formula is wrong on any samples; backends that can cut a
        batch return a few samples, so that the checks cost a fraction of a product.
        """
        return batch

    def check_product(self, batch: Any, V: Array) -> Array:
        """The engine in use times native ``V`` (n, k) on one batch (from :meth:`check_batch`).

        Backends that support the construction check override it (with :meth:`gradient_at`).
        """
        raise NotImplementedError

    def gradient_at(self, batch: Any, delta: Array) -> Array:
        """Gradient of the batch loss at ``theta + delta``: native (n,)."""
        raise NotImplementedError

    def use_finite_differences(self) -> None:
        """Switch the products to central differences of gradients (the check found the engine wrong)."""
        raise NotImplementedError

    def verdict_key(self, batch: Any) -> tuple[Any, Any] | None:
        """``(owner, key)``: what a construction verdict depends on, to carry it over to rebuilds.

        ``owner`` is the model object (held weakly), ``key`` a hashable description of
        everything else (parameter selection, dtype, engine requested, modes, batch shapes).
        None: never carry over.
        """
        return None

    def adopt(self, check: Any) -> None:
        """Take over the engine chosen by an earlier build's check (``check.engine``)."""
        if check.engine == "finite_difference" and self.engine != "finite_difference":
            self.use_finite_differences()


def is_single_batch(data: Any) -> bool:
    """The convention of every backend: a tuple or a dict is one batch."""
    return isinstance(data, (tuple, dict))


def resolve_loss_form(loss_fn: Callable[..., Any], loss_form: str = "auto") -> str:
    """Which loss convention a backend's ``loss_fn`` follows.

    ``"outputs"``: ``loss_fn(outputs, targets)`` (Keras: ``(targets, outputs)``) applied to
    ``model(inputs)``; ``"model"``: ``loss_fn(model, batch)``. ``"auto"`` picks ``"model"``
    when the first parameter of ``loss_fn`` is named model, module, net or network.
    """
    import inspect

    if loss_form not in LOSS_FORMS:
        raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {loss_form!r}")
    if loss_form != "auto":
        return loss_form
    try:
        first = next(iter(inspect.signature(loss_fn).parameters), None)
    except (TypeError, ValueError):
        return "outputs"
    return "model" if first in _MODEL_ARG_NAMES else "outputs"


class BatchForms:
    """Per-batch quadratic forms recorded by :meth:`ModelOperator.recording_batches`.

    Every rank's batches are gathered in rank order, so every rank holds the numbers of one
    process holding all the data.

    Attributes:
        last: the last product's input block ``V`` (n, k) and its forms ``V^T H_b V`` (B, k, k).
        diagonals: per product, ``(tag, (B, k) forms v_j^T H_b v_j)``; ``tag`` is
            :attr:`tag` at the time of the product (an algorithm marks its probe products).
        weights: (B,) the weights ``w_b`` of ``H = sum_b w_b H_b``.
        sizes: (B,) the batches' sample counts.
        tag: the label given to the next products.
        wanted: the labels whose products are recorded (None: every product's).
    """

    def __init__(self, wanted: Collection[str] | None = None) -> None:
        self.last: tuple[Any, np.ndarray] | None = None
        self.diagonals: list[tuple[str, np.ndarray]] = []
        self.weights = self.sizes = np.zeros(0)
        self.tag = self._taken = ""
        self.wanted = None if wanted is None else frozenset(wanted)

    def take(self) -> bool:
        """Whether the product being made is recorded (its label is wanted, or every label is).

        The label is used up: a product made without one (by code that labels nothing) is
        not taken for the previous product's kind.
        """
        self._taken, self.tag = self.tag, ""
        return self.wanted is None or self._taken in self.wanted

    def add(self, V: Array, forms: list, operator: ModelOperator) -> None:
        """Record one product's local ``forms`` (gathered from every rank)."""
        G, self.weights, self.sizes = operator._batch_forms(np.asarray(forms, dtype=np.float64))
        self.last = (V, G)
        self.diagonals.append((self._taken, np.diagonal(G, axis1=1, axis2=2).copy()))


class ModelOperator(LinearOperator):
    """The Hessian of a model's loss over a data set, as a symmetric operator.

    Built by the backends' ``hessian`` functions; not usually constructed directly.

    Args:
        adapter: the backend's functions for one batch.
        data: one batch (a tuple or dict) or a re-iterable of batches.
        reduction: ``"mean"`` (the loss function averages over a batch; batches are
            weighted by sample count) or ``"sum"`` (it sums; batch losses add up).
        comm: ``None`` or a communicator; each rank passes its own shard of the data.
        check_deterministic: evaluate every batch's loss (a non-finite one is named)
            and compare two identical products at construction.
        cross_check: check the product engine on the first batch (symmetry and the
            finite-difference referee, :func:`specops.checks.check_engine`); the result is
            :attr:`engine_check`.

    The construction checks run in one order on every backend: the loss of every batch
    (non-finite data is reported as such before anything else), the random-forward check
    (in the loss check's forward pass of the first batch), the backend's own engine comparisons, two identical products (a random product is
    reported as such), then the core's engine check. Rebuilding an operator for the same model and batch shapes within a process
    reuses the verdicts (:data:`specops.checks.VERDICTS`; re-verified every 25th build) and
    runs only the loss check.
    """

    def __init__(self, adapter: ModelAdapter, data: Any, *, reduction: str = "mean", comm: Any = None,
                 check_deterministic: bool = True, cross_check: bool = False,
                 first_batch_check: Callable[[Any], None] | None = None, _checked: bool = False) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        n = adapter.num_params
        if n == 0:
            raise ValueError("no trainable parameters selected: the Hessian would be empty")
        super().__init__((n, n), adapter.ops)
        self.adapter = adapter
        self.positive_semidefinite = adapter.positive_semidefinite
        self.reduction = reduction
        self.comm = as_comm(comm)
        self._data = self._batches_of(data)
        self.batch_sizes = self._on_every_rank(lambda: [adapter.batch_size(b) for b in self._iter()],
                                               "reading the batch sizes")
        # Collective checks: every rank sees every rank's values, so a mismatch raises on all
        # ranks alike and none is left waiting in the first Allreduce.
        self.comm.agree((n, self.ops.dtype.name), "the number of parameters and their dtype",
                        "every rank must hold the same model, dtype and parameter selection")
        self.num_samples = int(self.comm.allreduce_host(int(sum(self.batch_sizes))))
        if self.num_samples == 0:
            raise ValueError("the data holds no samples")
        self.num_matvecs = 0
        self._recorded: BatchForms | None = None
        self._whole: ModelOperator | None = None  # set by split_batches: the operator it split
        self.matvec_seconds = 0.0
        self.num_loss_evals = 0
        self.check_deterministic = check_deterministic
        self._first_batch_check = first_batch_check
        if not _checked:
            with adapter.keeping_random_state():
                self._construction_checks(check_deterministic, cross_check)

    # --- data ---------------------------------------------------------------------
    def decide(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (see :meth:`LinearOperator.decide`)."""
        return self.comm.bcast(value, 0)

    @staticmethod
    def _batches_of(data):
        if is_single_batch(data):
            return [data]
        if iter(data) is data:
            raise TypeError(
                "data is a one-shot iterator (a generator?); the Hessian is multiplied many "
                "times, so pass a list of batches, a DataLoader or another re-iterable"
            )
        return data

    def _iter(self) -> Iterator[Any]:
        return iter(self._data)

    def _weights(self):
        if self.reduction == "sum":
            return [1.0] * len(self.batch_sizes)
        return [b / self.num_samples for b in self.batch_sizes]

    @property
    def num_batches(self) -> int:
        """The number of batches over every rank (the batches data errors resample)."""
        return int(self.comm.allreduce_host(len(self.batch_sizes)))

    def _batch_forms(self, forms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This product's per-batch forms ``V^T H_b V``, weights ``w_b`` and sample counts over every rank.

        Args:
            forms: (B, k, k) this rank's batches' forms.

        Returns:
            Every rank's, concatenated in rank order, on every rank.
        """
        local = (forms, np.asarray(self._weights(), dtype=np.float64), np.asarray(self.batch_sizes, dtype=np.float64))
        parts = [p for p in self.comm.allgather(local) if len(p[1])]
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]

    def _accumulate(self, fn, V=None):
        """``sum_b w_b fn(index, batch)`` over local batches, then over ranks.

        While :meth:`recording_batches` is on and ``V`` is given, each batch's ``V^T fn(...)``
        (its own Hessian's quadratic forms, before weighting) is kept as well.
        """
        total = None
        count = 0
        forms = []
        record = self._recorded is not None and V is not None  # V: given only for a recorded product
        for i, (batch, w) in enumerate(zip(self._iter(), self._weights())):
            term = fn(i, batch)
            if record:
                forms.append(self.ops.to_numpy(self.ops.inner(self.ops.as_columns(V), self.ops.as_columns(term))))
                forms[-1] = np.asarray(forms[-1], dtype=np.float64).reshape(forms[-1].shape[-2:])
            if w != 1.0:  # one batch (or reduction="sum"): no extra operation per product
                term = term * w
            total = term if total is None else total + term
            count += 1
        if count != len(self.batch_sizes):
            raise RuntimeError(
                f"the data gave {count} batches, but {len(self.batch_sizes)} when the operator was "
                "built; pass data that yields the same batches every time"
            )
        if record and self._recorded is not None:
            self._recorded.add(V, forms, self)
        return total

    @contextlib.contextmanager
    def recording_batches(self, wanted: Collection[str] | None = None) -> Iterator[BatchForms]:
        """Within it, every product also keeps each batch's quadratic forms ``V^T H_b V``.

        ``H_b`` is batch ``b``'s own Hessian (of its mean loss, or its summed loss for
        ``reduction="sum"``), so that ``H = sum_b w_b H_b``. The products already compute
        every ``H_b V``; the forms cost one small inner product per batch.

        Args:
            wanted: record only the products labelled with one of these
                (:attr:`BatchForms.tag`, set by the algorithm); None: every product. On an
                operator from :meth:`split_batches`, the other products run over the whole
                batches (the sub-batches' products cost more where a larger batch uses the
                hardware better).

        Yields:
            :class:`BatchForms`, filled as products are made.
        """
        self._recorded = BatchForms(wanted)
        try:
            yield self._recorded
        finally:
            self._recorded = None

    # --- products -----------------------------------------------------------------
    def _recording(self) -> bool:
        """Whether this product's per-batch forms are recorded (:meth:`recording_batches`)."""
        return self._recorded is not None and self._recorded.take()

    def _matmat(self, V: Array) -> Array:
        record = self._recording()
        if self._whole is not None and not record:  # split for data errors, but no forms wanted
            self.num_matvecs += int(V.shape[1])
            return self._whole.matmat(V)
        return self._product(lambda i, b: self.adapter.hvp(i, b, V), tuple(V.shape), V if record else None)

    def matvec(self, v: Array) -> Array:
        """``H v`` for ``v`` of shape (n,).

        Goes through the adapter's single-vector product (no reshapes around a compiled
        product).
        """
        v = self._check(v, 1)
        record = self._recording()
        if self._whole is not None and not record:
            self.num_matvecs += 1
            return self._whole.matvec(v)
        return self._product(lambda i, b: self.adapter.hvp_vector(i, b, v), tuple(v.shape), v if record else None)

    def _product(self, fn: Callable[[int, Any], Array], shape: tuple, V: Array | None = None) -> Array:
        t0 = time.perf_counter()
        out = self._accumulate(fn, V)
        if out is None:  # a rank with an empty shard
            out = self.ops.zeros(shape)
        out = self.comm.allreduce(out, self.ops)
        self.num_matvecs += int(shape[1]) if len(shape) == 2 else 1
        self.matvec_seconds += time.perf_counter() - t0
        return out

    def loss_at(self, delta: Array | None = None) -> float:
        """The data loss (``reduction``-weighted over all samples) at ``theta + delta``.

        The model's parameters are the same afterwards.
        """
        if delta is not None:
            delta = self._check(delta, 1)
        local = 0.0
        for batch, w in zip(self._iter(), self._weights()):
            local += w * float(self.adapter.loss(batch, delta))
        self.num_loss_evals += 1
        return float(self.comm.allreduce_host(local))

    def gradient(self) -> Array:
        """The gradient of the data loss at the current parameters: native (n,)."""
        g = self._accumulate(lambda i, b: self.adapter.gradient(b))
        if g is None:
            g = self.ops.zeros((self.shape[0],))
        return self.comm.allreduce(g, self.ops)

    def params_vector(self) -> Array:
        """The current parameters, flattened in the order of :attr:`param_blocks`."""
        return self.adapter.params_vector()

    @property
    def num_params(self) -> int:
        """Number of parameters differentiated (the operator's size n)."""
        return self.shape[0]

    @property
    def layout(self) -> ParamLayout:
        """The names, shapes and offsets of the parameters in the flat vectors."""
        return self.adapter.layout

    @property
    def param_blocks(self) -> dict:
        """Parameter name -> slice of the flat vector."""
        return dict(self.layout.blocks)

    @property
    def param_shapes(self) -> dict:
        """Parameter name -> array shape."""
        return dict(self.layout.shapes)

    def unflatten(self, v: Array) -> dict:
        """A flat vector (n,) or a block (n, k) (e.g. all eigenvectors) as a dict.

        The dict maps parameter name -> array of the parameter's shape, ``(k, *shape)``
        for a block.
        """
        return self.adapter.unflatten(v)

    def flatten(self, arrays: dict | Iterable[Array]) -> Array:
        """Per-parameter arrays (a dict name -> array, or a sequence in order) as one flat vector.

        The result is a vector (n,), or a block (n, k) from arrays of shape ``(k, *shape)``.
        """
        return self.adapter.flatten(arrays)

    def as_params(self, v: Array) -> Any:
        """A flat vector (n,) or block (n, k) in the framework's own parameter structure.

        ``v`` is an eigenvector, all k eigenvectors, a diagonal, a landscape direction...
        The structure is a dict name -> tensor (PyTorch, NumPy), the ``params`` pytree
        (JAX), a list matching ``model.trainable_variables`` (Keras). Parameters left out
        of the selection are zeros there; a block adds a leading axis of length k to every
        array (``[j]`` is column ``j``).
        """
        return self.adapter.as_params(self.ops.asarray(v) if not self.ops.is_native(v) else v)

    @property
    def engine(self) -> str:
        """The Hessian-product engine in use (backend-specific, e.g. ``"cached_graph"``)."""
        return self.adapter.engine

    def restrict(self, index: Any) -> LinearOperator:
        """The Hessian block of a subset of parameters.

        Args:
            index: parameter names or glob patterns (``"layer1.*"``): a new model
                operator that differentiates only those parameters; or coordinates
                (slices, index arrays) as for any operator.

        Returns:
            A :class:`ModelOperator` for names, else a restricted operator.
        """
        if isinstance(index, str) or (
            isinstance(index, (list, tuple)) and index and all(isinstance(s, str) for s in index)
        ):
            return self._checked_like(self.adapter.subset(self.layout.select(index)), self._data)
        return super().restrict(index)

    def _checked_like(self, adapter: ModelAdapter, data: Any) -> ModelOperator:
        """An operator of ``adapter`` over ``data`` that keeps this one's checked engine (no checks rerun)."""
        if self.engine_check is not None:  # this operator's verdict holds for its blocks and its samples
            adapter.adopt(self.engine_check)
            adapter.engine_check = self.engine_check
        return ModelOperator(adapter, data, reduction=self.reduction, comm=self.comm,
                             check_deterministic=False, _checked=True)

    def split_batches(self, parts: int) -> ModelOperator:
        """The same operator over the data with every batch split into ``parts`` sub-batches.

        For data errors from data given as one batch (:mod:`specops.data_error`): the products
        are the same sums over the samples, in more terms. A batch is cut along the first axis
        of every array with one row per sample (:func:`specops.reduction.split_batch`), into
        sizes that differ by at most one; a batch of fewer samples gives one per sample. The
        cut is checked on the loss: the batch's loss must be the ``reduction`` of its
        sub-batches' (a loss that is no mean or sum over samples, random layers with
        ``random_layers="fixed"``, arrays not cut by sample cannot be split).

        Args:
            parts: sub-batches per batch.

        Returns:
            A :class:`ModelOperator` with the same model, parameters, reduction, communicator and
            engine verdict (its checks are not rerun). Its products run over the sub-batches
            only while their per-batch forms are recorded (:meth:`recording_batches`), else
            over this operator's batches: the same products to rounding.

        Raises:
            ValueError: a batch cannot be split, or its loss is not the ``reduction`` of its
                sub-batches' losses, or the operator is a Monte-Carlo Fisher (its sampled labels
                depend on the batches); the message says to pass the data as several batches.
        """
        from specops.checks import machine_epsilon
        from specops.reduction import split_batch

        parts = positive_int("parts", parts)
        adapter = self.adapter
        fix = "pass the data as several batches (a list of batches, or a DataLoader)"

        def split() -> list:
            pieces = []
            for batch, size in zip(self._iter(), self.batch_sizes):
                sizes = [len(s) for s in np.array_split(np.arange(size), min(parts, size))]
                rest, left, cut = batch, size, []
                for m in sizes[:-1]:
                    halves = split_batch(rest, left, m)
                    if halves is None:
                        raise ValueError(f"a batch of {size} samples holds no array with one row per sample to "
                                         f"split into sub-batches: {fix}")
                    cut.append(halves[0])
                    rest, left = halves[1], left - m
                cut.append(rest)
                found = [adapter.batch_size(c) for c in cut]
                if found != sizes:
                    raise ValueError(f"splitting a batch of {size} samples into sub-batches of {sizes} samples gave "
                                     f"{found}: {fix}")
                whole, losses = float(adapter.loss(batch)), [float(adapter.loss(c)) for c in cut]
                combined = sum(losses) if self.reduction == "sum" else float(np.dot(sizes, losses)) / size
                rtol = 1e3 * machine_epsilon(adapter.compute_dtype or np.dtype(self.ops.dtype).name)
                if not abs(whole - combined) <= rtol * max(abs(whole), abs(combined), np.finfo(np.float64).tiny):
                    raise ValueError(
                        f"the loss of a batch ({whole:.8g}) is not the {self.reduction} of its {len(cut)} sub-batches' "
                        f"losses ({combined:.8g}), so the batch cannot be split into sub-batches (a loss that is not a "
                        f"{self.reduction} over samples, random layers with a fixed mask per batch): {fix}")
                pieces.extend(cut)
            return pieces

        if getattr(adapter, "kind", None) == "mc":
            raise ValueError("the Monte-Carlo labels of fisher(estimator='mc') are drawn per batch, so sub-batches "
                             f"would draw other labels and make another operator than this one: {fix}")
        op = self._checked_like(adapter.subset(list(self.layout.names)),
                                self._on_every_rank(split, "splitting the batches into sub-batches"))
        op._whole = self
        return op

    @property
    def is_split(self) -> bool:
        """Whether this operator is another's batches split into sub-batches (:meth:`split_batches`)."""
        return self._whole is not None

    # --- checks -------------------------------------------------------------------
    @property
    def engine_check(self) -> Any:
        """The construction check of the engine (:class:`specops.checks.EngineCheck`), or None."""
        return self.adapter.engine_check

    def settings(self) -> dict:
        """The operator's engine and its construction check, for results' settings."""
        out: dict[str, Any] = {"engine": self.engine}
        if self.engine_check is not None:
            out["engine_check"] = self.engine_check.settings()
        return out

    def __repr__(self) -> str:
        check = f" [{self.engine_check}]" if self.engine_check is not None else f" engine={self.engine}"
        return f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.ops}{check}>"

    def _construction_checks(self, deterministic: bool, cross_check: bool) -> None:
        from specops import checks

        checks_first = deterministic or cross_check
        if checks_first:  # first: NaN data is reported as NaN data, before any product
            self._check_losses(random_forward=True)
        first = next(self._iter(), None) if self.batch_sizes else None
        found = None if first is None else self.adapter.verdict_key(first)
        key = None if found is None else (found[1], self._data_identity(), deterministic, cross_check,
                                          self.comm.size)
        carried = None if found is None else checks.VERDICTS.get(found[0], key)
        if self.comm.size > 1 and not all(self.comm.allgather(carried is not None)):
            carried = None  # the checks are collective: every rank runs them, or none
        if carried is not None:
            self.adapter.adopt(carried)
            self.adapter.engine_check = carried
            return

        adapter = self.adapter

        def skipped(reason: str = "cross_check=False") -> Any:
            return checks.EngineCheck(adapter.requested_engine, adapter.engine, "skipped", reason)

        sample = None if first is None or not cross_check else adapter.check_batch(first)

        def first_checks() -> None:
            if first is not None:
                if not checks_first:  # else checked in the loss check's forward pass
                    adapter.check_random_forward(first)
                if self._first_batch_check is not None:  # the backend's check of the loss (its reduction)
                    self._first_batch_check(first)
                if cross_check:
                    adapter.cross_check(sample)

        def engine_check() -> Any:
            if sample is None:
                return skipped()
            try:
                return checks.check_engine(adapter, sample, switch=False)
            except NotImplementedError:  # a backend without the primitives
                return skipped("the backend has no finite-difference referee")

        self._on_every_rank(first_checks, "checking the first batch")
        if deterministic:  # before the engine check: a random product would confuse its referee
            self._check_deterministic()
        check = self._on_every_rank(engine_check, "checking the product engine")
        if self.comm.size > 1:  # rank 0's choice on every rank
            check = dataclasses.replace(check, engine=self.decide(check.engine))
        if check.engine == checks.FINITE_DIFFERENCE and adapter.engine != check.engine:
            adapter.use_finite_differences()
        adapter.engine_check = check
        if found is not None:
            checks.VERDICTS.put(found[0], key, check)

    def _data_identity(self) -> tuple[int, ...]:
        """The objects the data is made of (a loader, or a single batch's arrays), by identity."""
        data = self._data
        if isinstance(data, list) and len(data) == 1 and is_single_batch(data[0]):
            batch = data[0]
            return tuple(id(x) for x in (batch.values() if isinstance(batch, dict) else batch))
        return (id(data),)

    def _on_every_rank(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on this rank; if it raises on any rank, raise on every rank.

        A data shard that does not fit the model (wrong shapes, a missing key) fails on its
        own rank only; the others would wait in the next collective. The failures are
        gathered so that every rank raises the same error, naming the ranks and causes.
        """
        if self.comm.size == 1:
            return fn()
        error, failure = None, None
        try:
            value = fn()
        except Exception as err:  # re-raised below on every rank, with this rank's as cause
            error, value, failure = err, None, f"{type(err).__name__}: {err}"
        failures = [(r, f) for r, f in enumerate(self.comm.allgather(failure)) if f is not None]
        if failures:
            causes = "; ".join(f"rank {r}: {f}" for r, f in failures[:4])
            raise RuntimeError(
                f"{what} failed on {len(failures)} of {self.comm.size} ranks ({causes}); every rank "
                "must hold data of the layout the model expects"
            ) from error
        return value

    def _check_losses(self, random_forward: bool = False) -> None:
        """Raise if a batch's loss is not finite; then, with ``random_forward``, if a pass is random.

        The random-forward check (:meth:`ModelAdapter.check_random_forward`) runs in the first
        batch's forward pass of this check; its error is raised after the non-finite losses.
        """

        def losses():
            values, random = [], None
            for i, batch in enumerate(self._iter()):
                value = None
                if i == 0 and random_forward:
                    try:
                        value = self.adapter.check_random_forward(batch)
                    except NonDeterministicError as err:  # raised after the non-finite losses
                        random = err
                values.append(float(self.adapter.loss(batch)) if value is None else float(value))
            return values, random

        values, random = self._on_every_rank(losses, "evaluating the loss of every batch")
        bad = [f"batch {i} (loss {value})" for i, value in enumerate(values) if not np.isfinite(value)]
        if self.comm.size > 1:  # gathered, so that every rank raises the same error
            bad = [f"{b} on rank {r}" for r, rank_bad in enumerate(self.comm.allgather(bad)) for b in rank_bad]
        if bad:
            raise NonFiniteError(
                f"the loss is not finite for {', '.join(bad[:5])}"
                f"{' and more' if len(bad) > 5 else ''}; fix the data or the model "
                "(e.g. a learning rate that diverged, log of zero) before taking its Hessian"
            )
        if random_forward and (random is not None or self.comm.size > 1):
            def reraise() -> None:
                if random is not None:
                    raise random

            self._on_every_rank(reraise, "checking the first batch")

    def _check_deterministic(self):
        ops, n = self.ops, self.shape[0]
        v = ops.random(n, [0], 0, distribution="normal", stream="determinism")
        a = self.matmat(v)
        if self.adapter.replays_exactly():
            # a second product would replay the same cached computation: check only that every
            # batch is the one it was built from (a shuffling loader raises here)
            for i, batch in enumerate(self._iter()):
                self.adapter.check_same_batch(i, batch)
            b = a
        else:
            b = self.matmat(v)
        self.num_matvecs -= 2
        if not (ops.all_finite(a) and ops.all_finite(b)):
            raise NonFiniteError(
                "the Hessian-vector product is not finite although the loss is; look for "
                "operations with undefined second derivatives (e.g. sqrt at 0)"
            )
        diff = ops.norm(a - b)
        scale = max(ops.norm(a), np.finfo(np.float64).tiny)
        rtol = 1e-4 if ops.dtype == np.float32 else 1e-9
        if diff > rtol * scale:
            hints = self.adapter.determinism_hints() or [
                "random layers (dropout) active, batch statistics in training mode, or data that "
                "changes between passes (augmentation, sampling)"
            ]
            raise NonDeterministicError(
                f"two products with the same vector differ by {diff / scale:.3g} (relative), so the "
                "Hessian is not a fixed matrix. Likely causes: " + "; ".join(hints)
                + ". Pass check_deterministic=False to skip this check."
            )
