"""Stochastic trace estimation: Hutchinson, Hutch++, XTrace and an adaptive choice.

- Hutchinson (1989), Girard (1989): ``tr(A) ~ mean_j z_j^T A z_j``.
- Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace of a rank-``s`` sketch of
  ``A`` exactly, Hutchinson on the rest.
- XTrace (Epperly, Tropp & Webber 2024): every probe serves both as sketch and as
  Hutchinson probe, with a leave-one-out ("exchangeable") average.
- Krylov Hutch++ (the block Krylov sketch of Chen & Hallman 2023's Krylov-aware
  estimators, sized adaptively as in Persson, Cortinovis & Kressner 2022's A-Hutch++):
  ``tr(Q^T A Q)`` of a block Krylov basis, whose products are the basis's own, grown while a
  few pilot probes say a block pays for itself; Hutchinson outside it.
- ``"auto"`` (the default): XTrace when a sketch of the operator captures most of it,
  Hutchinson when its spectrum is too flat for a sketch to pay (decided from the sketch's
  own products, which both estimators use; docs/algorithms.md); with ``rtol``, an XTrace
  first round that misses it goes on as Krylov Hutch++ from that round's basis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import numpy as np

from specops.checks import engine_settings
from specops import _checks
from specops.data_error import model_operator as data_error_model
from specops.data_error import MIN_PROBES, probes_pin_data_error, trace_stderr
from specops.operator import LinearOperator, OperatorLike
from specops.ops import Array, VectorOps
from specops.progress import bar as progress_bar
from specops.progress import show
from specops.random import Distribution, check_distribution, check_seed
from specops.results import Result

#: The trace estimators (``"auto"``: XTrace, Hutchinson or, with ``rtol``, Krylov Hutch++; see :func:`trace`).
TraceMethod = Literal["auto", "hutchinson", "hutch++", "xtrace", "krylov-hutch++"]
METHODS: tuple[TraceMethod, ...] = get_args(TraceMethod)
#: Probes taken before a relative-standard-error (``rtol``) stop is trusted.
MIN_PROBES_FOR_RTOL = 10
#: ``"auto"`` keeps XTrace when the leave-one-out sketch leaves less than this share of
#: ``||A Omega||_F^2``: below it XTrace's variance bound beats Hutchinson's with the same budget.
AUTO_XTRACE_BELOW = 0.5
#: ``"auto"`` with ``rtol`` and at least this budget goes on with Krylov Hutch++ where it would
#: keep XTrace (below it, three basis blocks, pilots and ten probes of the rest crowd the
#: budget; docs/algorithms.md).
AUTO_KRYLOV_FROM = 100

#: Length-n vectors a sketch holds per probe (XTrace: ``Omega``, ``Y``, ``Q``, ``A Q`` and a
#: temporary; Hutch++: ``Q``, ``A Q`` and a temporary; Krylov Hutch++: its basis buffer, which
#: doubles when full, and the old one while it is copied, per basis vector or pilot), on top of
#: two chunks of probes. The constants of the memory model (docs/scale.md,
#: ``benchmarks/memory_model.py``).
SKETCH_VECTORS = {"xtrace": 5, "hutch++": 3, "krylov-hutch++": 3}


def sketch_capacity(ops: VectorOps, n: int, chunk_size: int, method: str) -> int:
    """The most probes a ``method`` sketch of length-``n`` vectors keeps in half the free memory."""
    vectors = ops.free_memory() // 2 // (n * np.dtype(ops.dtype).itemsize)
    return max(0, int((vectors - 2 * chunk_size) // SKETCH_VECTORS[method]))


def _too_large(method: str, probes: int, capacity: int, n: int) -> str:
    return (f"a {method} sketch of {probes} probes of n = {n} does not fit in half the free memory "
            f"(room for {capacity} probes)")
#: Groups of probes in XTrace's jackknife standard error (leave-one-out up to this many
#: probes); fewer past ``JACKKNIFE_LARGE`` probes, where each group costs O(m^3) host flops.
JACKKNIFE_GROUPS, JACKKNIFE_LARGE = 20, 400


@dataclasses.dataclass
class TraceResult(Result):
    """A trace estimate.

    Attributes:
        estimate: the estimate of ``tr(A)``.
        stderr: its standard error over the probes (0 when the estimate is exact).
        num_matvecs: operator-vector products used.
        settings: method, budget, seed, probe distribution, ``rtol``; for ``"auto"`` also
            ``estimator`` (the one chosen) and ``sketch_residual`` (the share of
            ``||A Omega||_F^2`` a leave-one-out sketch leaves, which decided it).
        data_stderr: with ``data_error=True``, the standard error over data resampling (the
            batches' part; ``stderr`` is the probes' part, and the two add in quadrature).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    settings: dict
    data_stderr: float | None = None


def probe_chunks(A: LinearOperator, mul: Callable[[Array], Array], num: int, seed: int, distribution: Distribution,
                 stream: str, chunk_size: int, transform: Callable[[Array], Array] | None = None,
                 start: int = 0) -> Iterator[tuple[Array, Array]]:
    """Yield ``(Z, A Z)`` for probe columns ``start..num-1`` of one seeded stream, ``chunk_size`` at a time.

    This is the shared probe loop of the trace and diagonal estimators.

    Args:
        A: the operator; its ``ops`` draw the probes.
        mul: the product ``Z -> A Z`` (usually a counting :class:`specops._checks.Products`).
        num: probe columns in the stream (the last one is ``num - 1``).
        seed: seed of the stream.
        distribution: probe distribution, ``"rademacher"`` or ``"normal"``.
        stream: name of the stream, so that estimators draw independent probes.
        chunk_size: probe columns per block.
        transform: applied to each probe block before its product (e.g. a projection).
        start: the first probe column.

    Yields:
        ``(Z, A Z)`` for each block of at most ``chunk_size`` probe columns.
    """
    n = A.shape[0]
    for j0 in range(start, num, chunk_size):
        Z = A.ops.random(n, range(j0, min(num, j0 + chunk_size)), seed, distribution=distribution, stream=stream)
        if transform is not None:
            Z = transform(Z)
        yield Z, mul(Z)


