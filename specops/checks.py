"""The construction check of a model operator's product engine, written once for every backend.

A backend's exact product engines (reverse-over-reverse, forward-over-reverse, ``jvp`` of
``grad``) differentiate the framework's derivative formulas; a custom backward that is
right for gradients but not twice differentiable (``@once_differentiable``, a
``stop_gradient`` inside a ``custom_vjp`` backward) makes them wrong without an error.
At construction :func:`check_engine` tests the engine in use on the first batch against
two things that share no second-derivative code with it:

- **symmetry**: ``w . Hv`` against ``v . Hw`` for two probes; a Hessian is symmetric, so
  a difference beyond rounding convicts the engine by itself;
- **the referee**: central differences of gradients along ``v`` at the steps ``h`` and
  ``2h``, Richardson-extrapolated. Their difference (the *spread*) is the referee's own
  error estimate. The referee is *consistent* when the spread is small (a smooth loss);
  at the kinks of ReLU-like layers or the jumps of a straight-through estimator the two
  steps disagree and it cannot decide anything.

The :class:`EnginePolicy` turns the measurements into one inspectable decision
(:class:`EngineCheck`): the engine agrees (within ``max(10 x spread, rounding)``), the
referee cannot tell (inconsistent; the engine is kept, as for ReLU networks), or the
engine is wrong (decisively off a consistent referee, or not symmetric). A symmetric engine
off a consistent referee that is itself not symmetric means the gradient is no gradient (a
differentiated parameter read through ``stop_gradient``): no Hessian exists and it raises. A wrong engine
requested as ``"auto"`` is replaced by finite differences with a warning; an explicitly
requested one raises, naming ``engine="finite_difference"``.

Probes come from :mod:`specops.random` (stream ``"engine_check"``), so every backend
checks with the same vectors. Verdicts that cannot change between rebuilds of an
operator for the same model (see :class:`VerdictCache`) are carried over within a
process.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from specops.operator import NonFiniteError
from specops.ops import Array, VectorOps

Verdict = Literal["agree", "inconclusive", "wrong", "skipped"]

FINITE_DIFFERENCE = "finite_difference"

# Products of an engine agree with exact arithmetic within this (relative), by the lowest
# precision the loss is computed in.
ROUNDING = {"bfloat16": 1e-1, "float16": 2e-2, "float32": 2e-3, "float64": 1e-7}
# The referee's spread above which it cannot convict an engine (kinks crossed, rounding).
CONSISTENT = 0.1
# An engine off the referee by more than this many times its spread is decisively wrong.
MARGIN = 10.0


def rounding(dtype: Any) -> float:
    """The relative accuracy of products computed in ``dtype`` (a name or NumPy dtype)."""
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
    if name not in ROUNDING:
        raise ValueError(f"no rounding level for dtype {name!r}; known: {', '.join(ROUNDING)}")
    return ROUNDING[name]


def finite_difference_products(gradient_at: Callable[[Array], Array], V: Array, ops: VectorOps, *,
                               eps: float, scale: float, richardson: bool = False
                               ) -> tuple[Array, np.ndarray | None]:
    """Central differences of gradients along each column of ``V`` (an engine and the referee).

    Column ``v`` is stepped by ``h v / ||v||`` with ``h = eps**(1/3) * scale``: the step that
    balances the truncation error ``O(h^2)`` against the rounding error ``O(eps / h)`` of the
    gradients (Stan's ``finite_diff_hessian_times_vector_auto`` steps ``cbrt(eps)`` along the
    normalized vector; here scaled by the parameters' size). ``richardson=True`` takes
    ``h = eps**(1/5) * scale`` and combines the steps ``h`` and ``2h`` as
    ``R = (4 D(h) - D(2h)) / 3`` (truncation error ``O(h^4)``), four gradients per column.

    Args:
        gradient_at: ``delta -> gradient of the loss at theta + delta`` (native (n,)).
        V: native (n, k) directions.
        ops: the vector operations of ``V``.
        eps: the machine epsilon of the gradients' precision.
        scale: ``max(1, rms(theta))``: the size of the parameters.
        richardson: extrapolate two steps.

    Returns:
        ``(HV, spreads)``: the products (n, k) and, with Richardson, per column
        ``||D(h) - D(2h)||`` (absolute, in the units of ``HV``): the referee's own error
        estimate (``None`` without Richardson).

    Raises:
        specops.NonFiniteError: a gradient along the way is not finite.
    """
    h = eps ** (1 / 5 if richardson else 1 / 3) * scale
    columns, spreads = [], []
    for j in range(int(V.shape[1])):
        v = V[:, j]
        norm = ops.norm(v)
        if norm == 0.0:
            columns.append(v * 0)
            spreads.append(0.0)
            continue
        u = v / norm

        def central(step: float) -> Array:
            plus, minus = gradient_at(u * step), gradient_at(u * -step)
            if not (ops.all_finite(plus) and ops.all_finite(minus)):
                raise NonFiniteError(
                    "the gradient is not finite near the parameters (at a step of "
                    f"{step:.2g} along a probe); fix the data or the model before taking its Hessian")
            return (plus - minus) / (2 * step)

        fine = central(h)
        if richardson:
            coarse = central(2 * h)
            spreads.append(ops.norm(fine - coarse) * norm)
            fine = (fine * 4 - coarse) / 3
        columns.append(fine * norm)
    HV = ops.concat([ops.as_columns(c) for c in columns], 1)
    return HV, (np.asarray(spreads) if richardson else None)


def symmetry_error(ops: VectorOps, V: Array, HV: Array) -> float:
    """``|w . Hv - v . Hw|`` relative to the size of such forms, for ``V = [v, w]``.

    The scale is ``(||Hv|| ||w|| + ||Hw|| ||v||) / (2 sqrt(n))``: the size of ``w . Hv`` for
    random probes, so that an asymmetry is not diluted by the dimension; rounding errors of
    the products are at most ``rounding`` times it.
    """
    v, w, Hv, Hw = V[:, 0], V[:, 1], HV[:, 0], HV[:, 1]
    n = int(V.shape[0])
    scale = (ops.norm(Hv) * ops.norm(w) + ops.norm(Hw) * ops.norm(v)) / (2 * math.sqrt(n))
    if scale == 0.0:
        return 0.0
    return abs(ops.dot(w, Hv) - ops.dot(v, Hw)) / scale


@dataclasses.dataclass
class EngineCheck:
    """What the construction check measured and which engine it chose, and why.

    Attributes:
        requested: the engine the user asked for (``"auto"`` or a name).
        engine: the engine in use after the check.
        verdict: ``"agree"``, ``"inconclusive"`` (the referee is not consistent: kinks),
            ``"wrong"`` (the engine was replaced, or raised) or ``"skipped"``.
        reason: one sentence saying why.
        disagreement: ``||Hv - R|| / ||R||`` of the checked engine against the referee ``R``.
        referee_spread: ``||D(h) - D(2h)|| / ||R||``, the referee's own error estimate.
        threshold: the disagreement above which the engine is wrong:
            ``max(10 x spread, rounding)``.
        symmetry: ``|w . Hv - v . Hw|`` relative (see :func:`symmetry_error`).
        symmetry_threshold: the symmetry error above which the engine is wrong.
        carried_over: the verdict was reused from an earlier build for the same model.
    """

    requested: str
    engine: str
    verdict: Verdict
    reason: str
    disagreement: float | None = None
    referee_spread: float | None = None
    threshold: float | None = None
    symmetry: float | None = None
    symmetry_threshold: float | None = None
    carried_over: bool = False

    def settings(self) -> dict:
        """The check as a flat dict of host values, for results' ``settings``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def __str__(self) -> str:
        parts = [f"engine={self.engine}" + (f" (requested {self.requested})" if self.requested != self.engine
                                             else ""), f"check={self.verdict}"]
        if self.disagreement is not None:
            parts.append(f"off finite differences {self.disagreement:.2g} (threshold {self.threshold:.2g})")
        if self.symmetry is not None:
            parts.append(f"asymmetry {self.symmetry:.2g}")
        if self.carried_over:
            parts.append("carried over")
        return ", ".join(parts)


@dataclasses.dataclass
class EnginePolicy:
    """The decision rule of the construction check; one object, inspectable.

    Attributes:
        rounding: relative accuracy of the products (see :func:`rounding`).
        margin: an engine off the referee by more than ``margin`` times the referee's
            spread (and more than ``rounding``) is wrong.
        consistent: the referee convicts only when its spread is below this.
    """

    rounding: float
    margin: float = MARGIN
    consistent: float = CONSISTENT

    @property
    def symmetry_threshold(self) -> float:
        """An asymmetry above this convicts the engine (ten times the rounding level)."""
        return 10 * self.rounding

    def decide(self, requested: str, engine: str, *, disagreement: float, spread: float,
               symmetry: float) -> EngineCheck:
        """The verdict on ``engine`` from the measured disagreement, spread and asymmetry.

        Returns:
            The :class:`EngineCheck`; ``engine`` is :data:`FINITE_DIFFERENCE` when an
            ``"auto"`` engine was found wrong.

        Raises:
            ValueError: an explicitly requested engine is wrong (the message names
                ``engine="finite_difference"``).
        """
        threshold = max(self.margin * spread, self.rounding)
        common: dict[str, Any] = dict(disagreement=disagreement, referee_spread=spread, threshold=threshold,
                      symmetry=symmetry, symmetry_threshold=self.symmetry_threshold)
        consistent = spread <= self.consistent
        asymmetric = symmetry > self.symmetry_threshold
        off = consistent and disagreement > threshold
        if not (asymmetric or off):
            if consistent:
                return EngineCheck(requested, engine, "agree", "the engine agrees with finite differences "
                                   "within their error and is symmetric", **common)
            return EngineCheck(requested, engine, "inconclusive", (
                f"finite differences at two steps disagree with each other by {spread:.2g} (kinks of "
                "ReLU-like layers or jumps crossed), so they cannot judge the engine; kept"), **common)
        why = []
        if off:
            why.append(f"its products differ from central differences of gradients by {disagreement:.2g} "
                       f"(relative), while those agree with themselves at two steps to {spread:.2g} "
                       f"(threshold {threshold:.2g})")
        if asymmetric:
            why.append(f"it is not symmetric (|w.Hv - v.Hw| is {symmetry:.2g} of the forms' size, "
                       f"rounding below {self.symmetry_threshold:.1g})")
        message = (f"the Hessian-vector products of engine {engine!r} are wrong: " + " and ".join(why)
                   + ". Some layer's backward is not twice differentiable (a custom autograd function "
                   "with @once_differentiable, a stop_gradient inside a custom backward)")
        if requested != "auto":
            raise ValueError(f"{message}. Pass engine='finite_difference' (central differences of "
                             "gradients, which need no second derivatives), or cross_check=False to keep "
                             f"engine={engine!r}")
        warnings.warn(f"{message}; using engine='finite_difference' instead", RuntimeWarning, stacklevel=4)
        return EngineCheck(requested, FINITE_DIFFERENCE, "wrong", "; ".join(why), **common)


def check_engine(adapter: Any, batch: Any, *, seed: int = 0, switch: bool = True) -> EngineCheck:
    """Check the adapter's engine in use on ``batch``; switch or raise as the policy says.

    The adapter supplies the primitives (see :class:`specops.model.ModelAdapter`):
    ``check_product(batch, V)`` (the engine in use, on one batch, nothing cached),
    ``gradient_at(batch, delta)``, ``requested_engine``, ``engine``, ``compute_dtype``
    (None: the vectors' dtype) and ``use_finite_differences()``; optionally
    ``engines_agree``: the relative difference of two exact engines that share no
    second-derivative code, measured by the backend (PyTorch's reverse-over-reverse and
    forward-over-reverse), which stands in for the referee when the operator is symmetric.
    Costs one two-column product, and four gradients of the batch for the referee.
    ``switch=False`` leaves the adapter's engine alone (the caller applies the decision, as
    rank 0's on every rank).

    Raises:
        specops.NonFiniteError: the products or gradients are not finite.
        ValueError: an explicitly requested engine is wrong; or a symmetric engine is off a
            consistent referee that is itself not symmetric (checked then, two more
            gradients' worth): the gradient is not a gradient field (a differentiated
            parameter read through ``stop_gradient``), so no Hessian exists.
    """
    ops: VectorOps = adapter.ops
    requested, engine = adapter.requested_engine, adapter.engine
    if engine == FINITE_DIFFERENCE:
        return EngineCheck(requested, engine, "skipped", "finite differences need no second derivatives")
    n = adapter.num_params
    V = ops.random(n, [0, 1], seed, distribution="normal", stream="engine_check")
    HV = adapter.check_product(batch, V)
    if not ops.all_finite(HV):
        raise NonFiniteError(
            "the Hessian-vector product is not finite although the loss is; look for operations "
            "with undefined second derivatives (e.g. sqrt at 0)")
    dtype = adapter.compute_dtype or ops.dtype
    policy = EnginePolicy(rounding(dtype))
    symmetry = symmetry_error(ops, V, HV)
    agreed = getattr(adapter, "engines_agree", None)
    if agreed is not None and symmetry <= policy.symmetry_threshold:
        # two exact engines sharing no second-derivative code agree: no referee needed
        return EngineCheck(requested, engine, "agree", f"two exact engines agree to {agreed:.2g}",
                           disagreement=agreed, threshold=policy.rounding, symmetry=symmetry,
                           symmetry_threshold=policy.symmetry_threshold)
    theta = adapter.params_vector()
    scale = max(1.0, ops.norm(theta) / max(n, 1) ** 0.5)
    eps = machine_epsilon(dtype)
    R, spreads = finite_difference_products(lambda d: adapter.gradient_at(batch, d), V[:, :1], ops,
                                            eps=eps, scale=scale, richardson=True)
    size = max(ops.norm(R[:, 0]), float(np.finfo(np.float64).tiny))
    assert spreads is not None
    disagreement, spread = ops.norm(HV[:, 0] - R[:, 0]) / size, float(spreads[0]) / size
    if (symmetry <= policy.symmetry_threshold and spread <= policy.consistent
            and disagreement > max(policy.margin * spread, policy.rounding)):
        # a symmetric engine off a consistent referee: before convicting it, is the referee symmetric?
        R2, _ = finite_difference_products(lambda d: adapter.gradient_at(batch, d), V[:, 1:2], ops,
                                           eps=eps, scale=scale, richardson=True)
        referee = symmetry_error(ops, V, ops.concat([R[:, :1], R2], 1))
        if referee > max(policy.symmetry_threshold, policy.margin * spread):
            raise ValueError(
                f"the loss's gradient is not the gradient of any function: central differences of it are not "
                f"symmetric (|w.Rv - v.Rw| is {referee:.2g} of the forms' size), so no Hessian exists and no engine "
                "can give one. The usual cause is a parameter the loss reads through stop_gradient / detach (a "
                "buffer, a frozen scale) but that is differentiated: leave it out with wrt= (or params= / "
                "variables=), or make it a non-trainable leaf")
    check = policy.decide(requested, engine, disagreement=disagreement, spread=spread, symmetry=symmetry)
    if switch and check.engine == FINITE_DIFFERENCE:
        adapter.use_finite_differences()
    return check


def machine_epsilon(dtype: Any) -> float:
    """The machine epsilon of ``dtype`` (a name, a NumPy or a framework dtype)."""
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
    return _EPS[name]


_EPS = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -23, "float64": 2.0 ** -52}


