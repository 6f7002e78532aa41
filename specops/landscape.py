"""Loss landscapes: the loss of a model along one or two directions in parameter space.

``landscape(H, directions)`` evaluates ``L(theta + a d1)`` on a line or
``L(theta + a d1 + b d2)`` on a square grid through the operator's own
:meth:`~specops.ModelOperator.loss_at`, so it works for every backend and under MPI
(each rank evaluates its shard; ``loss_at`` reduces). The model's parameters are
never changed: ``loss_at`` evaluates at ``theta + delta`` without writing them.

Directions:

- the top eigenvectors of the Hessian (:func:`eigen_directions`, from an
  :class:`~specops.EigResult`): the view of PyHessian (Yao et al. 2020), where
  the curvature along the direction is the eigenvalue;
- seeded Gaussian directions (:func:`random_directions`);
- seeded Gaussian directions normalized filter by filter
  (:func:`filter_normalized_directions`): Li, Xu, Taylor, Studer & Goldstein,
  "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018), which makes
  landscapes of networks with different weight scales comparable.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np

from specops import _checks
from specops import random as _random
from specops.progress import bar as progress_bar
from specops.random import check_seed
from specops.ops import Array
from specops.results import Result

if TYPE_CHECKING:
    from specops.eigsh import EigResult
    from specops.model import ModelOperator
    from specops.operator import LinearOperator

#: The named landscape directions (:func:`make_directions`).
Directions = Literal["eigen", "random", "filter"]
DIRECTIONS: tuple[Directions, ...] = get_args(Directions)
#: Filter normalization of 1-D parameters: zero them, or normalize them as a whole.
BiasRule = Literal["zero", "norm"]
BIAS_RULES: tuple[BiasRule, ...] = get_args(BiasRule)


@dataclasses.dataclass
class Landscape(Result):
    """Losses on a 1-D line or a 2-D grid through the current parameters.

    Attributes:
        alphas: (steps,) coordinates along the first direction.
        betas: (steps,) coordinates along the second direction, or ``None`` in 1-D.
        losses: (steps,) or (steps, steps) losses; ``losses[i, j]`` is at
            ``theta + alphas[i] d1 + betas[j] d2``.
        center_loss: the loss at ``theta`` (coordinate 0, evaluated even when it is not
            a grid point).
        num_evaluations: loss evaluations (passes over the data) used.
        seconds: wall time.
        settings: span, steps, the directions' name (``"directions"``), norms and seed.
        directions: the direction vectors, backend arrays (``None`` after JSON).
    """

    alphas: np.ndarray
    betas: Any
    losses: np.ndarray
    center_loss: float
    num_evaluations: int
    seconds: float
    settings: dict
    directions: Any = None

    _NOT_SERIALIZED = ("directions",)

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a plane."""
        return 1 if self.betas is None else 2

    def plot(self, ax: Any = None, levels: int = 30) -> Any:
        """A line (1-D) or filled contours (2-D) of the losses; returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4.5))
        name = self.settings.get("directions", "")
        if self.ndim == 1:
            ax.plot(self.alphas, self.losses, marker=".")
            ax.axvline(0.0, color="0.7", lw=0.8)
            ax.set_xlabel(f"step along direction 1 ({name})")
            ax.set_ylabel("loss")
        else:
            A, B = np.meshgrid(self.alphas, self.betas, indexing="ij")
            cs = ax.contourf(A, B, self.losses, levels=levels, cmap="viridis")
            ax.contour(A, B, self.losses, levels=levels, colors="k", linewidths=0.3)
            ax.plot([0], [0], "r+", ms=10)
            ax.figure.colorbar(cs, ax=ax, label="loss")
            ax.set_xlabel(f"direction 1 ({name})")
            ax.set_ylabel(f"direction 2 ({name})")
        ax.set_title(f"loss landscape ({self.ndim}-D, {name} directions)")
        return ax


# --- directions ---------------------------------------------------------------------------
def eigen_directions(eig: EigResult, count: int = 1) -> list[Array]:
    """The first ``count`` eigenvectors of an :class:`~specops.EigResult`, as vectors (n,).

    Raises:
        ValueError: the result holds fewer eigenvectors (or none, after JSON).
    """
    V = eig.eigenvectors
    if V is None:
        raise ValueError("this EigResult has no eigenvectors (it was read from JSON); recompute it")
    if V.shape[1] < count:
        raise ValueError(f"{count} directions requested but the EigResult holds {V.shape[1]} eigenvectors; "
                         f"call eigsh with k >= {count}")
    return [V[:, j] for j in range(count)]


def random_directions(H: LinearOperator, count: int = 1, seed: int = 0) -> list[Array]:
    """``count`` seeded standard-normal directions (n,) of the operator's backend.

    The same seed gives the same directions on every backend and number of ranks.
    """
    seed = check_seed(seed)
    D = H.ops.random(H.shape[0], range(count), seed, distribution="normal", stream="landscape-random")
    return [D[:, j] for j in range(count)]


def filter_normalized_directions(H: ModelOperator, count: int = 1, seed: int = 0, *, bias: BiasRule = "zero",
                                 shapes: dict | None = None) -> list[Array]:
    """Random directions normalized filter by filter (Li et al. 2018).

    A standard-normal direction ``d`` is drawn as by :func:`random_directions`
    (stream ``"landscape-filter"``). For a parameter of two or more dimensions
    (a convolution kernel ``(out, in, kh, kw)``, a linear weight ``(out, in)``) every
    filter ``d[i]`` (the slice along the first axis, one output unit) is rescaled to
    the norm of the parameter's filter: ``d[i] <- d[i] / ||d[i]|| * ||theta[i]||``.
    Parameters of one dimension or none (biases, batch-norm scales and shifts) follow
    ``bias``: ``"zero"`` sets their direction to 0, the paper's choice for its plots
    (their ``ignore='biasbn'``), so the landscape moves the weights only; ``"norm"``
    treats the whole parameter as one filter and rescales it to the parameter's norm.

    The direction is built on the host (one copy of the parameters) and then moved to
    the operator's device: it is made once per landscape, not once per product.

    Args:
        H: a model-backed operator (``params_vector``, ``param_blocks``, ``param_shapes``).
        count: number of directions.
        seed: the random seed.
        bias: ``"zero"`` or ``"norm"``, the rule for 0-D/1-D parameters.
        shapes: parameter name -> shape, overriding ``H.param_shapes`` (for a backend
            whose operator reports flat shapes).

    Returns:
        A list of ``count`` vectors (n,) of the operator's backend.

    Raises:
        ValueError: an unknown ``bias`` rule, or shapes that do not fit the blocks.
    """
    _checks.choice("bias", bias, BIAS_RULES)
    seed = check_seed(seed)
    blocks = H.param_blocks
    shapes = dict(H.param_shapes if shapes is None else shapes)
    theta = H.ops.to_numpy(H.params_vector())
    n = theta.size
    out = []
    for j in range(count):
        d = _random.probes(n, [j], seed, distribution="normal", stream="landscape-filter")[:, 0]
        for name, s in blocks.items():
            shape = tuple(shapes.get(name, (s.stop - s.start,)))
            if math.prod(shape) != s.stop - s.start:
                raise ValueError(f"shape {shape} of parameter {name!r} does not fit its {s.stop - s.start} "
                                 "entries in the flat vector")
            d[s] = _normalize_block(d[s], theta[s], shape, bias)
        out.append(H.ops.from_numpy(d))
    return out


def _normalize_block(d: np.ndarray, w: np.ndarray, shape: tuple, bias: BiasRule) -> np.ndarray:
    if len(shape) <= 1:
        if bias == "zero":
            return np.zeros_like(d)
        rows_d, rows_w = d[None, :], w[None, :]
    else:
        rows_d, rows_w = d.reshape(shape[0], -1), w.reshape(shape[0], -1)
    dn = np.linalg.norm(rows_d, axis=1, keepdims=True)
    wn = np.linalg.norm(rows_w, axis=1, keepdims=True)
    return (rows_d * (wn / np.where(dn > 0, dn, 1.0))).ravel()


def make_directions(H: ModelOperator, directions: Directions, count: int, *, seed: int = 0,
                    eig: EigResult | None = None, bias: BiasRule = "zero", shapes: dict | None = None) -> list[Array]:
    """Directions by name (one of :data:`DIRECTIONS`): ``"eigen"`` (needs ``eig``), ``"random"`` or ``"filter"``."""
    _checks.choice("directions", directions, DIRECTIONS)
    if directions == "eigen":
        if eig is None:
            raise ValueError("eigen directions need the EigResult of eigsh(H, k=count): pass eig=...")
        return eigen_directions(eig, count)
    if directions == "random":
        return random_directions(H, count, seed)
    return filter_normalized_directions(H, count, seed, bias=bias, shapes=shapes)


# --- the landscape -------------------------------------------------------------------------
def _axis(span: float | Sequence[float], steps: int) -> np.ndarray:
    if isinstance(span, (tuple, list)):
        if len(span) != 2 or not span[0] < span[1]:
            raise ValueError(f"span must be a positive number or a pair (low, high) with low < high, got {span!r}")
        lo, hi = float(span[0]), float(span[1])
    else:
        half = _checks.positive_float("span", span)
        lo, hi = -half, half
    return np.linspace(lo, hi, steps)


def landscape(H: ModelOperator, directions: Sequence[Array] | EigResult | str, span: float | Sequence[float] = 1.0,
              steps: int = 21, *, seed: int = 0, name: Directions | None = None, eig: EigResult | None = None,
              bias: BiasRule = "zero", shapes: dict | None = None,
              callback: Callable[[int, int], Any] | None = None, progress: bool | str = False) -> Landscape:
    """The loss along one direction (a line) or two (a square grid) through the parameters.

    Args:
        H: a model-backed operator (from a backend's ``hessian``) with ``loss_at``.
        directions: a list/tuple of 1 or 2 vectors (n,) of the operator's backend
            (or NumPy arrays); an :class:`~specops.EigResult` (its top eigenvector); or a
            string: the directions' name (one of :data:`DIRECTIONS`) and the dimension,
            e.g. ``"filter-2d"``, ``"eigen-2d"`` (``"eigen"`` needs ``eig``).
        span: half-width of the grid (coordinates from ``-span`` to ``span``), or a pair
            ``(low, high)``. Coordinates multiply the direction vectors as they are:
            unit eigenvectors move ``span`` in parameter norm; filter-normalized
            directions move by ``span`` times each filter's norm.
        steps: grid points per axis (odd numbers put a point at 0).
        seed: seed of random directions.
        name: the name of vectors passed as ``directions`` (one of :data:`DIRECTIONS`), kept as
            ``settings["directions"]`` (inferred for strings and results; ``"custom"`` if not given).
        eig: the :class:`~specops.EigResult` for ``"eigen-..."`` strings.
        bias: rule for 1-D parameters of filter-normalized directions, see
            :func:`filter_normalized_directions`.
        shapes: parameter shapes overriding ``H.param_shapes``.
        callback: ``callback(done, total)`` after each evaluation (progress display).
        progress: draw a progress bar (tqdm) of the loss evaluations, with the last loss;
            a string labels it. Silent on MPI ranks other than 0.

    Returns:
        :class:`Landscape` with ``steps`` (1-D) or ``steps**2`` (2-D) losses.

    Raises:
        ValueError: not 1 or 2 directions, wrong lengths, bad span/steps.
        TypeError: an operator without ``loss_at``.
    """
    if not hasattr(H, "loss_at"):
        raise TypeError(f"landscape needs a model-backed operator with loss_at (from a backend's hessian); "
                        f"got {type(H).__name__}")
    steps = _checks.positive_int("steps", steps, minimum=2)
    seed = check_seed(seed)
    if isinstance(directions, str):
        label, _, dim = directions.partition("-")
        if dim not in ("1d", "2d"):
            raise ValueError(f"direction strings look like 'filter-2d' or 'eigen-1d', got {directions!r}")
        name = cast("Directions", _checks.choice("directions", label, DIRECTIONS))
        directions = make_directions(H, name, int(dim[0]), seed=seed, eig=eig, bias=bias, shapes=shapes)
    elif hasattr(directions, "eigenvectors"):
        name = name or "eigen"
        directions = eigen_directions(directions, 1)  # type: ignore[arg-type]  # duck-typed: any result with eigenvectors
    directions = list(directions)
    if len(directions) not in (1, 2):
        raise ValueError(f"landscape takes one direction (a line) or two (a plane), got {len(directions)}")
    n, ops = H.shape[0], H.ops
    dirs = []
    for i, d in enumerate(directions):
        d = ops.asarray(d)
        if tuple(d.shape) != (ops.local_rows(n),):
            raise ValueError(f"direction {i + 1} has shape {tuple(d.shape)}; it must be ({n},), like the parameters")
        dirs.append(d)
    alphas = _axis(span, steps)
    betas = _axis(span, steps) if len(dirs) == 2 else None
    total = steps ** len(dirs) + 1
    done = 0
    bar = progress_bar(progress, total, "landscape", unit="losses", comm=H)
    t0 = time.perf_counter()

    def at(delta: Array | None) -> float:
        nonlocal done
        value = H.loss_at(delta)
        done += 1
        bar.to(done)
        bar.show(loss=value)
        if callback is not None:
            callback(done, total)
        return value

    center = at(None)
    if betas is None:
        losses = np.array([at(dirs[0] * float(a)) for a in alphas])
    else:
        losses = np.array([[at(dirs[0] * float(a) + dirs[1] * float(b)) for b in betas] for a in alphas])
    settings = dict(directions=name or "custom", span=span if not isinstance(span, tuple) else list(span),
                    steps=steps, ndim=len(dirs), seed=seed, n=n, backend=H.backend,
                    direction_norms=[ops.norm(d) for d in dirs])
    if name == "filter":
        settings["bias"] = bias
    bar.close(center=float(center), min=float(losses.min()), max=float(losses.max()))
    return Landscape(alphas=alphas, betas=betas, losses=losses, center_loss=float(center),
                     num_evaluations=done, seconds=time.perf_counter() - t0, settings=settings,
                     directions=dirs)