def _forms(ops: VectorOps, Z: Array, AZ: Array) -> np.ndarray:
    """The quadratic forms ``z_j^T (A z_j)``, summed in float64 on the host.

    In float32 a device sum of ``n`` terms rounds each form by about ``eps * |z^T A z|``;
    with a large mean diagonal that rounding exceeds the probes' own spread and is partly
    shared by all probes, so the standard error would understate the error.
    """
    if ops.dtype == np.float64:
        return ops.column_dots(Z, AZ)
    return ops.host_column_dots(Z, AZ)


def _mean_stderr(samples: np.ndarray) -> tuple[float, float]:
    m = len(samples)
    mean = float(np.mean(samples))
    return mean, (float(np.std(samples, ddof=1) / np.sqrt(m)) if m > 1 else float("inf"))


def _reached(est: float, err: float, rtol: float | None, offset: float = 0.0) -> bool:
    return rtol is not None and err <= rtol * abs(offset + est)


#: The labels of the products whose per-batch forms ``data_error`` uses: ``"probe"`` (random
#: probes of ``A``, the default label), ``"deflated"`` (probes of ``(I - P) A (I - P)``),
#: ``"basis"`` (an orthonormal basis ``Q`` whose forms sum to ``tr(Q^T A Q)``); the others
#: (``"sketch"``) need none.
DATA_ERROR_TAGS = frozenset({"probe", "deflated", "basis"})


def _per_batch_probes(forms: Any) -> np.ndarray:
    """(p, B) per-batch probe forms of ``tr(H_b)``: raw probes, or deflated ones plus ``tr(Q^T H_b Q)``."""
    def stacked(tag):
        parts = [d for t, d in forms.diagonals if t == tag]
        return np.concatenate(parts, axis=1).T if parts else np.zeros((0, len(forms.weights)))

    deflated, basis = stacked("deflated"), stacked("basis")
    if len(deflated) or (len(basis) and not len(stacked("probe"))):
        low = basis.sum(axis=0)
        return deflated + low[None, :] if len(deflated) else low[None, :]
    return stacked("probe")


def _hutchinson_samples(A, mul, num, seed, distribution, stream, chunk_size, rtol, offset=0.0, project=None, first=(),
                        fresh=0):
    """Quadratic forms ``z^T A z`` (optionally of ``(I-P) A (I-P)``), stopping on ``rtol``.

    ``first`` are the forms of probe columns ``0..len(first)-1`` of the stream, already taken;
    an ``rtol`` stop waits for ``fresh`` new forms too.
    """
    if project is not None:
        plain = mul

        def mul(Z):
            return plain(Z, "deflated")

    samples = list(first)
    least = max(MIN_PROBES_FOR_RTOL, len(first) + fresh)
    if len(samples) >= least and A.decide(_reached(*_mean_stderr(np.array(samples)), rtol, offset)):
        return np.array(samples)
    for Z, AZ in probe_chunks(A, mul, num, seed, distribution, stream, chunk_size, transform=project, start=len(samples)):
        samples.extend(_forms(A.ops, Z, AZ))
        if len(samples) > 1:
            mean, err = _mean_stderr(np.array(samples))
            show(A, trace=offset + mean, stderr=err)
        if len(samples) >= least and A.decide(_reached(*_mean_stderr(np.array(samples)), rtol, offset)):
            break
    return np.array(samples)