def identity(obj: Any) -> Any:
    """A hashable identity of a loss function that survives re-creating it the same way.

    A bound method is its instance and function; a function (a lambda written inline in a
    training loop is a new object at every step) is its code and the objects it closes over;
    an object with plain settings (a loss object such as ``nn.CrossEntropyLoss()``) is its
    type, its settings of plain types and the identities of its arrays; anything else its ``id``.
    """
    owner, function = getattr(obj, "__self__", None), getattr(obj, "__func__", None)
    if owner is not None and function is not None:
        return ("method", id(owner), id(function))
    code = getattr(obj, "__code__", None)
    if code is not None:
        cells = tuple(id(c.cell_contents) for c in (getattr(obj, "__closure__", None) or ()))
        return ("function", id(code), cells, tuple(map(id, getattr(obj, "__defaults__", None) or ())))
    settings = getattr(obj, "__dict__", None)
    if settings is None:
        return ("object", id(obj))
    plain = tuple(sorted((k, v) for k, v in settings.items() if isinstance(v, (bool, int, float, str, type(None)))))
    arrays = tuple(sorted((k, id(v)) for k, v in settings.items() if hasattr(v, "shape")))
    buffers = tuple(id(b) for b in obj.buffers()) if callable(getattr(obj, "buffers", None)) else ()
    return ("object", type(obj).__qualname__, plain, arrays, buffers)


