"""The Gauss-Newton matrix and the Fishers of PyTorch models (see specops.curvature, specops.output_space)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from specops.curvature import CurvaturePrimitives, FisherEstimator, curvature_operator, fisher_curvature
from specops.model import ModelOperator
from specops.output_space import LossSpec

from .adapter import TorchAdapter
from .sharded import is_sharded


def _unwrap_loss(loss_fn):
    """``(function or module, keywords)`` of a loss, through ``functools.partial``; None if positional."""
    import functools

    kw, fn = {}, loss_fn
    if isinstance(fn, functools.partial):
        if fn.args:
            return None, {}
        kw, fn = dict(fn.keywords), fn.func
    return fn, kw


def _loss_reduction(loss_fn: Any) -> str | None:
    """The reduction a PyTorch loss states (``nn.*Loss.reduction``, a ``partial``'s keyword), or None."""
    fn, kw = _unwrap_loss(loss_fn)
    if isinstance(fn, nn.modules.loss._Loss):
        return str(fn.reduction)
    if fn in (F.cross_entropy, F.mse_loss, F.binary_cross_entropy_with_logits, F.binary_cross_entropy,
              F.nll_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.kl_div):
        return str(kw.get("reduction", "mean"))
    return None


def _loss_spec(loss_fn):
    """The :class:`~specops.output_space.LossSpec` of a PyTorch loss read exactly, or None.

    ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` (classes on axis 1, any trailing axes,
    ``ignore_index``; "mean" over the kept positions) without ``weight`` or
    ``label_smoothing``; ``nn.MSELoss`` / ``F.mse_loss`` and ``nn.BCEWithLogitsLoss`` /
    ``F.binary_cross_entropy_with_logits`` without weights (any shape, "mean" over every
    entry). Every other loss gets autodiff.
    """
    from specops.output_space import LossSpec

    fn, kw = _unwrap_loss(loss_fn)
    if isinstance(fn, nn.CrossEntropyLoss):
        kw = {"weight": fn.weight, "reduction": fn.reduction, "ignore_index": fn.ignore_index,
              "label_smoothing": fn.label_smoothing}
        fn = F.cross_entropy
    elif isinstance(fn, nn.MSELoss):
        kw, fn = {"reduction": fn.reduction}, F.mse_loss
    elif isinstance(fn, nn.BCEWithLogitsLoss):
        kw, fn = {"reduction": fn.reduction, "weight": fn.weight, "pos_weight": fn.pos_weight}, \
            F.binary_cross_entropy_with_logits
    reduction = kw.get("reduction", "mean")
    if reduction not in ("mean", "sum") or any(kw.get(k) is not None for k in ("weight", "pos_weight")):
        return None
    if fn is F.cross_entropy and not kw.get("label_smoothing"):
        ignore = kw.get("ignore_index", -100)

        def mask(targets, out):
            if targets.is_floating_point():  # class probabilities: ignore_index does not apply
                return None
            return (targets != ignore).unsqueeze(1).to(out.dtype)

        return LossSpec("categorical", 1, "positions" if reduction == "mean" else "sum", mask=mask)
    if fn is F.mse_loss:
        return LossSpec("gaussian", -1, "entries" if reduction == "mean" else "sum", factor=2.0)
    if fn is F.binary_cross_entropy_with_logits:
        return LossSpec("bernoulli", -1, "entries" if reduction == "mean" else "sum")
    return None


_TORCH_KNOWN_LOSSES = ("nn.CrossEntropyLoss / F.cross_entropy without weight or label_smoothing "
                       "(categorical over axis 1), nn.MSELoss / F.mse_loss (Gaussian), nn.BCEWithLogitsLoss / "
                       "F.binary_cross_entropy_with_logits without weights (Bernoulli), reduction 'mean' or 'sum'")


def _output_ops():
    """The PyTorch primitives of :class:`specops.output_space.OutputOps`."""
    from specops.output_space import OutputOps

    return OutputOps(
        softmax=lambda x, axis: torch.softmax(x, dim=axis),
        sigmoid=torch.sigmoid,
        sum=lambda x, axes: x.sum(dim=axes, keepdim=True),
        onehot_max=lambda x, axis: (x == x.amax(dim=axis, keepdim=True)).to(x.dtype),
        less=lambda x, y: (x < y).to(y.dtype),
        numel=lambda x: x.numel(),
        grad=lambda loss, out: torch.func.grad(loss)(out),
        hvp=lambda loss, out, Z: torch.func.jvp(torch.func.jacrev(loss), (out,), (Z,))[1],
        asarray=lambda host, like: torch.as_tensor(host, dtype=like.dtype, device=like.device),
        host=lambda x: x.detach().cpu().double().numpy(),
    )


class _TorchCurvature:
    """``V -> J^T M J V`` for one batch of a :class:`TorchAdapter` (``M`` from specops.output_space)."""

    def __init__(self, base: TorchAdapter, kind: str, reduction: str, num_samples: int, seed: int,
                 datum: str = "sample", spec: Any = None):
        self.base, self.kind, self.reduction, self.datum = base, kind, reduction, datum
        self.num_samples, self.seed = num_samples, seed
        self.spec = spec
        self.output_ops = _output_ops()
        self._noise: dict[Any, Any] = {}

    def _outputs(self, theta, inputs, batch):
        base = self.base
        state = {k[len("model."):]: v for k, v in base._state(theta).items()}

        def call():
            if isinstance(inputs, dict):
                return torch.func.functional_call(base.model, state, (), inputs)
            args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            return torch.func.functional_call(base.model, state, args)

        if base.random_layers != "fixed":
            return call()
        with base.seeded_by(batch):
            return call()

    def _pair(self, batch):
        prepared = self.base._prepare(batch)
        if not (isinstance(prepared, (tuple, list)) and len(prepared) == 2):
            raise TypeError("ggn and fisher need batches (inputs, targets)")
        return prepared

    def _loss_of_outputs(self, targets):
        return lambda out: self.base.loss_fn(out, targets)

    def _output_matrix(self, index, out, targets):
        from specops.output_space import output_matrix

        noise = self._draw(index, out) if self.kind == "mc" else None
        return output_matrix(self.kind, self.spec, self.output_ops, out, targets, self._loss_of_outputs(targets),
                             reduction=self.reduction, datum=self.datum, noise=noise)

    def validate(self, batch):
        """Check the closed form on ``batch`` (see :func:`specops.output_space.validate`)."""
        from specops.output_space import validate

        inputs, targets = self._pair(batch)
        with torch.no_grad():
            out = self._outputs(self.base._theta, inputs, (inputs, targets))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"ggn and fisher need a model that returns one tensor, got {type(out).__name__}")
        checked, error = validate(self.kind, self.spec, self.output_ops, out, targets, self._loss_of_outputs(targets),
                                  datum=self.datum, eps=float(torch.finfo(out.dtype).eps), known=_TORCH_KNOWN_LOSSES)
        return checked, error

    def _draw(self, index, out):
        from specops.output_space import mc_noise

        noise = self._noise.get(index)
        if noise is None or tuple(noise.shape[1:]) != tuple(out.shape):
            host = mc_noise(tuple(out.shape), self.spec, self.num_samples, self.seed, index)
            noise = self._noise[index] = self._native_noise(host, out)
        return noise

    def _native_noise(self, host, out):
        return self.base.ops.asarray(host).to(out.dtype)

    def __call__(self, index, batch, V):
        base = self.base
        prepared = self._pair(batch)
        inputs, targets = prepared

        def f(t):
            out = self._outputs(t, inputs, prepared)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"ggn and fisher need a model that returns one tensor, got {type(out).__name__}")
            return out

        if V.shape[1] > 1:
            return self._vectorized(f, index, targets, V)
        # One column: one forward-mode pass gives the outputs (recorded for the backward) and
        # their tangent J v at once, then one backward gives J^T M J v. ResNet-20 on CPU (batch
        # 32, one thread): 1.9 gradients, against 2.2 for torch.func's vjp + jvp (two forwards).
        import torch.autograd.forward_ad as fwAD

        theta = base._theta.detach().requires_grad_(True)
        with fwAD.dual_level():
            out, Z = fwAD.unpack_dual(f(fwAD.make_dual(theta, V[:, 0])))
        M = self._output_matrix(index, out.detach(), targets)
        (w,) = torch.autograd.grad(out, theta, M(Z.detach()), allow_unused=True)
        return (torch.zeros_like(V) if w is None else w[:, None])

    def _vectorized(self, f, index, targets, V):
        """``torch.func``: one forward for the VJP, the k JVPs and VJPs vectorized by ``vmap``.

        In chunks of ``chunk_size`` columns. ResNet-20 on CPU, 4 columns: 1.9 gradients per
        column, against 2.0 for 4 single-column products.
        """
        theta = self.base._theta
        out, vjp_fn = torch.func.vjp(f, theta)
        M = self._output_matrix(index, out.detach(), targets)

        def column(v):
            return vjp_fn(M(torch.func.jvp(f, (theta,), (v,))[1]))[0]

        return torch.func.vmap(column, in_dims=1, out_dims=1, chunk_size=self.base.chunk_size,
                               randomness="same")(V)