def trace(A: OperatorLike, method: TraceMethod = "auto", max_matvecs: int = 100, rtol: float | None = None, seed: int = 0,
          distribution: Distribution = "rademacher", chunk_size: int = 10, progress: bool | str = False,
          data_error: bool = False) -> TraceResult:
    """Estimate the trace of a symmetric operator.

    Args:
        A: a :class:`~specops.LinearOperator` or anything :func:`~specops.aslinearoperator` takes.
        method: ``"auto"`` (XTrace, or Hutchinson when the spectrum is too flat for a sketch
            to pay; with ``rtol`` and ``max_matvecs >= 100``, an XTrace first round that
            misses ``rtol`` goes on as Krylov Hutch++ from its basis), ``"hutchinson"``,
            ``"hutch++"``, ``"xtrace"`` or ``"krylov-hutch++"`` (a block Krylov basis sized from
            pilot probes, Hutchinson outside it: fewer products than XTrace where a Hessian's
            top is low rank over a wide bulk).
        max_matvecs: the budget of products.
        rtol: stop early once ``stderr <= rtol * |estimate|`` (after at least 10 probes).
            XTrace then grows its sketch in rounds, keeping two vectors per probe.
        seed: seed of the probes.
        distribution: probe distribution, ``"rademacher"`` or ``"normal"``.
        chunk_size: probes multiplied per ``matmat`` (one pass over the data for a model).
        progress: draw a progress bar (tqdm) of the products against ``max_matvecs``, with
            the running estimate and its standard error; a string labels it. Silent on MPI
            ranks other than 0 (:mod:`specops.progress`).
        data_error: also report the standard error over data resampling (``data_stderr``)
            for a model-backed operator whose data is several batches: a two-way analysis of
            variance of the probes' per-batch forms ``z^T H_b z`` (probes x batches), which
            the products already compute (:mod:`specops.data_error`; docs/algorithms.md).
            Data given as one batch is split into sub-batches, where a product costs more:
            there only the first probes run over the sub-batches, until their forms pin the
            data error or a quarter of ``max_matvecs`` is spent (``settings["data_error"]``:
            ``probes`` recorded, ``pinned`` whether they pinned it; Hutch++ and Krylov Hutch++
            record all of their basis and deflated probes, and ``"auto"`` does not hand over
            to Krylov Hutch++ there).

    Returns:
        :class:`TraceResult` with the estimate and its standard error.

    Examples:
        A 300 x 300 matrix with eigenvalues ``0.9^j``, whose trace is 10: 60 products
        give it to 0.3%, within its standard error.

        >>> import numpy as np
        >>> import specops as so
        >>> Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((300, 300)))
        >>> A = (Q * 0.9 ** np.arange(300)) @ Q.T
        >>> tr = so.trace(A, max_matvecs=60, seed=0)
        >>> print(f"{np.trace(A):.2f}, estimated {tr.estimate:.2f} +- {tr.stderr:.2f} ({tr.settings['estimator']})")
        10.00, estimated 10.03 +- 0.08 (xtrace)
    """
    A = _checks.symmetric_operator(A, "trace")
    model = data_error_model(A, "trace") if data_error else None
    A = A if model is None else model  # data given as one batch: split into sub-batches
    _checks.choice("method", method, METHODS)
    max_matvecs = _checks.positive_int("max_matvecs", max_matvecs)
    rtol = _checks.positive_float("rtol", rtol, allow_none=True)
    seed, distribution = check_seed(seed), check_distribution(distribution)
    chunk_size = _checks.positive_int("chunk_size", chunk_size)
    settings = dict(method=method, max_matvecs=max_matvecs, rtol=rtol, seed=seed, distribution=distribution,
                    n=A.shape[0], backend=A.backend, **engine_settings(A))
    bar = progress_bar(progress, max_matvecs, "trace", comm=A)
    A = bar.track(A)
    split = model is not None and model.is_split and method not in ("hutch++", "krylov-hutch++")
    wanted = {"probe"} if split else DATA_ERROR_TAGS  # over sub-batches: the plain probes' forms only
    with model.recording_batches(wanted) if model is not None else contextlib.nullcontext() as forms:
        mul: Any = _checks.Products(A, forms, tag="probe")
        if split:
            mul = _FewProbeForms(mul, forms, A.decide, max(MIN_PROBES, max_matvecs // 4))
        if method == "auto" and max_matvecs < 4:
            settings["estimator"] = "hutchinson"  # too few products for a sketch
        if method == "hutchinson" or settings.get("estimator") == "hutchinson":
            est, err = _mean_stderr(_hutchinson_samples(A, mul, max_matvecs, seed, distribution, "trace", chunk_size, rtol))
        elif method == "hutch++":
            est, err = _hutchpp(A, mul, max_matvecs, seed, distribution, chunk_size, rtol)
        elif method == "krylov-hutch++":
            est, err = _krylov_hutchpp(A, mul, max_matvecs, rtol, seed, distribution, chunk_size, settings)
        else:
            # "auto" with rtol: an XTrace round far from it hands over to Krylov Hutch++; not on data
            # split into sub-batches for data_error, where XTrace's probes, all plain, pin the data
            # error as they go, and Krylov Hutch++ would need as many more (docs/algorithms.md)
            krylov = method == "auto" and rtol is not None and max_matvecs >= AUTO_KRYLOV_FROM and not split
            est, err = _xtrace(A, mul, max_matvecs, rtol, seed, distribution, chunk_size, settings, krylov)
    bar.close(trace=est, stderr=err)
    result = TraceResult(estimate=est, stderr=err, num_matvecs=mul.count, settings=settings)
    if forms is not None:
        X = _per_batch_probes(forms)
        settings["data_error"] = dict(batches=int(len(forms.weights)), samples=int(np.sum(forms.sizes)),
                                      probes=int(X.shape[0]), method="probes x batches analysis of variance",
                                      pinned=bool(probes_pin_data_error(X)))
        result.data_stderr = trace_stderr(X, forms.weights)
        if result.data_stderr == 0 and not settings["data_error"]["pinned"]:
            warnings.warn(f"trace: data_stderr is 0 because the batches' spread is below the noise of the "
                          f"{X.shape[0]} probes whose per-batch forms it has, so the data error is not measured: "
                          "pass a larger max_matvecs (more probes), or the data as more batches",
                          RuntimeWarning, stacklevel=2)
    return result


class _FewProbeForms:
    """Products that record per-batch probe forms only until they pin the data error, or ``limit`` of them.

    On data split into sub-batches for ``data_error`` (one batch given), a product over the
    sub-batches costs more than one over the whole batch; the data error needs the forms of
    a few probes only (:func:`specops.data_error.probes_pin_data_error`), and at most a quarter
    of the budget's are recorded (the data error is then less precise than it could be).
    Later probe products run over the whole batch (their label is no longer ``"probe"``);
    the estimate uses every probe, the data error those recorded.
    """

    def __init__(self, mul: _checks.Products, forms: Any, decide: Callable[[bool], bool], limit: int) -> None:
        self.mul, self.forms, self.decide, self.limit, self.pinned = mul, forms, decide, limit, False

    @property
    def count(self) -> int:
        return self.mul.count

    def __call__(self, V: Any, tag: str | None = None) -> Any:
        if tag not in (None, "probe"):
            return self.mul(V, tag)
        if not self.pinned:
            recorded = _per_batch_probes(self.forms)
            need = MIN_PROBES - len(recorded)
            if 0 < need < V.shape[1]:  # the first probes alone, then look again
                ops = self.mul.A.ops
                return ops.concat([self(V[:, :need]), self(V[:, need:])], axis=1)
            self.pinned = self.decide(bool(len(recorded) >= self.limit or probes_pin_data_error(recorded)))
        return self.mul(V, "probe, not recorded" if self.pinned else "probe")


def _hutchpp(A, mul, m, seed, distribution, chunk_size, rtol):
    if m < 3:
        raise ValueError(f"hutch++ needs max_matvecs >= 3 (sketch, its product, probes), got {m}")
    ops, n = A.ops, A.shape[0]
    s = m // 3
    capacity = sketch_capacity(ops, n, chunk_size, "hutch++")
    if s > capacity:
        raise ValueError(f"{_too_large('hutch++', s, capacity, n)}: pass max_matvecs <= {3 * capacity} "
                         "or method='hutchinson' (no sketch)")
    Q, _ = ops.qr(mul(ops.random(n, range(s), seed, distribution=distribution, stream="hutch++-sketch"), "sketch"))
    low_rank = float(np.sum(ops.column_dots(Q, mul(Q, "basis"))))

    def deflate(Z):
        return Z - ops.combine(Q, ops.inner(Q, Z))

    samples = _hutchinson_samples(A, mul, m - 2 * s, seed, distribution, "hutch++-probe", chunk_size, rtol,
                                  offset=low_rank, project=deflate)
    est, err = _mean_stderr(samples)
    return low_rank + est, err


def _krylov_hutchpp(A, mul, m, rtol, seed, distribution, chunk_size, settings, start=None):
    """Hutch++ on a block Krylov basis grown while it pays (docs/algorithms.md).

    ``p`` pilot probes ``z_i`` (stream ``"trace-pilot"``) and their products come first. The
    basis starts at ``orth(Omega)`` (``b`` probes, stream ``"trace-sketch"``), or from ``"auto"``
    at ``start = (Q, A Q)``, its first XTrace round's basis and products; each block's
    products ``A Q_j`` give ``H = Q^T A Q`` and, orthogonalized against ``Q``, the next block:
    one product per basis vector. After each block the pilots' deflated forms
    ``(P z_i)^T A (P z_i)`` (``P = I - QQ^T``) follow from ``z_i``, ``A z_i``, ``Q`` and ``H``
    alone, and their variance ``v`` predicts the rest's cost: with ``rtol`` the products to
    reach it, ``k + v / (rtol |estimate|)^2`` for a basis of ``k`` vectors, otherwise the
    variance left at the budget, ``v / (m - k)``. The basis grows while its latest half (at least two blocks) has
    lowered that prediction, judged from the third block on (``Omega`` alone captures
    nothing, and one block of ``A Omega`` may capture too little to show in the pilots), and with
    ``rtol`` without judging while it is below ``1 / SMALL_BASIS`` of the rest's expected samples; every
    prediction from the current pilots: 10 (``m / 3`` for tiny budgets), more from the third
    block on (an eighth of the basis or of the samples the rest is expected to take, up to 50;
    they are samples of the rest, so none is wasted where the rest takes as many). The rest of the budget goes to
    Hutchinson probes of ``P A P`` (stream ``"trace-rest"``, at least ``MIN_PROBES_FOR_RTOL``
    of them before an ``rtol`` stop), whose forms with the pilots' give the estimate and
    standard error.
    """
    ops, n = A.ops, A.shape[0]
    if m < 6:
        raise ValueError(f"krylov-hutch++ needs max_matvecs >= 6 (pilots, a basis block, probes), got {m}")
    p = min(MIN_PROBES_FOR_RTOL, m // 3)
    b = max(1, min(chunk_size, (m - p) // 4, n))
    settings.update(estimator="krylov-hutch++", block=b)
    pilots = _Pilots(A, mul, seed, distribution, chunk_size)
    pilots.add(p, None)
    capacity = sketch_capacity(ops, n, chunk_size, "krylov-hutch++") - MAX_PILOTS  # the pilots and their products
    basis, Q, H, sizes = _Basis(ops, n), None, np.zeros((0, 0)), [0]  # Q: the basis's columns in use
    if start is None:
        block, AQ = ops.orthonormalize(ops.random(n, range(b), seed, distribution=distribution,
                                                  stream="trace-sketch"))[0], None
    else:
        (block, AQ), start = start, None

    def to_rtol(j, f):
        """Samples of the rest that reach ``rtol`` with the first ``j`` basis vectors (pilot forms ``f``)."""
        aim = (rtol * abs(np.trace(H[:j, :j]) + np.mean(f))) ** 2
        return float(np.var(f, ddof=1)) / max(aim, np.finfo(np.float64).tiny)

    def predicted(j):
        """The rest's cost with the first ``j`` basis vectors, from the current pilots.

        Every product but the basis's is a sample of the rest (the pilots too): with ``rtol``
        the products to reach it, ``j + max(v / aim, pilots)``; else the variance at the budget.
        """
        f = pilots.deflated(H, j)
        if rtol is None:
            return float(np.var(f, ddof=1)) / (m - j)
        return j + max(to_rtol(j, f), len(f))

    def more_pilots(j):
        """Draw pilots up to an eighth of the rest's expected samples or of the basis (10 to 50).

        The expected samples: ``v / aim`` with ``rtol``, else the products left.
        """
        expected = m - j if rtol is None else min(to_rtol(j, pilots.deflated(H, j)), m)
        want = A.decide(int(min(MAX_PILOTS, max(j, expected) // PILOT_EVERY)))
        pilots.add(min(want, p + max(0, m - mul.count - b - MIN_PROBES_FOR_RTOL)), Q)

    invariant = False
    while True:
        if AQ is None:
            AQ = ops.concat([mul(block[:, j:j + chunk_size], "basis") for j in range(0, block.shape[1], chunk_size)],
                            axis=1)
        basis.append(block)
        k0, k = H.shape[0], basis.size
        Q = basis.view()
        # one pass over the basis: AQ orthogonalized against it gives the next block, and the
        # coefficients removed are Q^T A Q's new columns (the last block's Y goes unused)
        Y, B = ops.orthogonalize(AQ, basis.Q, columns=k, recent=min(k, 2 * b))
        H2 = np.zeros((k, k))
        H2[:k0, :k0], H2[:, k0:], H2[k0:, :k0] = H, B, B[:k0].T
        H2[k0:, k0:] = (B[k0:] + B[k0:].T) / 2
        H = H2
        sizes.append(k)
        if k >= n:  # Q spans everything: tr(Q^T A Q) is the trace
            settings.update(krylov_basis=k, pilots=len(pilots.forms), krylov_stop="spanned")
            return float(np.trace(H)), 0.0
        pilots.extend(block)
        if k >= 3 * b:  # before, the basis captures too little to tell what the rest will need
            more_pilots(k)
        f = pilots.deflated(H, k)
        show(A, trace=float(np.trace(H) + np.mean(f)), stderr=float(np.std(f, ddof=1) / np.sqrt(len(f))))
        ref = max(j for j in sizes if j <= max(0, min(k / 2, k - 2 * b)))
        # with rtol, below a quarter of the rest's expected samples the basis grows without judging:
        # the prediction adds products to the pilots' variance, whose scale 50 heavy-tailed forms
        # can understate twice over (the ResNet-20, seed 7: 400 samples predicted, 900 taken), making
        # the basis look dear; without rtol two predictions are compared as variances, and a common
        # scale cancels
        small = rtol is not None and k < to_rtol(k, f) / SMALL_BASIS
        paid = k < 3 * b or small or predicted(k) < predicted(ref)
        step = min(b, n - k, capacity - k)
        room = m - mul.count >= step + min(MIN_PROBES_FOR_RTOL, m // 4)  # products left for the rest
        if invariant or not A.decide(bool(paid and step > 0 and room)):
            stop = "invariant" if invariant else "judged" if not paid else "memory" if step <= 0 else "budget"
            break
        (block, R), AQ = ops.orthonormalize(Y[:, :step]), None
        # directions the block adds to working precision; fewer than its width: the Krylov space
        # is (nearly) invariant, so it takes those, then stops growing
        new = A.decide(np.abs(np.diag(R)) > 1e3 * np.finfo(ops.dtype).eps * max(np.max(np.abs(B)), np.finfo(float).tiny))
        invariant = not np.all(new)
        if not np.any(new):
            stop = "invariant"
            break
        block = block[:, np.flatnonzero(new)] if invariant else block
    f = pilots.deflated(H, k)
    settings.update(krylov_basis=k, pilots=len(f), krylov_stop=stop)
    low = float(np.trace(H))
    # the pilots are the rest's first samples (its stream skips their columns); an rtol stop waits
    # for MIN_PROBES_FOR_RTOL probes of the rest's own: a stop on the pilots alone, a few heavy-tailed
    # forms, understated its error (RMS z 1.5-1.9 at rtol=0.01 on three of the twelve spectra), and
    # the data error needs recorded forms (the pilots' are not)
    rest = _hutchinson_samples(A, mul, len(f) + m - mul.count, seed, distribution, "trace-rest", chunk_size, rtol,
                               offset=low, project=lambda Z: ops.orthogonalize(Z, basis.Q, columns=k)[0], first=f,
                               fresh=MIN_PROBES_FOR_RTOL)
    est, err = _mean_stderr(rest)
    return low + est, err


class _Basis:
    """Orthonormal columns in a buffer that doubles when full (not copied at every block)."""

    def __init__(self, ops: VectorOps, n: int) -> None:
        self.ops, self.n, self.size = ops, n, 0
        self.Q: Array = ops.buffer((n, 0))

    def append(self, block: Array) -> None:
        ops, k, w = self.ops, self.size, block.shape[1]
        if k + w > self.Q.shape[1]:
            grown = ops.buffer((self.n, min(self.n, max(2 * (k + w), 8 * w))))
            self.Q = ops.write_block(grown, 0, self.Q[:, :k]) if k else grown
        self.Q = ops.write_block(self.Q, k, block)
        self.size = k + w

    def view(self) -> Array:
        return self.Q[:, :self.size]


#: Krylov Hutch++ keeps one pilot probe per this many basis vectors or expected samples of the
#: rest (at least 10), up to ``MAX_PILOTS``.
PILOT_EVERY, MAX_PILOTS = 8, 50
#: With ``rtol``, Krylov Hutch++'s basis grows without judging while it is below
#: ``1 / SMALL_BASIS`` of the samples the rest is expected to take.
SMALL_BASIS = 4


class _Pilots:
    """Krylov Hutch++'s pilot probes ``z_i`` (stream ``"trace-pilot"``), independent of the basis.

    It keeps ``z_i``, ``A z_i``, ``z_i^T A z_i`` and, by rows, ``Q^T z_i`` and ``Q^T A z_i``,
    from which the deflated forms ``(P z_i)^T A (P z_i)`` with ``P = I - Q_j Q_j^T`` (the first
    ``j`` basis vectors) follow without a product.
    """

    def __init__(self, A: LinearOperator, mul: Callable[..., Array], seed: int, distribution: Distribution,
                 chunk_size: int) -> None:
        self.ops, self.n, self.mul = A.ops, A.shape[0], mul
        self.seed, self.distribution, self.chunk_size = seed, distribution, chunk_size
        self.Z = self.AZ = None
        self.forms, self.C, self.D = np.zeros(0), np.zeros((0, 0)), np.zeros((0, 0))

    def add(self, total: int, Q: Array | None) -> None:
        """Draw pilots up to ``total`` (their products labelled ``"pilot"``: no data-error forms)."""
        ops, start = self.ops, len(self.forms)
        if total <= start:
            return
        Z = ops.random(self.n, range(start, total), self.seed, distribution=self.distribution, stream="trace-pilot")
        AZ = ops.concat([self.mul(Z[:, j:j + self.chunk_size], "pilot") for j in range(0, Z.shape[1], self.chunk_size)],
                        axis=1)
        self.forms = np.concatenate([self.forms, _forms(ops, Z, AZ)])
        k = 0 if Q is None else Q.shape[1]
        C, D = (np.zeros((Z.shape[1], 0)),) * 2 if Q is None else (ops.to_numpy(ops.inner(Q, X)).T for X in (Z, AZ))
        self.C, self.D = np.concatenate([self.C.reshape(start, k), C]), np.concatenate([self.D.reshape(start, k), D])
        self.Z = Z if self.Z is None else ops.concat([self.Z, Z], axis=1)
        self.AZ = AZ if self.AZ is None else ops.concat([self.AZ, AZ], axis=1)

    def extend(self, block: Array) -> None:
        """Take the basis's new ``block`` into ``Q^T z_i`` and ``Q^T A z_i``."""
        ops = self.ops
        self.C = np.concatenate([self.C, ops.to_numpy(ops.inner(block, self.Z)).T], axis=1)
        self.D = np.concatenate([self.D, ops.to_numpy(ops.inner(block, self.AZ)).T], axis=1)

    def deflated(self, H: np.ndarray, j: int) -> np.ndarray:
        """``(P z_i)^T A (P z_i)`` for ``P = I - Q_j Q_j^T`` (``H = Q^T A Q``)."""
        C, D = self.C[:, :j], self.D[:, :j]
        return self.forms - 2 * np.sum(C * D, axis=1) + np.einsum("ij,jk,ik->i", C, H[:j, :j], C)


def _xtrace(A, mul, m, rtol, seed, distribution, chunk_size, settings, krylov=False):
    """XTrace (``"auto"``: or Hutchinson) with probes ``Omega`` from the ``"trace"`` stream.

    ``krylov``: hand over to Krylov Hutch++ where a first round is far from ``rtol``.

    Without ``rtol``: ``s = m // 2`` probes, ``s`` products for ``A Omega`` and ``s`` for
    ``A Q``. With ``rtol``: a first sketch of ``min(m // 2, 2 max(10, chunk_size))`` probes, then
    rounds that grow it (at most doubling) until the standard error meets ``rtol``.
    """
    if m < 4:
        raise ValueError(f"xtrace needs max_matvecs >= 4 (two probes), got {m}")
    ops, n = A.ops, A.shape[0]

    def products(X, tag="probe"):
        return ops.concat([mul(X[:, j:j + chunk_size], tag) for j in range(0, X.shape[1], chunk_size)], axis=1)

    sketch = _Sketch(ops, n, A.decide)
    s = min(n, m // 2 if rtol is None else min(m // 2, 2 * max(MIN_PROBES_FOR_RTOL, chunk_size)))
    capacity = sketch_capacity(ops, n, chunk_size, "xtrace")
    if s > capacity:
        if settings["method"] != "auto" or capacity < 2:
            what = _too_large("xtrace", s, capacity, n)
            if settings["method"] != "auto":
                raise ValueError(f"{what}: pass max_matvecs <= {2 * capacity} (or an rtol, which grows the "
                                 "sketch only as needed and stops growing it where memory ends) or "
                                 "method='hutchinson' (no sketch)")
            warnings.warn(f"trace: {what}; using Hutchinson's estimator", RuntimeWarning, stacklevel=3)
            settings.update(estimator="hutchinson", sketch_capacity=capacity)
            return _mean_stderr(_hutchinson_samples(A, mul, m, seed, distribution, "trace", chunk_size, rtol))
        s = capacity
    while True:
        Omega = ops.random(n, range(sketch.size, s), seed, distribution=distribution, stream="trace")
        Y = products(Omega)
        if settings["method"] == "auto" and sketch.size == 0:
            share = sketch.add(Omega, Y)
            xtrace = A.decide(bool(sketch.exact or share < AUTO_XTRACE_BELOW))
            settings.update(estimator="xtrace" if xtrace else "hutchinson",
                            sketch_residual=share)
            if settings["estimator"] == "hutchinson":  # the sketch's probes are Hutchinson's first probes
                samples = _hutchinson_samples(A, mul, m, seed, distribution, "trace", chunk_size, rtol,
                                              first=_forms(ops, Omega, Y))
                return _mean_stderr(samples)
        else:
            sketch.add(Omega, Y)
        sketch.complete(lambda Q2: products(Q2, "basis"))
        if sketch.exact and s < n:
            # the sketch holds A's range to working precision; what it may still miss (a tail
            # below the rounding level of R) is estimated by Hutchinson on the rest
            return _sketch_and_rest(A, mul, sketch, m, seed, distribution, chunk_size, rtol, (float(np.trace(sketch.H)), 0.0))
        est, err = sketch.estimate()
        show(A, trace=est, stderr=err)
        left = (m - mul.count) // 2
        met = s >= MIN_PROBES_FOR_RTOL and A.decide(_reached(est, err, rtol))
        if sketch.exact or rtol is None or left < 1 or met:
            return est, err
        # XTrace's error falls like 1/s to 1/sqrt(s): aim at 1/s, at most doubling
        aim = 1.1 * s * err / max(rtol * abs(est), np.finfo(np.float64).tiny)
        if krylov and A.decide(bool(aim > 4 * s)):
            # more than two doublings ahead: Krylov Hutch++ goes on, its first basis block the
            # round's, A Q already multiplied (where two doublings may do, its pilots, three
            # blocks and fresh probes would cost more)
            Omega = Y = None  # only the round's Q and A Q go on: the sketch's other vectors are freed
            return _krylov_hutchpp(A, mul, m, rtol, seed, distribution, chunk_size, settings, start=sketch.hand_over())
        krylov = False  # the hand-off is from the first round only (its products are the start)
        if s >= capacity:  # memory ends: the sketch's range exactly, Hutchinson on the rest
            warnings.warn(f"trace: the xtrace sketch stops growing at {s} probes, where half the free memory "
                          "ends; the rest of the budget goes to Hutchinson's estimator of the trace outside "
                          "its range (Hutch++'s form)", RuntimeWarning, stacklevel=3)
            settings.update(estimator="xtrace, then hutch++", sketch_capacity=capacity)
            return _sketch_and_rest(A, mul, sketch, m, seed, distribution, chunk_size, rtol, (est, err))
        s = min(n, 2 * s, s + left, capacity, max(s + chunk_size, math.ceil(min(aim, 2.0 * n))))


def _sketch_and_rest(A, mul, sketch, m, seed, distribution, chunk_size, rtol, fallback):
    """Hutch++'s form on a grown sketch: ``tr(Q^T A Q)`` exactly, Hutchinson outside ``span(Q)``.

    The rest of the budget goes to probes of ``(I - QQ^T) A (I - QQ^T)`` (stream
    ``"trace-rest"``); with fewer than two left, ``fallback`` (estimate, stderr) is returned.
    """
    low = float(np.trace(sketch.H))
    rest = _hutchinson_samples(A, mul, m - mul.count, seed, distribution, "trace-rest", chunk_size, rtol, offset=low,
                               project=lambda Z: A.ops.orthogonalize(Z, sketch.Q)[0])
    if len(rest) < 2:
        return fallback
    est, err = _mean_stderr(rest)
    return low + est, err


class _Sketch:
    """XTrace's state, grown a block of probes at a time.

    It holds the probes ``Omega``, an orthonormal basis ``Q`` of ``Y = A Omega = Q R``, and the
    host matrices ``R``, ``W = Q^T Omega`` and ``H = Q^T A Q``. A new block ``Y2`` is
    orthogonalized against ``Q`` (so ``Q`` and ``R`` extend, block upper triangular) and only
    ``A Q2`` is new work.
    """

    def __init__(self, ops: VectorOps, n: int, decide: Callable[[bool], bool] = lambda value: value) -> None:
        self.ops, self.n, self.decide = ops, n, decide  # n: the operator's size (rows are a shard's)
        self.Omega = self.Q = self.Q2 = self.AQ = None
        self.R = self.W = self.H = np.zeros((0, 0))
        self.norms2 = np.zeros(0)
        self.exact = False

    @property
    def size(self) -> int:
        return self.R.shape[0]

    def hand_over(self) -> tuple[Array, Array]:
        """``(Q, A Q)`` of a one-round sketch, the sketch emptied (its vectors freed)."""
        start = (self.Q, self.AQ)
        self.Omega = self.Q = self.Q2 = self.AQ = None
        return start

    def add(self, Omega: Array, Y: Array) -> float:
        """Take probes ``Omega`` and their products ``Y``.

        Returns the share of ``||Y||_F^2`` left by leave-one-out bases,
        ``mean_i ||(I - P_(i)) y_i||^2 / mean_i ||y_i||^2``.
        """
        ops, s0, k = self.ops, self.size, Omega.shape[1]
        norms2 = ops.column_norms(Y) ** 2
        Y2, C = ops.orthogonalize(Y, self.Q)
        Q2, R22 = ops.orthonormalize(Y2)
        R = np.zeros((s0 + k, s0 + k))
        R[:s0, :s0], R[:s0, s0:], R[s0:, s0:] = self.R, C, R22
        d = np.abs(np.diag(R))
        if self.decide(bool(s0 + k == self.n or d.min() <= 1e3 * np.finfo(ops.dtype).eps * d.max())):
            # rank(A) < probes (or n probes): span(Q) holds the range of A, tr(Q^T A Q) is exact
            self.exact = True
            Q2, _ = ops.orthonormalize(ops.orthogonalize(Q2, self.Q)[0])
        W = np.zeros((s0 + k, s0 + k))
        W[:s0, :s0] = self.W
        if s0:
            W[:s0, s0:] = ops.to_numpy(ops.inner(self.Q, Omega))
        self.Omega = Omega if self.Omega is None else ops.concat([self.Omega, Omega], axis=1)
        W[s0:, :] = ops.to_numpy(ops.inner(Q2, self.Omega))
        self.R, self.W, self.Q2 = R, W, Q2
        if self.exact:
            return 0.0
        self.norms2 = np.concatenate([self.norms2, norms2])
        # the distance of y_i from the span of the other y_j is 1 / ||row i of R^{-1}||
        left = 1.0 / np.sum(np.linalg.inv(R) ** 2, axis=1)
        return float(np.mean(left) / np.mean(self.norms2))

    def complete(self, products: Callable[[Array], Array]) -> None:
        """The products ``A Q2`` of the new basis vectors, and ``H``'s new rows and columns."""
        ops, Q2 = self.ops, self.Q2
        s0 = self.H.shape[0]
        self.Q = Q2 if self.Q is None else ops.concat([self.Q, Q2], axis=1)
        self.AQ = products(Q2)  # the latest block's (a start for Krylov Hutch++)
        B = ops.to_numpy(ops.inner(self.Q, self.AQ))       # (s0 + k, k)
        H = np.zeros((self.size, self.size))
        H[:s0, :s0], H[:, s0:], H[s0:, :s0] = self.H, B, B[:s0].T
        H[s0:, s0:] = (B[s0:] + B[s0:].T) / 2
        self.H, self.Q2 = H, None

    def estimate(self) -> tuple[float, float]:
        """XTrace's estimate (the mean of its leave-one-out estimates ``t_i``) and its standard error.

        The ``t_i`` share most of their basis (each pair of probes enters two of them), so
        the spread of the ``t_i`` divided by ``sqrt(m)`` (the paper's error estimate)
        understates the error; specops corrects it by its shortfall measured on disjoint
        halves of the probes (:func:`_calibrated_stderr`; calibration table in
        docs/algorithms.md).
        """
        H, R, W = self.H, self.R, self.W
        if self.exact:
            return float(np.trace(H)), 0.0
        m = R.shape[1]
        mean = float(np.mean(_leave_one_out(H, R, W)))
        if m < 3:
            return mean, float("inf")
        return mean, _calibrated_stderr(H, R, W)


def _restrict(H: np.ndarray, R: np.ndarray, W: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, ...]:
    """XTrace's host matrices for the probes ``keep`` only, from the whole sketch's (no products).

    ``Omega`` restricted to ``keep`` spans a subspace of ``Q``: its basis in ``Q``'s coordinates
    comes from ``R[:, keep]``, and ``H``, ``R`` and ``W`` restricted to it are XTrace's state.
    """
    V, Rk = np.linalg.qr(R[:, keep])
    return V.T @ H @ V, Rk, V.T @ W[:, keep]


def _subsketch(H: np.ndarray, R: np.ndarray, W: np.ndarray, keep: np.ndarray) -> float:
    """XTrace's estimate with the probes ``keep`` only."""
    return float(np.mean(_leave_one_out(*_restrict(H, R, W, keep))))


def _jackknife(H: np.ndarray, R: np.ndarray, W: np.ndarray, probes: np.ndarray) -> float:
    """The delete-a-group jackknife variance of XTrace on ``probes`` (``min(len, 20)`` groups, 10 past 400)."""
    groups = JACKKNIFE_GROUPS if len(probes) <= JACKKNIFE_LARGE else 10
    parts = np.array_split(probes, min(len(probes), groups))
    t = np.array([_subsketch(H, R, W, np.setdiff1d(probes, group)) for group in parts])
    g = len(parts)
    return float((g - 1) / g * np.sum((t - t.mean()) ** 2))


def _halves(H: np.ndarray, R: np.ndarray, W: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """XTrace's variance with half the probes, measured, and the paper's estimate of it.

    XTrace on two disjoint halves of the (independent) probes gives two independent
    estimates ``T_a``, ``T_b``: ``(T_a - T_b)^2 / 2`` is unbiased for the variance with half
    the probes, and ``var(t_i) / (m/2)`` within each half is the paper's estimate of the
    same. Both are averaged over ``SPLITS`` random partitions (half as many past
    ``JACKKNIFE_LARGE`` probes, where each costs ``O(m^3)`` host flops).
    """
    m, measured, paper = R.shape[1], [], []
    for _ in range(SPLITS if m <= JACKKNIFE_LARGE else SPLITS // 2):
        t = [_leave_one_out(*_restrict(H, R, W, np.sort(half))) for half in np.array_split(rng.permutation(m), 2)]
        measured.append(np.var([ti.mean() for ti in t], ddof=1))
        paper.append(np.mean([np.var(ti, ddof=1) / len(ti) for ti in t]))
    return float(np.mean(measured)), float(np.mean(paper))


def _calibrated_stderr(H: np.ndarray, R: np.ndarray, W: np.ndarray) -> float:
    """XTrace's standard error: the paper's ``std(t_i) / sqrt(m)``, corrected by its shortfall measured on halves.

    The leave-one-out estimates ``t_i`` are exchangeable with some correlation ``rho``, so
    ``Var(mean t_i) = var(t_i) / m * F`` with ``F = 1 + (m - 1) rho``; the paper's estimate
    takes ``F = 1`` and understates. On halves of the probes ``F`` is measured: their
    variance without bias from disjoint halves, divided by the paper's estimate within the
    halves (:func:`_halves`), ``F_half = V / P``. From ``m/2`` to ``m`` probes the excess
    ``F - 1`` grows by a factor between 1 (a constant ``F``) and 2 (a constant ``rho``),
    depending on the spectrum; the estimate takes the geometric middle,
    ``F = 1 + GROWTH (F_half - 1)`` with ``GROWTH = sqrt(2)``, and ``F >= 1`` (the paper's
    estimate is a floor). Calibration table in docs/algorithms.md. Below ``MIN_SPLIT``
    probes (or when the halves' ``t_i`` do not vary), the plain delete-a-group jackknife,
    which overstates.
    """
    m = R.shape[1]
    probes = np.arange(m)
    if m < MIN_SPLIT:
        return float(np.sqrt(_jackknife(H, R, W, probes)))
    measured, paper = _halves(H, R, W, np.random.default_rng(m))  # the probes are exchangeable: any fixed partitions serve
    if not paper > 0:
        return float(np.sqrt(_jackknife(H, R, W, probes)))
    excess = max(0.0, measured / paper - 1.0)
    return float(np.sqrt(np.var(_leave_one_out(H, R, W), ddof=1) / m * (1.0 + GROWTH * excess)))


#: The factor by which the excess ``F - 1`` of XTrace's variance over the paper's estimate
#: grows from ``m/2`` to ``m`` probes (:func:`_calibrated_stderr`).
GROWTH = math.sqrt(2.0)
#: Probes below which XTrace's standard error is the plain (conservative) jackknife.
MIN_SPLIT = 16
#: Random partitions into halves averaged in :func:`_halves`.
SPLITS = 100


def _leave_one_out(H: np.ndarray, R: np.ndarray, W: np.ndarray) -> np.ndarray:
    """XTrace's leave-one-out estimates ``t_i`` (docs/algorithms.md) from a sketch's host matrices.

    The matrices: ``H = Q^T A Q``, ``R`` (``A Omega = Q R``) and ``W = Q^T Omega``.

    With ``s_i = R^{-T} e_i / ||R^{-T} e_i||``, the basis without probe ``i`` spans
    ``Q (I - s_i s_i^T)``; every ``t_i`` follows from ``R``, ``W`` and ``H``.
    """
    S = np.linalg.inv(R).T
    S /= np.linalg.norm(S, axis=0)
    c = np.sum(S * W, axis=0)                      # s_i^T w_i
    U = W - S * c                                   # w_i - c_i s_i
    return (np.trace(H) - np.sum(S * (H @ S), axis=0)
            - np.sum(W * R, axis=0) + 2 * c * np.sum(R * S, axis=0) + np.sum(U * (H @ U), axis=0))