def owner_of(obj: Any) -> Any:
    """The object to hold a verdict by: a bound method's instance (the method itself is made afresh)."""
    return getattr(obj, "__self__", None) if getattr(obj, "__func__", None) is not None else obj


def engine_settings(A: Any) -> dict:
    """``{"engine": ..., "engine_check": {...}}`` of a model-backed operator (or of one inside ``A``).

    Results put it in their ``settings``, so the engine used and what its construction check
    measured travel with every number (and into the report). Empty for other operators.
    """
    for part in (A, getattr(A, "A", None), getattr(A, "B", None), getattr(A, "base", None)):
        check = getattr(part, "engine_check", None)
        if isinstance(check, EngineCheck):
            return {"engine": check.engine, "engine_check": check.settings()}
    return {}


class VerdictCache:
    """Construction verdicts carried over between rebuilds of an operator for one model.

    A tracker rebuilds the operator at every step; the model's structure, the engine's
    verdict, its random layers and its dtype cannot change between steps, so the checks
    that establish them run on the first build and every ``every``-th rebuild only. Entries
    are held per model object (weakly: a model that is freed drops its entries) and keyed by
    the backend's description of everything the verdict depends on.

    Args:
        every: re-run the full checks on every ``every``-th build of one key.
    """

    def __init__(self, every: int = 25) -> None:
        self.every = int(every)
        self._entries: weakref.WeakKeyDictionary[Any, dict[Any, list[Any]]] = weakref.WeakKeyDictionary()

    def get(self, owner: Any, key: Any) -> EngineCheck | None:
        """The verdict stored for ``(owner, key)`` unless it is due for re-verification."""
        try:
            entry = self._entries.get(owner, {}).get(key)
        except TypeError:  # an owner that cannot be weakly referenced: nothing carried over
            return None
        if entry is None:
            return None
        entry[1] += 1
        if entry[1] % self.every == 0:
            return None
        return dataclasses.replace(entry[0], carried_over=True)

    def put(self, owner: Any, key: Any, check: EngineCheck) -> None:
        """Store ``check`` for ``(owner, key)``."""
        try:
            entries = self._entries.setdefault(owner, {})
        except TypeError:
            return
        count = entries[key][1] if key in entries else 0
        entries[key] = [check, count]

    def clear(self) -> None:
        """Forget every verdict (the next builds run every check)."""
        self._entries = weakref.WeakKeyDictionary()


VERDICTS = VerdictCache()
