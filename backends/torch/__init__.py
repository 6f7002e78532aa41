"""The PyTorch backend: loss Hessians of ``nn.Module`` s, and dense torch matrices.

:func:`hessian` turns a model, a loss and data into a
:class:`specops.model.ModelOperator` whose vectors are flat tensors on the model's
device and dtype. This module supplies only the per-batch pieces
(:class:`TorchAdapter`) and the vector operations (:class:`TorchOps`); data
iteration, sample weighting, reductions, MPI and the checks live in the core.

The model is never mutated: every evaluation runs
``torch.func.functional_call`` with the parameters ``theta + delta`` given as
tensors, so the model's parameters, its train/eval mode and (for batch norm in
training mode) its running statistics are the same afterwards.

Hessian-vector product engines (``engine=``):

- ``"cached_graph"``: keep each batch's first-backward graph (built with
  ``create_graph=True``) and differentiate it again for every product. Fastest when
  the graphs fit in memory: one double backward per product, no forward.
- ``"double_backward"``: rebuild the forward and first backward per batch and product
  (``matmat`` shares one rebuild between its k columns). Memory of one batch.
- ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, vectorized
  over the k columns of ``matmat`` with ``torch.func.vmap`` (in chunks of
  ``chunk_size`` columns).
- ``"auto"``: ``cached_graph`` while the cached graphs stay within
  ``memory_budget``; if the first pass over the data exceeds it, the cache is dropped
  and the operator continues with ``double_backward``. ``H.engine`` says which is in use.
  On a CUDA device, blocks of several columns (``matmat``) use ``forward_over_reverse``,
  which vectorizes over the columns (docs/backends/torch.md, "On a GPU", has the measured
  cost per column).
- ``"finite_difference"``: central differences of gradients (``richardson=True``:
  extrapolated), for layers without second derivatives; inexact on ReLU networks.

At construction the engines are cross-checked (:meth:`TorchAdapter.cross_check`):
reverse-over-reverse against forward-over-reverse on one probe product, finite differences
deciding a mismatch; ``"auto"`` falls back from an engine found wrong, with a warning. The
engine in use then goes through the core's check (:mod:`specops.checks`: symmetry, the
finite-difference referee), which switches ``"auto"`` to ``"finite_difference"`` when no
exact engine is right (a ``@once_differentiable`` custom function).

Every graph for products is built with ``scaled_dot_product_attention`` on its math kernel
and twice-differentiable formulas for the few functions PyTorch lacks them for
(:data:`_SECOND_ORDER`: hardsigmoid). On CPU the first two engines also swap two of
PyTorch's second-derivative formulas for cheaper ones with the same results (:data:`_OVERRIDES`).

Models returning a ``ModelOutput`` or dict (Hugging Face) give ``loss_fn(outputs, targets)``
their ``.logits``; ``loss_fn=None`` takes the model's own ``outputs.loss``. bfloat16 and
float16 models compute products in their dtype with float32 vectors; ``autocast=`` runs a
float32 model under ``torch.autocast``.

Random layers (``random_layers=``): a forward pass that draws random numbers (dropout,
``DropPath``, ``RReLU`` in training mode, any ``torch.rand`` in ``forward``) has no fixed
Hessian, and ``cached_graph`` would silently keep one mask. By default (``"error"``) such a
model raises :class:`specops.NonDeterministicError` at construction, found by inspecting
the modules and by whether one forward pass of the first batch advances torch's random
generator. ``"fixed"`` opts in to the Hessian of one fixed random sub-network: every
forward of a batch runs with torch's generator seeded from that batch's contents (the
caller's generator state is restored afterwards), so each batch gets the same mask in
every product, loss and gradient, for every engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from specops.curvature import curvature_like
from specops.model import LossForm, ModelOperator
from specops.reduction import Reduction

from .adapter import TorchAdapter
from .calls import FunctionalModel
from .curvature import PRIMITIVES, fisher, ggn
from .engines import ENGINES, Engine
from .formulas import _OVERRIDES, _hardsigmoid  # noqa: F401 (tests patch and call them)
from .ops import TorchOps, matrix_operator
from .optim import preconditioner, stability_threshold
from .random_layers import RANDOM_LAYERS, RandomLayers

# the names of the API reference (preconditioner and stability_threshold are documented with .optim)
__all__ = ["ENGINES", "RANDOM_LAYERS", "FunctionalModel", "TorchAdapter", "TorchOps", "curvature_like", "fisher",
           "ggn", "hessian", "matrix_operator"]


# --- public entry point -------------------------------------------------------------
def hessian(model: nn.Module | Callable[..., Any], loss_fn: Any, data: Any, *, wrt: Any = None,
            reduction: Reduction | None = None,
            engine: Engine | None = None, comm: Any = None, check_deterministic: bool = True,
            progress: bool | str = False, loss_form: LossForm = "auto",
            memory_budget: int | None = None, chunk_size: int | None = None,
            batch_size: Callable[[Any], int] | None = None, random_layers: RandomLayers = "error",
            cross_check: bool = True, richardson: bool = False, autocast: torch.dtype | None = None,
            params: Any = None) -> ModelOperator:
    """The Hessian of a model's loss over data, as a specops operator on flat tensors.

    Args:
        model: an ``nn.Module`` with all parameters on one device and of one dtype
            (float32, float64, or bfloat16/float16: products in that dtype, float32 vectors).
            Its mode is used as is: call ``model.eval()`` yourself for batch norm with running
            statistics and without dropout. A ``torch.compile`` d module is differentiated
            through the module it wraps (compiled graphs have no double backward); a function
            ``f(params, inputs)`` with ``params={name: tensor}`` is a functional model. A model
            sharded with FSDP2's ``fully_shard`` gives vectors sharded like its parameters
            (``specops.backends.torch.sharded``).
        loss_fn: either ``loss_fn(outputs, targets)`` (e.g. ``nn.CrossEntropyLoss()``), applied
            to ``model(inputs)`` for each batch ``(inputs, targets)`` (``inputs`` a tuple is
            passed as ``model(*inputs)``, a dict as ``model(**inputs)``, or whole when
            ``forward`` takes one positional argument and not the keys as keywords); or the general
            ``loss_fn(model, batch)`` for any batch. Must return a scalar.
        data: one batch (a tuple ``(inputs, targets)`` or a dict) or a re-iterable of batches
            (a list, a ``DataLoader`` without shuffling). Tensors are moved to the model's
            device; floating-point ones are cast to its dtype.
        wrt: ``None`` (every parameter with ``requires_grad``), or names, glob patterns
            (``"stage2.*"``), modules or parameters, alone or in a list. Frozen parameters are
            always left out.
        reduction: ``"mean"`` if ``loss_fn`` averages over a batch, ``"sum"`` if it sums.
            ``None`` (default): the loss's own (``nn.*Loss.reduction``, a ``partial``'s
            keyword, ``"mean"`` for ``F.*`` functions); a value that contradicts it raises.
            For a plain function (default ``"mean"``) the first batch's loss is compared with
            its halves' at construction: one that behaves as the other reduction raises.
        engine: ``"auto"``, ``"cached_graph"``, ``"double_backward"``, ``"forward_over_reverse"``
            or ``"finite_difference"`` (see the module docstring); ``H.engine`` names the engine
            in use.
        comm: ``None`` or a communicator (``specops.distributed.MPIComm``); each rank passes its
            own shard of the data.
        check_deterministic: check every batch's loss is finite and that two identical products
            agree (catching dropout or shuffling data).
        progress: a :mod:`specops.progress` bar of the batches the products evaluate (the
            product and the batch in progress beside it): True, or a label.
        loss_form: ``"outputs"`` for ``loss_fn(outputs, targets)``, ``"model"`` for
            ``loss_fn(model, batch)``; ``"auto"`` picks ``"model"`` when the first parameter of
            ``loss_fn`` is named ``model``, ``module``, ``net`` or ``network``.
        memory_budget: bytes the cached graphs may take with ``engine="auto"`` (default: half the
            free GPU memory, or a quarter of the host's memory).
        chunk_size: columns per vectorized pass of ``forward_over_reverse`` (default: all).
        batch_size: ``batch -> int`` samples in a batch, where the first tensor's length is not it.
        random_layers: ``"error"`` (default): a model whose forward pass is random (dropout
            or other random layers in training mode, found from the modules and from whether
            a forward of the first batch draws random numbers) raises
            :class:`specops.NonDeterministicError`; ``"fixed"``: the Hessian of one fixed
            random sub-network, each batch with the same mask in every product.
        cross_check: check the engine on 8 samples of the first batch at construction:
            reverse-over-reverse against forward-over-reverse on one probe (finite differences
            decide a mismatch; ``H.adapter.cross_check_error`` is their difference), then the
            core's check (:func:`specops.checks.check_engine`: symmetry on two probes, and
            central differences of gradients where the two engines could not both run).
            ``"auto"`` falls back with a warning from an engine found wrong (to
            ``"finite_difference"`` when no exact engine is right), an explicit engine found
            wrong raises naming the one to use. ``H.engine_check`` records what was measured.
        richardson: with ``engine="finite_difference"``, Richardson extrapolation of two steps
            (four gradients per column instead of two, truncation error ``O(h^4)``).
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: evaluate a float32 (or
            float64) model under ``torch.autocast`` with that dtype. A model whose parameters
            are bfloat16 or float16 needs no flag: its products run in its dtype and its
            vectors are float32.
        params: with a functional ``model`` ``f(params, inputs)`` only: its parameters, a dict
            name -> tensor (see :class:`FunctionalModel`).

    Returns:
        A :class:`specops.model.ModelOperator`: ``H @ v`` for a flat tensor ``v``,
        ``H.param_blocks``, ``H.params_vector()``, ``H.loss_at(delta)``, ``H.gradient()``,
        ``H.restrict("stage1.*")``; ``H.unflatten(v)`` / ``H.as_params(v)`` give a dict of
        per-parameter tensors (for a vector or a block of k columns).

    Raises:
        ValueError: mixed parameter devices/dtypes, an empty selection, a bad keyword.
        specops.NonFiniteError: a batch's loss is not finite (the batch is named).
        specops.NonDeterministicError: a random forward pass (with ``random_layers="error"``;
            the layers and the fix are named), or two identical products differ.
        RuntimeError: no engine can differentiate the model twice (the message offers
            ``engine="finite_difference"``).
    """
    if not isinstance(model, nn.Module) and callable(model):
        if params is None:
            raise TypeError("model is a function, not an nn.Module: a functional model f(params, inputs) needs "
                            "params={name: tensor} (its parameters)")
        model = FunctionalModel(model, params)
    elif params is not None:
        raise TypeError("params= is the parameters of a functional model f(params, inputs); with an nn.Module, "
                        "select the parameters differentiated with wrt=")
    engine = "auto" if engine is None else engine
    from . import sharded as torch_sharded  # FSDP2 / DTensor parameters: sharded vectors

    if torch_sharded.is_sharded(model):
        return torch_sharded.hessian(model, loss_fn, data, reduction=PRIMITIVES.reduction(loss_fn, reduction), comm=comm,
                                     loss_form=loss_form,
                                     check_deterministic=check_deterministic, wrt=wrt, engine=engine,
                                     memory_budget=memory_budget, chunk_size=chunk_size, batch_size=batch_size,
                                     random_layers=random_layers, richardson=richardson, autocast=autocast,
                                     progress=progress)
    adapter = TorchAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, engine=engine,
                           memory_budget=memory_budget, chunk_size=chunk_size, batch_size=batch_size,
                           progress=progress, random_layers=random_layers, richardson=richardson,
                           autocast=autocast)
    resolved = PRIMITIVES.reduction(loss_fn, reduction)
    return ModelOperator(adapter, data, reduction=resolved, comm=comm, check_deterministic=check_deterministic,
                         cross_check=cross_check,
                         first_batch_check=lambda first: PRIMITIVES.check_reduction(adapter, loss_fn, resolved, first))