PRIMITIVES = CurvaturePrimitives(
    form_hint="loss_fn(outputs, targets), e.g. nn.CrossEntropyLoss()",
    engine="J^T M J v, one column by forward-mode JVP and backward, blocks by vmap of torch.func jvp/vjp",
    # the readers are looked up when called (tests replace them)
    loss_reduction=lambda loss_fn: _loss_reduction(loss_fn),
    loss_spec=lambda loss_fn: _loss_spec(loss_fn),
    product=_TorchCurvature,
    reduction_eps=lambda adapter: float(torch.finfo(adapter.param_dtype).eps),
)


def ggn(model: nn.Module, loss_fn: Any, data: Any, *, wrt: Any = None, reduction: str | None = None,
        comm: Any = None, check_deterministic: bool = True, progress: bool = False, loss_form: str = "auto",
        chunk_size: int | None = None, batch_size: Callable[[Any], int] | None = None,
        random_layers: str = "error") -> ModelOperator:
    """The generalized Gauss-Newton matrix ``J^T (d^2 L/df^2) J`` of a model's loss over data.

    Products cost one Jacobian-vector product through the model and one vector-Jacobian
    product (k columns vectorized by ``torch.func.vmap``); the loss Hessian with respect
    to the outputs is in closed form for the losses specops reads exactly (softmax
    cross-entropy over axis 1 with any trailing axes and ``ignore_index``, squared error,
    binary cross-entropy with logits; checked against autodiff on the first batch) and by
    autodiff of the loss otherwise. Positive semi-definite when the loss is convex in the outputs. ``H - G`` (with
    ``H = hessian(...)`` on the same arguments) is the residual term.

    Args:
        model: the ``nn.Module``, as for :func:`hessian`; it must return one tensor. A model
            sharded with FSDP2's ``fully_shard`` gives vectors sharded like its parameters,
            products through its own forward and backward
            (:mod:`specops.backends.torch.sharded_curvature`).
        loss_fn: ``loss_fn(outputs, targets)``, as for :func:`hessian`.
        data: the batches, as for :func:`hessian`.
        wrt: the parameter selection, as for :func:`hessian`.
        reduction: ``"mean"`` or ``"sum"`` over the samples, as for :func:`hessian` (by
            default the loss's own).
        comm: ``None`` or a communicator, as for :func:`hessian`.
        check_deterministic: as for :func:`hessian`.
        progress: report batches and products on stderr, as for :func:`hessian`.
        loss_form: ``"auto"`` or ``"outputs"``; ``"model"`` is refused.
        chunk_size: columns per vectorized pass (default: all), as for :func:`hessian`.
        batch_size: ``batch -> int``, as for :func:`hessian`.
        random_layers: ``"error"`` or ``"fixed"``, as for :func:`hessian`.

    Returns:
        A :class:`specops.ModelOperator` (``G.adapter.curvature == "ggn"``) that every
        algorithm takes like a Hessian.

    Raises:
        ValueError: a loss that is not a function of the outputs alone (``loss_form="model"``),
            and every error that :func:`hessian` raises for the same arguments.
    """
    if is_sharded(model):  # FSDP2: sharded vectors, products through the model's forward and backward
        from .sharded_curvature import curvature

        return curvature(model, loss_fn, data, "ggn", reduction=PRIMITIVES.reduction(loss_fn, reduction), comm=comm,
                         check_deterministic=check_deterministic, loss_form=loss_form, wrt=wrt,
                         chunk_size=chunk_size, batch_size=batch_size, random_layers=random_layers, progress=progress)
    base = TorchAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, engine="double_backward",
                        chunk_size=chunk_size, batch_size=batch_size, progress=progress, random_layers=random_layers)
    return curvature_operator(base, "ggn", data, reduction=reduction, comm=comm,
                              check_deterministic=check_deterministic)


