"""The PyTorch :class:`~specops.model.ModelAdapter`: a model's per-batch loss, gradient and products."""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from specops import batches
from specops.layout import ParamLayout
from specops.model import NonDeterministicError, resolve_loss_form
from specops.progress import bar as progress_bar

from .calls import _eager, _LossModule, _map_tensors, _tensors
from .checks import _EngineChecks
from .engines import ENGINES, _default_memory_budget
from .ops import TorchOps
from .params import _check_uniform, _listing, _padding_rows, _resolve_params
from .random_layers import RANDOM_LAYERS, _random_layers_fix, _random_modules, _rng_states

if TYPE_CHECKING:
    from specops.curvature import CurvaturePrimitives

_HALF = (torch.bfloat16, torch.float16)


class TorchAdapter(_EngineChecks):
    """Per-batch loss, gradient and Hessian products of an ``nn.Module``.

    The selected parameters are snapshotted once as one flat vector ``theta``: the
    operator is the Hessian at the parameters it was built with. Everything else
    (unselected parameters, buffers) is read from the model at each evaluation.

    Args:
        model: the ``nn.Module``; its parameters share one dtype and device.
        loss_fn: ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)``, returning a scalar.
        wrt: parameter selection, see :func:`hessian`.
        loss_form: ``"outputs"``, ``"model"`` or ``"auto"``, see :func:`hessian`.
        engine: one of :data:`ENGINES`.
        memory_budget: bytes of cached graphs allowed with ``engine="auto"``.
        chunk_size: columns per ``vmap`` pass of ``forward_over_reverse`` (None: all).
        batch_size: optional ``batch -> int``; default the length of the first tensor.
        progress: a :mod:`specops.progress` bar of the batches the products evaluate, with the
            product and batch in progress: True, or a label.
        random_layers: ``"error"`` (raise for random layers in training mode) or ``"fixed"``
            (one fixed random mask per batch), see the module docstring.

    Raises:
        specops.NonDeterministicError: random layers in training mode with
            ``random_layers="error"``.
    """

    ops: TorchOps

    # Build graphs on CPU with the cheaper double backward of _OVERRIDES (False: PyTorch's
    # formulas, for benchmarks).
    # Not on CUDA: there it saves at large batches but costs more at small ones, where the products
    # are bound by kernel launches and the Python-level backward adds to them (docs/backends/torch.md,
    # "On a GPU").
    _cheap_double_backward = True

    def __init__(self, model: nn.Module, loss_fn: Any, *, wrt: Any = None,
                 loss_form: str = "auto", engine: str = "auto", memory_budget: int | None = None,
                 chunk_size: int | None = None, batch_size: Callable[[Any], int] | None = None,
                 progress: bool | str = False, random_layers: str = "error", richardson: bool = False,
                 autocast: torch.dtype | None = None, _fixed: dict[str, Any] | None = None,
                 _theta: Any = None):
        model = _eager(model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if random_layers not in RANDOM_LAYERS:
            raise ValueError(f"random_layers must be one of {RANDOM_LAYERS}, got {random_layers!r}")
        self.random_layers = random_layers
        dtype, device = _check_uniform(model)
        if random_layers == "error":
            found = _random_modules(model)
            if found:
                raise NonDeterministicError(
                    f"the model has random layers in training mode: {_listing(found)}. Each forward pass "
                    "draws new random numbers, so the loss has no fixed Hessian (the cached graph would "
                    "silently keep one random sub-network). " + _random_layers_fix()
                )
        if autocast is not None and autocast not in _HALF:
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        if autocast is not None and dtype in _HALF:
            raise ValueError(f"autocast={autocast} is for float32 or float64 models; the model is "
                             f"already {dtype}")
        # Half-precision models: products in the model's dtype, vectors (and theta, a master
        # copy that holds the half values exactly) in float32, host work in float64.
        self.param_dtype = dtype
        self.autocast = autocast
        self.ops = TorchOps(torch.float32 if dtype in _HALF else dtype, device)
        self.model = model
        self.loss_fn = loss_fn
        self.loss_form = "model" if loss_fn is None else resolve_loss_form(loss_fn, loss_form)
        self._module = _LossModule(model, loss_fn, self.loss_form, autocast or dtype)
        self._options: dict[str, Any] = {
            "loss_form": self.loss_form, "memory_budget": memory_budget, "chunk_size": chunk_size,
            "batch_size": batch_size, "progress": progress, "random_layers": random_layers,
            "richardson": richardson, "autocast": autocast}
        self._requested = self.requested_engine = engine
        self.engine = "cached_graph" if engine == "auto" else engine
        # auto on a GPU: blocks of columns through one vectorized forward-over-reverse pass
        # (cleared by the cross-check if that engine disagrees or fails)
        self._vectorize_columns = engine == "auto" and device.type == "cuda"
        self.richardson = richardson
        # relative difference of the engines compared at construction
        self.cross_check_error: float | None = None
        # the lowest precision a forward pass computes in (found by cross_check)
        self.compute_dtype = autocast or dtype
        self.memory_budget = (
            _default_memory_budget(device) if memory_budget is None else int(memory_budget)
        )
        self.chunk_size = chunk_size
        self._batch_size_fn = batch_size
        self._bar = progress_bar(progress, None, "hessian", unit="batches")

        names = _resolve_params(model, wrt)
        all_params = dict(model.named_parameters())
        self.layout = ParamLayout(names, [tuple(all_params[n].shape) for n in names])
        if _theta is None:
            _theta = self.flatten({n: all_params[n].detach() for n in names}) if names else None
        self._theta = _theta
        self._padding_rows = _padding_rows(model, self.param_blocks, self.ops)
        # Parameters held fixed: the model's own, or the values a parent adapter differentiated.
        self._fixed = dict(_fixed or {})
        for n, p in all_params.items():
            if n not in self.layout.shapes and n not in self._fixed:
                self._fixed[n] = p
        self._cache: dict[int, tuple[Any, Any, Any, int]] = {}
        self._cache_bytes = 0
        self._products = 0

    # --- layout -------------------------------------------------------------------
    def params_vector(self) -> torch.Tensor:
        return self._theta.clone()

    def subset(self, names: list[str]) -> TorchAdapter:
        current = self.unflatten(self._theta)
        fixed = dict(self._fixed)
        fixed.update({n: t for n, t in current.items() if n not in names})
        engine = self._requested
        sub = TorchAdapter(self.model, self.loss_fn, wrt=list(names), engine=engine, _fixed=fixed,
                           _theta=self.layout.subset(names).flatten({n: current[n] for n in names}, self.ops), **self._options)
        sub._vectorize_columns = self._vectorize_columns  # the engine decision of the cross-check
        if engine == "auto" and self.engine == "forward_over_reverse":
            sub.engine = self.engine
        return sub

    # --- evaluation ---------------------------------------------------------------
    def batch_size(self, batch: Any) -> int:
        if self._batch_size_fn is not None:
            return int(self._batch_size_fn(batch))
        return batches.batch_size(_tensors(batch))

    def _prepare(self, batch):
        """Tensors to the model's device; floating ones to its dtype."""
        ops, param_dtype = self.ops, self.param_dtype

        def move(t):
            dtype = param_dtype if t.is_floating_point() else t.dtype
            return t.to(device=ops.torch_device, dtype=dtype)

        return _map_tensors(move, batch)

    def _state(self, theta):
        state = {"model." + n: p.detach() for n, p in self._fixed.items()}
        # One torch.split, not a slice per parameter: the backward of a slice writes a zero-filled
        # copy of the whole vector, so with slices a gradient costs one pass over n per parameter
        # tensor (docs/backends/torch.md, "Measurements behind the code"); split's backward is one
        # concatenation.
        pieces = theta if isinstance(theta, tuple) else theta.split(self.layout.sizes)
        state.update({"model." + n: t.view(self.layout.shapes[n]).to(self.param_dtype)
                      for n, t in zip(self.layout.names, pieces)})
        # Copies of the buffers: batch norm in training mode updates them in place.
        state.update({"model." + n: b.clone() for n, b in self.model.named_buffers()})
        return state

    def _loss(self, theta, batch):
        if self.autocast is not None:
            with torch.autocast(self.ops.torch_device.type, dtype=self.autocast):
                return self._loss_in_dtype(theta, batch).float()
        return self._loss_in_dtype(theta, batch)

    def _loss_in_dtype(self, theta, batch):
        if self.random_layers == "fixed":
            return self._fixed_mask_loss(theta, batch)
        return torch.func.functional_call(self._module, self._state(theta), (batch,))

    def _fixed_mask_loss(self, theta, batch):
        """The loss with torch's generator seeded from the batch: one random mask per batch."""
        with self.seeded_by(batch):
            return torch.func.functional_call(self._module, self._state(theta), (batch,))

    @contextlib.contextmanager
    def seeded_by(self, batch: Any) -> Iterator[None]:
        """Seed torch's generators, within, from ``batch`` (``random_layers="fixed"``), restored after."""
        device = self.ops.torch_device
        seed = hash(self._fingerprint(batch)) % (1 << 62)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield

    def keeping_random_state(self) -> contextlib.AbstractContextManager:
        device = self.ops.torch_device
        return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def check_random_forward(self, batch: Any) -> float | None:
        """Raise if one forward pass of ``batch`` draws random numbers (``random_layers="error"``).

        Catches what inspecting the modules cannot: ``torch.rand``, ``F.dropout`` and other
        random functions called in a ``forward``. The caller's generator state is kept.

        Returns:
            The batch's loss from that forward pass (None with other ``random_layers``).
        """
        if self.random_layers != "error":
            return None
        device = self.ops.torch_device
        batch = self._prepare(batch)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            before = _rng_states(device)
            with torch.no_grad():
                loss = float(self._loss(self._theta, batch))
            after = _rng_states(device)
        if any(not torch.equal(a, b) for a, b in zip(before, after)):
            raise NonDeterministicError(
                "a forward pass of the first batch draws random numbers (torch's random generator "
                "advanced): a random layer or function in training mode (F.dropout, torch.rand, "
                "torch.randn_like, ...) makes every product use new random numbers, so the loss has no "
                "fixed Hessian. " + _random_layers_fix()
            )
        return loss

    def loss(self, batch: Any, delta: torch.Tensor | None = None) -> float:
        theta = self._theta if delta is None else self._theta + delta
        with torch.no_grad():
            return float(self._loss(theta, self._prepare(batch)))

    def gradient(self, batch: Any) -> torch.Tensor:
        theta = self._theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss(theta, self._prepare(batch)), theta, allow_unused=True)
        return torch.zeros_like(theta) if g is None else g

    # --- diagnostics --------------------------------------------------------------
    def curvature_primitives(self) -> CurvaturePrimitives:
        """The PyTorch primitives of GGN and Fisher operators (:mod:`specops.curvature`)."""
        from .curvature import PRIMITIVES

        return PRIMITIVES

    def determinism_hints(self) -> list[str]:
        dropout = [n for n, m in self.model.named_modules()
                   if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
        batchnorm = [n for n, m in self.model.named_modules()
                     if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
        hints = []
        if dropout:
            hints.append(f"dropout in training mode ({_listing(dropout)}): call model.eval() first")
        if batchnorm:
            hints.append(
                f"batch norm in training mode ({_listing(batchnorm)}) normalizes with batch statistics: "
                "call model.eval() to use the running statistics"
            )
        hints.append("a data loader that shuffles or augments (use shuffle=False and fixed transforms)")
        return hints
