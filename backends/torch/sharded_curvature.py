"""The GGN and the Fishers of PyTorch models sharded with FSDP2, through the model's own forward and backward.

``specops.backends.torch.ggn`` / ``fisher`` on a model wrapped with ``fully_shard`` return an
operator whose vectors are sharded like the parameters, as the FSDP2 Hessian's
(:mod:`specops.backends.torch.sharded`: the same data handling, weighting over ranks,
``wrt=`` / ``restrict``, ``as_params`` and bad-input checks). Every curvature is

``C v = sum_b w_b J_b^T M_b J_b v``

over every rank's batches ``b`` (``w_b`` their sample weights), ``M_b`` the output-space
matrix of the batch's loss from :mod:`specops.output_space` (GGN: the loss's Hessian in the
outputs; empirical Fisher: the per-sample output gradients' outer products; Monte-Carlo
Fisher: those at labels sampled from the model, drawn as the unsharded backend draws them
with ``comm=``: from ``seed`` and the batch's index on its rank). A product of one column:

1. ``J v`` by central differences of the outputs, ``(f(theta + h u) - f(theta - h u)) |v| / 2h``
   with ``u = v / |v|``: two forward passes without a graph, the shards stepped in place and
   restored exactly as for the FSDP2 Hessian, with its step ``h = eps**(1/3) max(1, rms(theta))``.
   The error is ``O(h^2)`` truncation plus ``O(eps / h)`` rounding of the outputs: about
   ``1e-10`` relative in float64 and ``1e-4`` in float32.
2. ``M (J v)`` exactly, per sample, on each rank's own outputs (at ``theta``).
3. ``J^T w`` by one ``backward()`` of ``<f(theta), w>`` scaled like the loss, so that FSDP2's
   reduce-scatter average gives each rank its shard of the sample-weighted sum over every
   rank's data.

A product costs two forwards and one forward and backward. Forward-mode AD cannot replace
step 1 (PyTorch 2.13): ``torch.func.jvp`` and ``forward_ad.make_dual`` fail on DTensor
parameters (``aten._has_same_storage_numel`` has no sharding strategy), and a tangent on the
local shards does not survive FSDP2's all-gather (a copy without autograd).

The construction is the core's (:func:`specops.curvature.curvature_operator`): the loss
must be a function of the outputs, its reduction is read from a loss object, and a plain
function's is checked on the first batch and its halves (on every rank together, their
forwards being collective; skipped when a rank's first batch has fewer than two samples),
then the closed form on the first batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from specops import batches
from specops.curvature import CurvaturePrimitives, curvature_operator
from specops.model import ModelOperator

from .calls import _CALL, _call
from .curvature import PRIMITIVES as _UNSHARDED
from .curvature import _TorchCurvature
from .sharded import FSDPAdapter, hessian


class _BatchLoss:
    """An FSDP2 adapter's batch loss without its weight: the loss ``check_split`` compares with its halves'."""

    def __init__(self, adapter: FSDPAdapter) -> None:
        self.adapter = adapter

    def batch_size(self, batch: Any) -> int:
        return self.adapter.batch_size(batch)

    def loss(self, batch: Any) -> float:
        return self.adapter.loss(batch) / self.adapter.weights(self.batch_size(batch))


class _FSDPCurvature(_TorchCurvature):
    """``V -> J^T M J V`` for one batch of an :class:`FSDPAdapter` (see the module docstring)."""

    base: FSDPAdapter  # type: ignore[assignment]  # the FSDP2 adapter in place of the unsharded one

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        return batches.split(batch, _CALL)

    def _forward(self, inputs: Any) -> torch.Tensor:
        """The model's outputs at the shards as they are (without a graph: resharded after)."""
        out = batches.logits(_call(self.base.model, inputs), _CALL)
        if not torch.is_grad_enabled():
            self.base._reshard()  # FSDP2 keeps the root gathered after a forward without backward
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"ggn and fisher need a model that returns one tensor, got {type(out).__name__}")
        return out

    def _outputs(self, theta: Any, inputs: Any, batch: Any) -> torch.Tensor:
        return self._forward(inputs)  # theta: the shards themselves

    def _native_noise(self, host: Any, out: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(host, dtype=out.dtype, device=out.device)

    def _jvp(self, inputs: Any, v: torch.Tensor, norm: float, h: float) -> torch.Tensor:
        """``J v`` of the outputs: central differences of two forwards at ``theta +- h v / |v|``."""
        sides = []
        direction = self.base._direction(v)
        with torch.no_grad(), self.base._stepping() as step:
            for sign in (1.0, -1.0):
                step(direction, sign * h / norm)
                sides.append(self._forward(inputs))
        return (sides[0] - sides[1]) * (norm / (2 * h))

    def _pulled(self, index: int, inputs: Any, targets: Any, Z: torch.Tensor) -> torch.Tensor:
        """``<f(theta), M Z>`` with the graph of ``f``: its gradient is ``J^T M Z``."""
        out = self._forward(inputs)
        M = self._output_matrix(index, out.detach(), targets)
        return torch.sum(out * M(Z))

    def __call__(self, index: int, batch: Any, V: torch.Tensor) -> torch.Tensor:
        base = self.base
        base._check_unchanged()
        inputs, targets = self._pair(batch)
        scale = base._scale_of(batch)
        h = base.step_size(V.dtype)
        norms = base.ops.column_norms(V)
        result = torch.zeros_like(V)
        with base._grads_kept():
            for j in range(V.shape[1]):
                if norms[j] == 0.0:
                    continue
                Z = self._jvp(inputs, V[:, j], float(norms[j]), h)
                base._backward_into(result[:, j], lambda: self._pulled(index, inputs, targets, Z) * scale, 1.0)
        return result


@dataclasses.dataclass(frozen=True)
class _FSDPPrimitives(CurvaturePrimitives):
    """The unsharded backend's loss readers, FSDP2's product and a collective reduction check."""

    def check_reduction(self, adapter: Any, loss_fn: Any, reduction: str, first_batch: Any) -> None:
        """As the core's, on every rank together; skipped when a rank's first batch cannot be halved.

        Args:
            adapter: the :class:`FSDPAdapter`.
            loss_fn: the loss.
            reduction: the resolved reduction.
            first_batch: this rank's first batch (None: no data).
        """
        from specops.reduction import check_plain

        sizes = adapter.comm.allgather(0 if first_batch is None else adapter.batch_size(first_batch))
        if min(sizes) >= 2:  # check_split's forwards are collective: every rank runs them, or none
            check_plain(_BatchLoss(adapter), loss_fn, self.loss_reduction(loss_fn), reduction, first_batch,
                        self.reduction_eps(adapter))


PRIMITIVES = _FSDPPrimitives(**{
    **{f.name: getattr(_UNSHARDED, f.name) for f in dataclasses.fields(CurvaturePrimitives)},
    "engine": "J^T M J v: J v by central differences of FSDP2 forwards, J^T by FSDP2's backward (reduce-scatter)",
    "product": _FSDPCurvature,
    "reduction_eps": lambda adapter: float(torch.finfo(adapter._theta_dtype).eps),
})


def curvature(model: nn.Module, loss_fn: Any, data: Any, which: Any, *, reduction: str, comm: Any,
              check_deterministic: bool, loss_form: str, num_samples: int = 1, seed: int = 0,
              datum: str = "sample", **options: Any) -> ModelOperator:
    """The GGN or a Fisher of an FSDP2 model over every rank's data, with sharded vectors.

    Called by :func:`specops.backends.torch.ggn` and :func:`~specops.backends.torch.fisher`
    for a model with DTensor parameters (see the module docstring).

    Args:
        model: a model wrapped with ``fully_shard`` on a 1-D ``DeviceMesh``.
        loss_fn: ``loss_fn(outputs, targets)``.
        data: this rank's batches; every rank passes the same number of batches.
        which: ``"ggn"``, ``"empirical_fisher"`` or ``"mc_fisher"``.
        reduction: ``"mean"`` or ``"sum"`` (resolved).
        comm: as for :func:`specops.backends.torch.sharded.hessian`.
        check_deterministic: as for :func:`specops.backends.torch.hessian`.
        loss_form: ``"auto"`` or ``"outputs"``.
        num_samples: Monte-Carlo labels per sample of ``"mc_fisher"``.
        seed: the seed of those labels.
        datum: of ``"empirical_fisher"``.
        **options: as for :func:`specops.backends.torch.sharded.hessian` (``wrt=``; those that
            do not apply raise).

    Returns:
        A :class:`specops.ModelOperator` whose vectors are this rank's shards.

    Raises:
        ValueError: as :func:`specops.backends.torch.sharded.hessian`, and a loss that is not a
            function of the outputs alone, or whose reduction is not ``reduction``.
    """
    H = hessian(model, loss_fn, data, reduction=reduction, comm=comm, check_deterministic=False,
                loss_form=loss_form, **options)
    return curvature_operator(H.adapter, which, H._data, reduction=H.reduction, comm=H.comm,
                              check_deterministic=check_deterministic, num_samples=num_samples, seed=seed,
                              datum=datum, operator=type(H))


__all__ = ["PRIMITIVES", "curvature"]