def fisher(model: nn.Module, loss_fn: Any, data: Any, *, estimator: FisherEstimator = "empirical", num_samples: int = 1,
           seed: int = 0, wrt: Any = None, reduction: str | None = None, comm: Any = None,
           check_deterministic: bool = True,
           progress: bool = False, loss_form: str = "auto", chunk_size: int | None = None,
           batch_size: Callable[[Any], int] | None = None, random_layers: str = "error",
           datum: str = "sample") -> ModelOperator:
    """The Fisher matrix of a model's loss over data: empirical or Monte-Carlo sampled.

    ``estimator="empirical"``: ``c sum_i g_i g_i^T`` over the per-sample gradients ``g_i`` at the
    true targets (``c = 1/N`` with ``reduction="mean"``, 1 with ``"sum"``), as the products
    ``J^T (r_i r_i^T / c) J`` with the per-sample output gradients ``r_i``, so they cost
    about a GGN product. ``estimator="mc"``: targets sampled ``num_samples`` times per sample
    from the model's predictive distribution (categorical for cross-entropy, Gaussian for
    squared error), drawn once per batch from ``seed``; equal to the GGN in expectation.

    Args:
        estimator: ``"empirical"`` or ``"mc"``.
        num_samples: sampled labels per sample for ``estimator="mc"``.
        seed: the seed of the sampled labels (the same on every backend).
        model: the ``nn.Module``, as for :func:`ggn`.
        loss_fn: ``loss_fn(outputs, targets)``, as for :func:`ggn`.
        data: the batches, as for :func:`ggn`.
        wrt: the parameter selection, as for :func:`ggn`.
        reduction: ``"mean"`` or ``"sum"`` over the samples, as for :func:`ggn`.
        comm: ``None`` or a communicator, as for :func:`ggn`.
        check_deterministic: as for :func:`ggn`.
        progress: report batches and products on stderr, as for :func:`ggn`.
        loss_form: ``"auto"`` or ``"outputs"``, as for :func:`ggn`.
        chunk_size: columns per vectorized pass, as for :func:`ggn`.
        batch_size: ``batch -> int``, as for :func:`ggn`.
        random_layers: ``"error"`` or ``"fixed"``, as for :func:`ggn`.
        datum: of ``estimator="empirical"``: ``"sample"`` (default; each sample one datum, its
            loss the loss of that sample alone) or ``"term"`` (each loss term one datum:
            each position of a cross-entropy's class axis 1, each row of the last axis of
            a squared error or binary cross-entropy; curvlinops' ``EFLinearOperator``).
            See ``docs/curvature.md``.

    Returns:
        A :class:`specops.ModelOperator` (``F.adapter.curvature`` is ``"empirical_fisher"`` or
        ``"mc_fisher"``).

    Raises:
        ValueError: ``estimator="mc"`` with a loss whose likelihood is not known (the message
            names the losses that are); a loss that is not a function of the outputs alone;
            a bad ``estimator``, ``num_samples`` or ``seed``.
    """
    curvature = fisher_curvature(estimator)
    if is_sharded(model):
        from .sharded_curvature import curvature as sharded

        return sharded(model, loss_fn, data, curvature, reduction=PRIMITIVES.reduction(loss_fn, reduction), comm=comm,
                       check_deterministic=check_deterministic, loss_form=loss_form, num_samples=num_samples,
                       seed=seed, datum=datum, wrt=wrt, chunk_size=chunk_size, batch_size=batch_size,
                       random_layers=random_layers, progress=progress)
    base = TorchAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, engine="double_backward",
                        chunk_size=chunk_size, batch_size=batch_size, progress=progress, random_layers=random_layers)
    return curvature_operator(base, curvature, data, reduction=reduction, comm=comm,
                              check_deterministic=check_deterministic, num_samples=num_samples, seed=seed,
                              datum=datum)
