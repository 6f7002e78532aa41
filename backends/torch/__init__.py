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
  which vectorizes over the columns (measured 2x faster per column on an H100).
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

import contextlib
import functools
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from specops.checks import finite_difference_products, identity
from specops.distributed import register_device_buffers
from specops.layout import ParamLayout, select_names
from specops.model import ModelAdapter, ModelOperator, NonDeterministicError, renamed, resolve_loss_form
from specops.operator import MatrixOperator, check_dense_symmetric
from specops.ops import ROWS, VectorOps, sum_over_rows

ENGINES = ("auto", "cached_graph", "double_backward", "forward_over_reverse", "finite_difference")
_REVERSE = ("cached_graph", "double_backward")
RANDOM_LAYERS = ("error", "fixed")
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


# --- vector operations ----------------------------------------------------------------
class TorchOps(VectorOps):
    """Vector operations on torch tensors of one dtype on one device.

    Args:
        dtype: ``torch.float32`` / ``torch.float64`` (or the NumPy equivalents).
        device: a ``torch.device`` or device string.
    """

    name = "torch"
    in_place = True

    def __init__(self, dtype: Any = torch.float64, device: Any = "cpu"):
        if isinstance(dtype, torch.dtype):
            if dtype not in _TORCH_TO_NUMPY:
                raise TypeError(
                    f"specops works on float32 or float64 tensors, got {dtype}; cast the model "
                    "with model.float() or model.double()"
                )
            dtype = _TORCH_TO_NUMPY[dtype]
        super().__init__(dtype, str(torch.device(device)))
        self.torch_dtype = torch.float32 if self.dtype == np.float32 else torch.float64
        self.torch_device = torch.device(device)
        # rows per float32 partial sum of inner products and norms (specops.ops.sum_over_rows):
        # MKL adds in one run; GPU reductions are trees, blocks there only bound the launches
        self.rows = ROWS if self.torch_device.type == "cpu" else 1 << 22

    def is_native(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(device=self.torch_device, dtype=self.torch_dtype)
        return torch.as_tensor(np.asarray(x), dtype=self.torch_dtype, device=self.torch_device)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", torch.float64).numpy().copy()
        return np.array(x, dtype=np.float64)

    def zeros(self, shape: Any) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=self.torch_dtype, device=self.torch_device)

    def concat(self, arrays: Any, axis: int) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def inner(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return sum_over_rows(lambda x, y: (x.T @ y).double(), X, Y, rows=self.rows).to(self.torch_dtype)

    def combine(self, X: torch.Tensor, C: Any) -> torch.Tensor:
        return X @ self.asarray(C)

    def column_norms(self, X: torch.Tensor) -> np.ndarray:
        return self.to_numpy(sum_over_rows(lambda x: x.square().sum(dim=0).double(), X, rows=self.rows).sqrt())

    def qr(self, X: torch.Tensor) -> Any:
        return torch.linalg.qr(X, mode="reduced")

    def all_finite(self, X: torch.Tensor) -> bool:
        # the max-norm propagates NaN and infinity: one pass, no boolean copy of X
        return bool(torch.isfinite(torch.linalg.vector_norm(X, float("inf"))))

    def einsum(self, spec: str, *arrays: torch.Tensor) -> torch.Tensor:
        return torch.einsum(spec, *arrays)

    def write_block(self, buffer: torch.Tensor, start: int, X: torch.Tensor, axis: int = 1) -> torch.Tensor:
        buffer.narrow(axis, start, X.shape[axis]).copy_(X)  # in place: no copy of the basis per step
        return buffer

    def buffer(self, shape: Any) -> torch.Tensor:
        # uninitialized (the algorithms read only what they wrote: no page is touched before
        # its column is used); 2-D column-major, so a block of columns is contiguous
        if len(shape) == 2:
            return torch.empty(tuple(shape)[::-1], dtype=self.torch_dtype, device=self.torch_device).T
        return torch.empty(tuple(shape), dtype=self.torch_dtype, device=self.torch_device)

    def subtract_combine(self, W: torch.Tensor, X: torch.Tensor, C: Any) -> torch.Tensor:
        return torch.addmm(W, X, self.asarray(C), alpha=-1.0)  # one GEMM, no temporary

    def to_host(self, X: torch.Tensor) -> np.ndarray:
        return X.detach().to("cpu", self.torch_dtype).numpy()

    def host(self) -> TorchOps:
        return TorchOps(self.torch_dtype, "cpu")


def _is_cuda_tensor(X: Any) -> bool:
    """Whether ``X`` is a CUDA tensor: MPI can read it, and fill a new one (see below)."""
    return isinstance(X, torch.Tensor) and X.is_cuda


def _mpi_buffers(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CUDA tensor's send buffer and a new receive buffer, for a CUDA-aware MPI's Allreduce."""
    send = X.contiguous()
    recv = send.new_empty(send.shape)
    # MPI knows nothing of CUDA streams: the product must be complete before it reads.
    torch.cuda.current_stream(send.device).synchronize()
    return send, recv


register_device_buffers(_is_cuda_tensor, _mpi_buffers)  # MPIComm sums CUDA blocks on the device


def matrix_operator(x: torch.Tensor, symmetric: bool | None = None) -> MatrixOperator:
    """A dense torch matrix as an operator whose products stay on its device.

    Called by :func:`specops.aslinearoperator` for torch tensors.

    Args:
        x: a square 2-D tensor. float32 stays float32; any other dtype becomes float64.
        symmetric: ``None`` checks symmetry and raises if ``x`` is not symmetric;
            ``True`` trusts the caller; ``False`` wraps it as non-symmetric.

    Raises:
        ValueError: for a non-square, non-finite or (``symmetric=None``) non-symmetric matrix.
        TypeError: for a complex matrix.
    """
    if x.is_complex():
        raise TypeError(f"expected a real matrix, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"specops operators are square; got shape {tuple(x.shape)}")
    ops = TorchOps(torch.float32 if x.dtype == torch.float32 else torch.float64, x.device)
    M = x.detach().to(ops.torch_dtype)
    if not ops.all_finite(M):
        raise ValueError("the matrix has NaN or infinite entries")
    if symmetric is None:
        check_dense_symmetric(ops.to_numpy(M), "matrix")
    return MatrixOperator(M, ops, symmetric=symmetric is not False)


# --- cheaper double backward ------------------------------------------------------------
# Profiled on CPU (ResNet-20, eval-mode batch norm, one thread), a product through a cached
# graph cost 2.8 gradients instead of about two: PyTorch's double backward of a convolution
# (``_convolution_double_backward``) forms its weight term as a convolution of batch-transposed
# copies (twice a forward convolution, plus the copies), and that of batch norm
# (``batchnorm_double_backward``) is a composite of full-size passes even with fixed
# statistics (7x its backward). The two classes below and the mode after them give both
# plain formulas.
class _ConvBackward(torch.autograd.Function):
    """``(grad_input, grad_weight)`` of a convolution, differentiable once more.

    Differentiable once more with the kernels PyTorch uses for gradients
    (``convolution_backward``).
    """

    @staticmethod
    def forward(ctx, gy, x, w, conf, mask):
        ctx.save_for_backward(gy, x, w)
        ctx.conf = conf
        ctx.set_materialize_grads(False)
        gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, *conf, [*mask, False])
        return gx, gw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ggx, ggw):
        gy, x, w = ctx.saved_tensors
        conv, conf = torch.ops.aten.convolution, ctx.conf
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        d_gy = d_x = d_w = None
        if need_gy and ggx is not None:  # gx and gw are linear in gy: forward convolutions
            d_gy = conv(ggx, w, None, *conf)
        if need_gy and ggw is not None:
            d_gy = conv(x, ggw, None, *conf) if d_gy is None else d_gy + conv(x, ggw, None, *conf)
        if need_x and ggw is not None:  # gw is bilinear in (gy, x): an input gradient with weight ggw
            d_x = torch.ops.aten.convolution_backward(gy, x, ggw, None, *conf, [True, False, False])[0]
        if need_w and ggx is not None:  # gx is bilinear in (gy, w): a weight gradient with input ggx
            d_w = torch.ops.aten.convolution_backward(gy, ggx, w, None, *conf, [False, True, False])[1]
        return d_gy, d_x, d_w, None, None


class _Conv(torch.autograd.Function):
    """A convolution without bias whose backward is :class:`_ConvBackward`."""

    @staticmethod
    def forward(ctx, x, w, conf):
        ctx.save_for_backward(x, w)
        ctx.conf = conf
        return torch.ops.aten.convolution(x, w, None, *conf)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx, gw = _ConvBackward.apply(gy, x, w, ctx.conf, ctx.needs_input_grad[:2])
        return gx, gw, None


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv{1,2,3}d`` through :class:`_Conv`; None for what it leaves to PyTorch."""
    if isinstance(padding, str) or input.ndim != weight.ndim:  # "same"/"valid", or unbatched input
        return None
    nd = weight.ndim - 2

    def expand(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd

    out = _Conv.apply(input, weight, (expand(stride), expand(padding), expand(dilation), False, (0,) * nd,
                                      groups))
    return out if bias is None else out + bias.view(-1, *(1,) * nd)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    """``F.batch_norm`` with running statistics as the per-channel affine map it is; None otherwise."""
    if training or running_mean is None or running_var is None:
        return None
    shape = (1, -1) + (1,) * (input.ndim - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    centered = input - running_mean.view(shape)
    if bias is None:
        return centered * scale.view(shape)
    return torch.addcmul(bias.view(shape), centered, scale.view(shape))


_OVERRIDES = {F.conv1d: _conv, F.conv2d: _conv, F.conv3d: _conv, F.batch_norm: _batch_norm}


def _hardsigmoid(input, inplace=False):
    """``F.hardsigmoid`` as ``relu6(x + 3) / 6``, which is twice differentiable.

    PyTorch's kernel has no double backward ("derivative for aten::hardsigmoid_backward is not
    implemented") and no forward-mode derivative; ``relu6`` has both. The same values (the
    kernel computes ``min(max(x + 3, 0), 6) / 6``).
    """
    out = F.relu6(input + 3) / 6
    return input.copy_(out) if inplace else out


# Formulas swapped while every graph to be differentiated twice is built, on every device.
_SECOND_ORDER = {F.hardsigmoid: _hardsigmoid}


class _Reroute(TorchFunctionMode):
    """Calls to the functions in ``overrides`` go to their replacement.

    A replacement may return None to leave a call to PyTorch. The model is not touched: only
    the functions it calls are rerouted.

    With :data:`_OVERRIDES` (the cheaper double backward, CPU only): convolutions through
    :class:`_Conv`, and batch norm with running statistics (``model.eval()``) as an elementwise
    affine map. The values and derivatives are the same up to rounding (tested against dense
    Hessians); products through a cached ResNet-20 graph on CPU cost 2.2 instead of 2.6-2.8
    gradients.
    """

    def __init__(self, overrides: dict):
        super().__init__()
        self.overrides = overrides

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        override = self.overrides.get(func)
        out = None if override is None else override(*args, **kwargs)
        return func(*args, **kwargs) if out is None else out


@contextlib.contextmanager
def _twice_differentiable(cheap: bool = False) -> Iterator[None]:
    """Twice-differentiable formulas and the math attention kernel, while a product graph is built.

    ``scaled_dot_product_attention`` runs on its math kernel.

    The fused attention kernels (flash, memory-efficient, cuDNN; the CPU flash kernel PyTorch
    picks by default) have no double backward and no forward-mode derivative:
    ``nn.MultiheadAttention``, Hugging Face models with ``attn_implementation="sdpa"`` and
    timm's attention all call them. The math kernel is the same function written in
    differentiable operations. ``cheap`` adds the cheaper double backward of :data:`_OVERRIDES`.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), _Reroute({**_SECOND_ORDER, **(_OVERRIDES if cheap else {})}):
        yield


# --- the model --------------------------------------------------------------------------
class _LossModule(nn.Module):
    """``batch -> scalar loss``, with the user's model as the submodule ``model``.

    Wrapping lets ``torch.func.functional_call`` substitute the parameters for the whole
    call, including a general ``loss_fn(model, batch)`` that touches the model freely.
    ``loss_fn=None`` takes the loss the model returns itself (``outputs.loss``: a Hugging
    Face model given a batch with ``labels``).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, loss_form: str, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.loss_form = loss_form
        self.dtype = dtype

    def forward(self, batch):
        if self.loss_fn is None:
            loss = _own_loss(_call(self.model, batch))
        elif self.loss_form == "model":
            loss = self.loss_fn(self.model, batch)
        else:
            inputs, targets = _split(batch)
            outputs = _logits(_call(self.model, inputs))
            try:
                loss = self.loss_fn(outputs, targets)
            except TypeError as e:
                raise TypeError(
                    f"loss_fn(outputs, targets) failed: {e}. specops called it with the model's outputs "
                    f"({_describe(outputs)}) and the targets; if it is written as loss_fn(model, batch), name "
                    "its first parameter `model` or pass loss_form='model'"
                ) from e
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            if isinstance(loss, dict) or hasattr(loss, "logits"):
                raise TypeError(
                    f"the loss function returned the model's outputs ({_describe(loss)}), not a scalar: return "
                    "outputs.loss, or a loss of outputs.logits"
                )
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"the loss function must return a scalar tensor, got {shape}; reduce it with "
                "reduction='mean' (or 'sum', and pass reduction='sum' to hessian)"
            )
        if loss.is_floating_point() and torch.finfo(loss.dtype).bits < torch.finfo(self.dtype).bits:
            raise ValueError(
                f"the loss is computed in {loss.dtype} while the parameters are {self.dtype}: its Hessian "
                f"would be only {loss.dtype}-accurate. Hugging Face's built-in losses (outputs.loss) cast "
                "the logits to float32; for a float64 model pass a loss of the logits instead, e.g. "
                "loss_fn=lambda logits, labels: F.cross_entropy(logits[:, :-1].flatten(0, 1), "
                "labels[:, 1:].flatten()) for a causal LM (batches {'input_ids': ..., 'labels': ...})"
            )
        return loss


def _call(model, inputs):
    """The model applied to a batch's inputs, as its ``forward`` takes them.

    A dict is passed as keywords (``model(**inputs)``, Hugging Face) unless ``forward`` takes
    one positional argument and not every key as a keyword: then whole (``model(inputs)``,
    curvlinops' convention). A tuple or list is spread (``model(*inputs)``); anything else is
    passed as is. A :class:`FunctionalModel` always gets the inputs whole.
    """
    if isinstance(model, FunctionalModel):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(inputs) if _takes_dict_whole(model, inputs) else model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _takes_dict_whole(model: Any, inputs: dict) -> bool:
    forward = model.forward if isinstance(model, nn.Module) else model
    function = getattr(forward, "__func__", None)  # a bound method: its function is cached, not the method
    return _dict_whole(function or forward, function is not None, tuple(inputs))


@functools.lru_cache(maxsize=256)
def _dict_whole(forward: Callable[..., Any], unbound: bool, inputs: tuple[str, ...]) -> bool:
    import inspect

    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    if unbound:
        parameters = parameters[1:]  # self
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return False
    keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if all(k in keywords for k in inputs):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in parameters if p.default is p.empty and p.kind is not p.VAR_POSITIONAL]
    return len(positional) >= 1 and len(required) <= 1


class FunctionalModel(nn.Module):
    """A functional model ``f(params, inputs)`` with a dict of parameter tensors, as a module.

    :func:`hessian` wraps ``model=f`` given with ``params={name: tensor}`` in one, as JAX's
    loss functions take their parameters. The tensors are not changed (the module holds
    them as parameters sharing their storage; specops never writes to parameters). Every
    batch's inputs reach ``f`` whole: ``f(params, inputs)``.

    Args:
        f: ``f(params, inputs) -> outputs``, ``params`` a dict name -> tensor like ``params``.
        params: the parameters, name -> floating tensor (names without dots).

    Raises:
        TypeError: ``params`` is not a dict of tensors.
        ValueError: a name holds a dot.
    """

    def __init__(self, f: Callable[..., Any], params: Mapping[str, torch.Tensor]):
        super().__init__()
        if not isinstance(params, Mapping) or not all(isinstance(t, torch.Tensor) for t in params.values()):
            raise TypeError("a functional model f(params, inputs) needs params= as a dict name -> tensor, got "
                            f"{type(params).__name__}")
        dotted = [k for k in params if "." in k or not k]
        if dotted:
            raise ValueError(f"parameter names of a functional model cannot hold dots or be empty: {dotted[:4]}; "
                             "use a flat dict (e.g. 'layer1_weight')")
        self.f = f
        self._names = list(params)
        for name, t in params.items():
            self.register_parameter(name, nn.Parameter(t.detach(), requires_grad=t.is_floating_point()))

    def forward(self, inputs: Any) -> Any:
        """``f(params, inputs)`` with the module's (or the substituted) parameters."""
        return self.f({n: getattr(self, n) for n in self._names}, inputs)


def _eager(model: Any) -> Any:
    """The module a ``torch.compile`` d model wraps (``model._orig_mod``), else ``model``.

    Compiled graphs have no double backward (aot_autograd), and which engine worked used to
    depend on what ran before in the process; the eager module computes the same function,
    so every engine differentiates it, the same way in every process.
    """
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    optimized = getattr(compiled, "OptimizedModule", None)
    if optimized is not None and isinstance(model, optimized):
        return model._orig_mod
    return model


def _split(batch):
    """``(inputs, targets)`` of a batch for ``loss_fn(outputs, targets)``."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise TypeError(
                f"with loss_fn(outputs, targets), a dict batch needs 'labels' (the targets; the other entries "
                f"are the model's inputs), got keys {sorted(batch)}; or write loss_fn(model, batch)"
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            "with loss_fn(outputs, targets) every batch must be a pair (inputs, targets) or a dict with "
            f"'labels', got {type(batch).__name__}; for other batches (triples, ...) write the loss as "
            "loss_fn(model, batch) and pass loss_form='model'"
        )
    return batch


def _logits(outputs):
    """The tensor ``loss_fn(outputs, targets)`` gets: ``outputs.logits`` of a ``ModelOutput`` or dict."""
    if isinstance(outputs, torch.Tensor) or not (isinstance(outputs, dict) or hasattr(outputs, "logits")):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
    if logits is None:
        raise TypeError(
            f"the model returns {_describe(outputs)}; specops applies loss_fn(outputs, targets) to its "
            "'logits', which it has not: write the loss as loss_fn(model, batch)"
        )
    return logits


def _own_loss(outputs):
    """``outputs.loss`` for ``loss_fn=None``."""
    loss = (outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None))
    if loss is None:
        raise TypeError(
            f"loss_fn=None takes the loss the model returns, but it returned {_describe(outputs)} without one; "
            "Hugging Face models compute it only when the batch has 'labels' (add them), or pass "
            "loss_fn(outputs, targets), applied to outputs.logits"
        )
    return loss


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with fields {', '.join(map(str, obj.keys()))}"
    return f"a {type(obj).__name__}"


def _map_tensors(fn, obj):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(fn, v)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        mapped = [_map_tensors(fn, v) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    return obj


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        physical = 8 << 30
    return int(0.25 * physical)


def _resolve_params(model: nn.Module, params: Any) -> list[str]:
    """Names of the selected trainable parameters, in model order."""
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    if params is None:
        return trainable
    items = params if isinstance(params, (list, tuple)) else [params]
    by_id = {id(p): n for n, p in named}
    names, patterns = set(), []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, nn.Module):
            found = [by_id[id(p)] for p in item.parameters() if id(p) in by_id]
            if not found:
                raise ValueError(f"the module {type(item).__name__} given in wrt is not part of the model")
            names.update(found)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError("a tensor given in wrt is not a parameter of the model")
            names.add(by_id[id(item)])
        else:
            raise TypeError(
                f"wrt takes names, glob patterns, modules or parameters; got {type(item).__name__}"
            )
    if patterns:
        names.update(select_names([n for n, _ in named], patterns))
    frozen = sorted(n for n in names if n not in trainable)
    chosen = [n for n in trainable if n in names]
    if not chosen:
        raise ValueError(
            f"wrt selects only frozen parameters ({', '.join(frozen[:6])}); set requires_grad=True "
            "on those you want the Hessian of"
        )
    return chosen


def _check_uniform(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    floating = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not floating:
        raise ValueError("the model has no floating-point parameters")
    on_meta = [n for n, p in floating if p.is_meta]
    if on_meta:
        raise ValueError(
            f"the model's parameters are on the meta device ({_listing(on_meta)}): they have shapes but no "
            "values (a model built under init_empty_weights() or with device='meta'). Materialize it first, "
            "e.g. model.to_empty(device='cpu') and load_state_dict(...), or build it on a real device"
        )
    kinds = {(p.dtype, p.device) for _, p in floating}
    if len(kinds) > 1:
        seen: dict[tuple[Any, Any], str] = {}
        for n, p in floating:
            seen.setdefault((p.dtype, p.device), n)
        listing = "; ".join(f"{n}: {d}, {dev}" for (d, dev), n in seen.items())
        raise ValueError(
            f"the model's parameters have mixed dtypes or devices ({listing}); move the whole model "
            "to one device and dtype, e.g. model.to(device, torch.float64)"
        )
    return floating[0][1].dtype, floating[0][1].device



# --- random layers ----------------------------------------------------------------------
_RANDOM_NAME_PARTS = ("Dropout", "DropPath", "DropBlock", "StochasticDepth")


def _random_modules(model: nn.Module) -> list[str]:
    """``"name (Class, p=...)"`` for each module that draws random numbers in its current mode."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        cls = type(m).__name__
        if isinstance(m, nn.MultiheadAttention):
            p = m.dropout
        elif isinstance(m, nn.RReLU):
            found.append(f"{name or '<model>'} ({cls}, lower={m.lower}, upper={m.upper})")
            continue
        elif isinstance(m, nn.modules.dropout._DropoutNd) or any(part in cls for part in _RANDOM_NAME_PARTS):
            p = next((getattr(m, a) for a in ("p", "drop_prob", "drop_rate") if hasattr(m, a)), None)
        else:
            continue
        if isinstance(p, (int, float)) and p == 0:
            continue
        found.append(f"{name or '<model>'} ({cls}" + ("" if p is None else f", p={p:g}") + ")")
    return found


def _random_layers_fix() -> str:
    return (
        "Call model.eval() first (this also switches batch norm to its running statistics; to "
        "turn off only the random layers: `for m in model.modules(): if 'Dropout' in "
        "type(m).__name__: m.eval()`), or pass random_layers='fixed' to take the Hessian of one "
        "fixed random sub-network (each batch keeps one mask in every product)"
    )


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class TorchAdapter(ModelAdapter):
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
        progress: write a line per batch and product to stderr.
        random_layers: ``"error"`` (raise for random layers in training mode) or ``"fixed"``
            (one fixed random mask per batch), see the module docstring.

    Raises:
        specops.NonDeterministicError: random layers in training mode with
            ``random_layers="error"``.
    """

    ops: TorchOps

    # Build graphs on CPU with the cheaper double backward of _OVERRIDES (False: PyTorch's
    # formulas, for benchmarks).
    # Not on CUDA: on an H100 it saved 20% at batch 128 but cost 30% more at batch 32, where the
    # products are bound by kernel launches and the Python-level backward adds to them.
    _cheap_double_backward = True

    def __init__(self, model: nn.Module, loss_fn: Any, *, wrt: Any = None,
                 loss_form: str = "auto", engine: str = "auto", memory_budget: int | None = None,
                 chunk_size: int | None = None, batch_size: Callable[[Any], int] | None = None,
                 progress: bool = False, random_layers: str = "error", richardson: bool = False,
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
        self.progress = progress

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
        t = _first_tensor(batch)
        if t is None or t.ndim == 0:
            raise ValueError(
                "cannot tell the number of samples in a batch (no tensor with a batch dimension); "
                "pass batch_size=lambda batch: ... to hessian"
            )
        return int(t.shape[0])

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
        # tensor (a 23 M-parameter GPT-2: 12.9 s against 0.87 s); split's backward is one concatenation.
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
        device = self.ops.torch_device
        seed = hash(self._fingerprint(batch)) % (1 << 62)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            return torch.func.functional_call(self._module, self._state(theta), (batch,))

    def check_random_forward(self, batch: Any) -> None:
        """Raise if one forward pass of ``batch`` draws random numbers (``random_layers="error"``).

        Catches what inspecting the modules cannot: ``torch.rand``, ``F.dropout`` and other
        random functions called in a ``forward``. The caller's generator state is kept.
        """
        if self.random_layers != "error":
            return
        device = self.ops.torch_device
        batch = self._prepare(batch)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            before = _rng_states(device)
            with torch.no_grad():
                self._loss(self._theta, batch)
            after = _rng_states(device)
        if any(not torch.equal(a, b) for a, b in zip(before, after)):
            raise NonDeterministicError(
                "a forward pass of the first batch draws random numbers (torch's random generator "
                "advanced): a random layer or function in training mode (F.dropout, torch.rand, "
                "torch.randn_like, ...) makes every product use new random numbers, so the loss has no "
                "fixed Hessian. " + _random_layers_fix()
            )

    def loss(self, batch: Any, delta: torch.Tensor | None = None) -> float:
        theta = self._theta if delta is None else self._theta + delta
        with torch.no_grad():
            return float(self._loss(theta, self._prepare(batch)))

    def gradient(self, batch: Any) -> torch.Tensor:
        theta = self._theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss(theta, self._prepare(batch)), theta, allow_unused=True)
        return torch.zeros_like(theta) if g is None else g

    def _graph(self, batch):
        """A leaf copy of theta split into its parameters, and the gradient with its graph.

        The gradient is taken with ``create_graph=True``. Products differentiate the gradient with respect to the pieces, not the flat leaf: the
        backward of the split would concatenate each column into a new vector, which
        :meth:`_double_backward` instead writes into the block it returns.
        """
        theta = self._theta.detach().requires_grad_(True)
        pieces = theta.split(self.layout.sizes)
        with _twice_differentiable(self._cheap_double_backward and self.ops.torch_device.type == "cpu"):
            loss = self._loss(pieces, batch)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
        return pieces, g

    @staticmethod
    def _double_backward(pieces: tuple[torch.Tensor, ...], g: torch.Tensor | None, V: torch.Tensor,
                         keep: bool) -> torch.Tensor:
        k = V.shape[1]
        if g is None or not g.requires_grad:  # the loss is at most linear in theta
            return torch.zeros_like(V)
        # Contiguous columns: a column of V (stride k) fed to the backward reaches every layer as
        # strided gradients (a 29 M-parameter GPT-2: 14 s a column of a 4-column block, 0.5 s
        # for a vector); the rows of V.T are contiguous, without a copy when V is column-major (a
        # block of the Lanczos basis). The result is column-major too, each column written once
        # into it: PyTorch's CPU allocator maps every large new tensor afresh, and the page faults
        # of a new vector per column plus a stacking copy made a 4-column block of ResNet-50
        # (4 x 32^2) cost 1.6x a single product per column.
        rows = V.T if V.T.is_contiguous() else [c.contiguous() for c in V.unbind(1)]  # 3x V.T.contiguous()
        out = torch.empty((k, V.shape[0]), dtype=V.dtype, device=V.device)
        for j in range(k):
            hs = torch.autograd.grad(g, pieces, grad_outputs=rows[j], retain_graph=keep or j < k - 1,
                                     allow_unused=True)
            torch.cat([torch.zeros_like(p) if h is None else h for h, p in zip(hs, pieces)], out=out[j])
        return out.T

    @staticmethod
    def _fingerprint(batch: Any) -> tuple[tuple[tuple[int, ...], float], ...]:
        """A cheap summary of a batch's tensors, to notice data that changes between passes."""
        leaves: list[torch.Tensor] = []
        _map_tensors(leaves.append, batch)
        return tuple((tuple(t.shape), float(t.detach().double().sum())) for t in leaves)

    def _cached_graph(self, index: int, batch: Any) -> tuple[Any, Any, Any, int]:
        entry = self._cache.get(index)
        fingerprint = self._fingerprint(batch)
        if entry is None:
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                pieces, g = self._graph(self._prepare(batch))
            entry = self._cache[index] = (pieces, g, fingerprint, sum(seen.values()))
            self._cache_bytes += entry[3]
        elif entry[2] != fingerprint:
            raise NonDeterministicError(
                f"batch {index} differs from the batch whose graph was cached in an earlier pass: the data "
                "changes between passes (a DataLoader with shuffle=True, random augmentation or sampling). "
                "Pass data that yields the same batches every time"
            )
        return entry

    def hvp(self, index: int, batch: Any, V: torch.Tensor) -> torch.Tensor:
        if self._padding_rows is None:
            return self._hvp(index, batch, V)
        return self._hvp(index, batch, V * self._padding_rows) * self._padding_rows

    def _hvp(self, index: int, batch: Any, V: torch.Tensor) -> torch.Tensor:
        if self.progress:
            sys.stderr.write(f"\rspecops: product {self._products + 1}, batch {index + 1}   ")
            sys.stderr.flush()
        if index == 0:
            self._products += 1
        if self._requested == "auto" and V.shape[1] > 1 and self._vectorize_columns:
            # on a GPU, one vectorized forward-over-reverse pass beats k double backwards
            # (ResNet-20 on an H100: 1.7x a gradient per column against 3.6x)
            return self._forward_over_reverse(self._prepare(batch), V)
        if self.engine == "cached_graph":
            pieces, g, _, _ = self._cached_graph(index, batch)
            if self._requested == "auto" and self._cache_bytes > self.memory_budget:
                self._cache.clear()
                self._cache_bytes = 0
                self.engine = "double_backward"
            else:
                return self._double_backward(pieces, g, V, keep=True)
        batch = self._prepare(batch)
        if self.engine == "double_backward":
            pieces, g = self._graph(batch)
            return self._double_backward(pieces, g, V, keep=False)
        if self.engine == "finite_difference":
            return self._finite_difference(batch, V, self.richardson)[0]
        return self._forward_over_reverse(batch, V)

    def _reverse_over_reverse(self, batch, V):
        pieces, g = self._graph(batch)
        return self._double_backward(pieces, g, V, keep=False)

    def _finite_difference(self, batch, V, richardson=False, step_factor=1.0):
        """Central differences of gradients along each column (:func:`specops.checks.finite_difference_products`).

        ``step_factor`` scales the step (for benchmarks of the rule).

        Returns:
            ``(HV, spreads)``: the products (n, k) and, with Richardson, per-column
            ``||D(h) - D(2h)||`` (``None`` without).
        """
        theta = self._theta
        scale = max(1.0, float(torch.linalg.vector_norm(theta)) / max(theta.numel(), 1) ** 0.5) * step_factor
        return finite_difference_products(lambda d: self._gradient_at(theta + d, batch), V, self.ops,
                                          eps=float(torch.finfo(self.compute_dtype).eps), scale=scale,
                                          richardson=richardson)

    def _gradient_at(self, theta, batch):
        theta = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss(theta, batch), theta, allow_unused=True)
        return torch.zeros_like(theta) if g is None else g

    def _forward_over_reverse(self, batch, V):
        # jvp of grad, not of jacrev (which torch.func.hessian uses): under jacrev's inner vmap
        # the forward derivative of layer norm's backward is wrong (torch 2.13: 11% off
        # finite differences for the layer norm weights, 2% on a transformer block), while the
        # same jvp of grad vmapped over the columns is exact. The batch's floating tensors are
        # primals with materialized zero tangents: left without one, some backward formulas
        # (mse_loss) write into the target's immutable ZeroTensor tangent under forward AD.
        leaves = []
        _map_tensors(lambda t: leaves.append(t) if t.is_floating_point() else None, batch)

        def grad(theta, data):
            it = iter(data)
            rebuilt = _map_tensors(lambda t: next(it) if t.is_floating_point() else t, batch)
            return torch.func.grad(lambda t: self._loss(t, rebuilt))(theta)

        zeros = [torch.zeros_like(t) for t in leaves]

        def hv(v):
            return torch.func.jvp(grad, (self._theta, leaves), (v, zeros))[1]

        with _twice_differentiable():
            if V.shape[1] == 1:
                return hv(V[:, 0])[:, None]
            return torch.func.vmap(hv, in_dims=1, out_dims=1, chunk_size=self.chunk_size,
                                   randomness="same")(V)

    # --- cross-check of the engines -----------------------------------------------
    def cross_check(self, batch: Any) -> None:
        """Check the engine(s) in use against an independent one on one product with ``batch``.

        Reverse-over-reverse (the formulas of ``cached_graph`` and ``double_backward``) and
        forward-over-reverse share no second-derivative code, so a framework defect in either
        shows as a mismatch. On a mismatch beyond rounding, central differences of gradients
        with Richardson extrapolation decide which one is wrong. With ``engine="auto"`` the
        operator then falls back to the other engine with a warning naming the parameters and
        layer types where the two differ most; an explicitly requested engine found wrong, or
        no engine that works, raises. Costs a forward and two rebuilt products of one batch, once.

        Raises:
            ValueError: the requested engine disagrees with finite differences.
            RuntimeError: neither engine can differentiate the model twice (the message offers
                ``engine="finite_difference"``).
        """
        batch = self._prepare(batch)
        self._check_precision(batch)
        if self.engine == "finite_difference":
            return
        v = self.ops.random(self.num_params, [0], 0, kind="normal", stream="cross_check")
        if self._padding_rows is not None:
            v = v * self._padding_rows
        products, failures = {}, {}
        for name, fn in (("reverse_over_reverse", self._reverse_over_reverse),
                         ("forward_over_reverse", self._forward_over_reverse)):
            try:
                product = fn(batch, v)
                products[name] = product if self._padding_rows is None else product * self._padding_rows
            except (RuntimeError, NotImplementedError) as e:
                failures[name] = e
        in_use = {"forward_over_reverse" if self.engine == "forward_over_reverse" else "reverse_over_reverse"}
        if self._vectorize_columns:
            in_use.add("forward_over_reverse")
        auto = self._requested == "auto"
        if not products:
            raise RuntimeError(_no_engine_message(failures))
        for name, error in failures.items():
            if name not in in_use:
                continue
            if not auto:
                raise RuntimeError(f"{error}\n{_no_engine_message(failures)}") from error
            self._use(next(iter(products)))  # auto: the engine that works
        tol = _ROUNDING[self.compute_dtype]
        if len(products) == 2:
            a, b = products["reverse_over_reverse"], products["forward_over_reverse"]
            self.cross_check_error = _rel(b, a)
            if self.cross_check_error <= tol:
                self.engines_agree = self.cross_check_error
                return
            # the referee: plain central differences at the small step (fewer kinks of ReLU-like
            # layers crossed than Richardson's larger step; 1e-10 in float64 on smooth models)
            reference, _ = self._finite_difference(batch, v)
            if self._padding_rows is not None:
                reference = reference * self._padding_rows
            wrong = max(products, key=lambda k: _rel(products[k], reference))
            right = next(k for k in products if k != wrong)
            d_right, d_wrong = _rel(products[right], reference), _rel(products[wrong], reference)
            where = self._where_different(a, b)
            message = (f"the Hessian-vector products of reverse-over-reverse and forward-over-reverse "
                       f"differ by {self.cross_check_error:.2g} (relative; rounding is below {tol:.0e}) "
                       f"and differ most in {where}")
            if d_right > 0.1 * d_wrong:  # finite differences cannot tell (kinks, float32 rounding)
                self._use("reverse_over_reverse")
                warnings.warn(f"{message}. Finite differences of gradients cannot tell which is right "
                              f"({d_right:.1g} and {d_wrong:.1g} from each); using {self.engine}. The same "
                              "products of a float64 copy of the model would (docs/backends/torch.md)",
                              RuntimeWarning, stacklevel=3)
                return
            message += (f". Finite differences of gradients side with {right} ({d_right:.1g} against "
                        f"{d_wrong:.1g}): PyTorch's {wrong} derivatives of some layer are wrong")
            if wrong not in in_use:
                return
            if not auto:
                other = "forward_over_reverse" if wrong == "reverse_over_reverse" else "double_backward"
                raise ValueError(f"{message}. Use engine={other!r} (or 'auto'), or cross_check=False to keep "
                                 f"engine={self.engine!r}")
            self._use(right)
            warnings.warn(f"{message}; using {self.engine} instead", RuntimeWarning, stacklevel=3)
        # one engine works (or the two agree): the core's check (specops.checks.check_engine) follows

    # --- primitives of the core's engine check --------------------------------------
    def check_product(self, batch: Any, V: torch.Tensor) -> torch.Tensor:
        batch = self._prepare(batch)
        if self._padding_rows is not None:
            V = V * self._padding_rows
        if self.engine == "finite_difference":
            out = self._finite_difference(batch, V, self.richardson)[0]
        elif self.engine == "forward_over_reverse":
            out = self._forward_over_reverse(batch, V)
        else:
            out = self._reverse_over_reverse(batch, V)
        return out if self._padding_rows is None else out * self._padding_rows

    def replays_exactly(self) -> bool:
        return (self.engine == "cached_graph" and self.ops.torch_device.type == "cpu"
                and not self._vectorize_columns and bool(self._cache))

    def check_same_batch(self, index: int, batch: Any) -> None:
        if index in self._cache:
            self._cached_graph(index, batch)  # raises if the batch changed
        else:
            raise NonDeterministicError(f"batch {index} appeared only in a second pass over the data; pass "
                                        "data that yields the same batches every time")

    def check_batch(self, batch: Any) -> Any:
        if self._batch_size_fn is not None:
            return batch
        n = self.batch_size(batch)
        m = min(n, _CHECK_SAMPLES)
        return batch if m == n else _map_tensors(lambda t: t[:m] if t.ndim >= 1 and t.shape[0] == n else t, batch)

    def gradient_at(self, batch: Any, delta: torch.Tensor) -> torch.Tensor:
        if self._padding_rows is not None:
            delta = delta * self._padding_rows[:, 0]
        g = self._gradient_at(self._theta + delta, self._prepare(batch))
        return g if self._padding_rows is None else g * self._padding_rows[:, 0]

    def use_finite_differences(self) -> None:
        self.engine = "finite_difference"
        self._vectorize_columns = False
        self._cache.clear()
        self._cache_bytes = 0

    def verdict_key(self, batch: Any) -> tuple[Any, Any] | None:
        shapes: list[tuple[Any, ...]] = []
        _map_tensors(lambda t: shapes.append((*t.shape, str(t.dtype))), batch)
        modes = tuple(m.training for m in self.model.modules())
        frozen = tuple(n for n, p in self.model.named_parameters() if not p.requires_grad)
        key = (identity(self.loss_fn), self.loss_form, tuple(self.layout.names), str(self.param_dtype), str(self.ops.device),
               self._requested, self.random_layers, self.richardson, str(self.autocast), modes, frozen,
               tuple(shapes))
        return self.model, key

    def _check_precision(self, batch: Any) -> None:
        """Warn if a forward pass computes in a lower precision than the parameters.

        Sets :attr:`compute_dtype`, the lowest precision seen, which bounds the products'
        accuracy (and the cross-check's tolerance). Hugging Face's Llama, for one, computes
        RMS norm and attention softmax in float32 in a float64 model.
        """
        if self.autocast is not None:  # lower precision by request
            return
        watch = _WatchPrecision(torch.finfo(self.param_dtype).bits)
        def leave(module, args, output):
            watch.stack.pop()  # (a forward hook that returns something replaces the output)

        # hooks on the model's own modules, not global ones (which make torch.compile warn)
        handles = [h for m in self.model.modules() for h in (
            m.register_forward_pre_hook(lambda m, a: watch.stack.append(m)), m.register_forward_hook(leave))]
        try:
            with torch.no_grad(), watch:
                self._loss(self._theta, batch)
        finally:
            for h in handles:
                h.remove()
        if watch.found:
            self.compute_dtype = min(watch.found.values(), key=lambda d: torch.finfo(d).bits)
            where = _listing(sorted({f"{k} ({d})".replace("torch.", "") for k, d in watch.found.items()}))
            warnings.warn(
                f"the model's parameters are {self.param_dtype} but a forward pass computes parts in "
                f"lower precision: {where}. Products, and every spectrum from them, are accurate to "
                f"{self.compute_dtype} rounding only", RuntimeWarning, stacklevel=4)

    def _use(self, name):
        """Switch an ``auto`` operator to the products of ``name``."""
        if name == "forward_over_reverse":
            self.engine = "forward_over_reverse"
        else:
            self._vectorize_columns = False
            if self.engine == "forward_over_reverse":
                self.engine = "cached_graph"

    def _where_different(self, a: torch.Tensor, b: torch.Tensor, limit: int = 3) -> str:
        """The parameters (and their layers' types) where two product vectors differ most."""
        diff = self.unflatten(a - b)
        total = max(float(torch.linalg.vector_norm(a)), float(np.finfo(np.float64).tiny))
        ranked = sorted(diff, key=lambda n: -float(torch.linalg.vector_norm(diff[n])))[:limit]
        parts = []
        for n in ranked:
            owner = n.rsplit(".", 1)[0] if "." in n else ""
            kind = type(self.model.get_submodule(owner)).__name__
            parts.append(f"{n} ({kind}: {float(torch.linalg.vector_norm(diff[n])) / total:.2g})")
        types = sorted({type(m).__name__ for m in self.model.modules()
                        if isinstance(m, _NORM_OR_ATTENTION) or "Norm" in type(m).__name__
                        or "Attention" in type(m).__name__})
        present = f"; normalization and attention layers present: {', '.join(types)}" if types else ""
        return ", ".join(parts) + present

    # --- diagnostics --------------------------------------------------------------
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


# the engines are checked on this many samples of the first batch: a wrong formula is wrong on any
# samples, and the checks then cost a fraction of a product (ResNet-20 on 64 images: docs/backends/torch.md)
_CHECK_SAMPLES = 8
# engines agree within this (relative), by the lowest precision a forward pass computes in
_ROUNDING = {torch.bfloat16: 1e-1, torch.float16: 2e-2, torch.float32: 2e-3, torch.float64: 1e-7}
_NORM_OR_ATTENTION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                      nn.MultiheadAttention)


class _WatchPrecision(TorchFunctionMode):
    """Records the modules (by type) in which operations return floats of fewer than ``bits`` bits."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.stack: list[nn.Module] = []
        self.found: dict[str, torch.dtype] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (isinstance(out, torch.Tensor) and out.is_floating_point()
                and torch.finfo(out.dtype).bits < self.bits):
            where = type(self.stack[-1]).__name__ if self.stack else "the loss function"
            self.found.setdefault(where, out.dtype)
        return out


def _padding_rows(model: nn.Module, blocks: dict[str, slice], ops: TorchOps) -> torch.Tensor | None:
    """A column (n, 1) of ones with zeros at the padding rows of ``nn.Embedding(padding_idx=...)``.

    PyTorch's gradient of an embedding leaves the ``padding_idx`` row out (it is never
    trained), although the loss depends on it. Its double backward then gives a Hessian that
    is not symmetric (the row's column is zero, its row is not), forward-over-reverse the
    transpose. The consistent operator treats the row as frozen, as the gradient does: zero
    row and column. None when the selection holds no such row.
    """
    mask = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or module.padding_idx is None:
            continue
        key = f"{name}.weight" if name else "weight"
        if key not in blocks:
            continue
        if mask is None:
            mask = ops.zeros((sum(b.stop - b.start for b in blocks.values()), 1)) + 1
        width = module.embedding_dim
        start = blocks[key].start + module.padding_idx % module.num_embeddings * width
        mask[start:start + width] = 0
    return mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(torch.linalg.vector_norm(b)), float(np.finfo(np.float64).tiny))
    return float(torch.linalg.vector_norm(a - b)) / scale


def _no_engine_message(failures: Mapping[str, BaseException]) -> str:
    lines = [f"  {name}: {str(e).splitlines()[0]}" for name, e in failures.items()]
    hint = ""
    if any("scaled_dot_product" in str(e) or "attention" in str(e) for e in failures.values()):
        hint = ("; fused attention kernels have no double backward: specops switches "
                "scaled_dot_product_attention to its math kernel, so a model calling a fused kernel "
                "directly needs attn_implementation='eager' (Hugging Face) or a plain attention")
    return ("PyTorch cannot differentiate this model twice with the engine(s):\n" + "\n".join(lines)
            + f"\nPass engine='finite_difference' (central differences of gradients, no second derivatives "
            f"needed; richardson=True for more accuracy){hint}")


_HALF = (torch.bfloat16, torch.float16)


def _listing(names: Any, limit: int = 4) -> str:
    names = [n or "<model>" for n in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- public entry point -------------------------------------------------------------
def hessian(model: nn.Module | Callable[..., Any], loss_fn: Any, data: Any, *, wrt: Any = None,
            reduction: str | None = None,
            engine: str | None = None, comm: Any = None, check_deterministic: bool = True,
            progress: bool = False, loss_form: str = "auto",
            memory_budget: int | None = None, chunk_size: int | None = None,
            batch_size: Callable[[Any], int] | None = None, random_layers: str = "error",
            cross_check: bool = True, richardson: bool = False, autocast: torch.dtype | None = None,
            params: Any = None,
            hvp: str | None = None) -> ModelOperator:
    """The Hessian of a model's loss over data, as a specops operator on flat tensors.

    Args:
        model: an ``nn.Module`` with all parameters on one device and of one dtype
            (float32, float64, or bfloat16/float16: products in that dtype, float32 vectors).
            Its mode is used as is: call ``model.eval()`` yourself for batch norm with running
            statistics and without dropout. A ``torch.compile`` d module is differentiated
            through the module it wraps (compiled graphs have no double backward); a function
            ``f(params, inputs)`` with ``params={name: tensor}`` is a functional model. A model
            sharded with FSDP2's ``fully_shard`` gives vectors sharded like its parameters
            (``specops.backends.torch_sharded``).
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
        progress: report batches and products on stderr.
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
        params: with a functional ``model`` ``f(params, inputs)``: its parameters, a dict
            name -> tensor (see :class:`FunctionalModel`). With an ``nn.Module``: the former
            name of ``wrt`` (deprecated).
        hvp: former name of ``engine`` (deprecated).

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
        model, params = FunctionalModel(model, params), None
    wrt = renamed("hessian", "wrt", wrt, "params", params)
    engine = renamed("hessian", "engine", engine, "hvp", hvp, default="auto")
    from specops.backends import torch_sharded  # FSDP2 / DTensor parameters: sharded vectors

    if torch_sharded.is_sharded(model):
        return torch_sharded.hessian(model, loss_fn, data, reduction=reduction, comm=comm, loss_form=loss_form,
                                     check_deterministic=check_deterministic, wrt=wrt, engine=engine,
                                     memory_budget=memory_budget, chunk_size=chunk_size, batch_size=batch_size,
                                     random_layers=random_layers, richardson=richardson, autocast=autocast)
    # renamed(..., default="auto") never returns None here, but is typed Optional
    adapter = TorchAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form, engine=engine,  # type: ignore[arg-type]
                           memory_budget=memory_budget, chunk_size=chunk_size, batch_size=batch_size,
                           progress=progress, random_layers=random_layers, richardson=richardson,
                           autocast=autocast)
    reduction = _reduction(loss_fn, reduction)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic,
                         cross_check=cross_check,
                         first_batch_check=lambda first: _check_reduction(adapter, loss_fn, reduction, first))
    return ModelOperator(adapter, data, reduction=reduction, comm=comm,
                         check_deterministic=check_deterministic, cross_check=cross_check)


# --- curvature: Gauss-Newton and Fisher (see specops.curvature, specops.output_space) ---
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
        device = base.ops.torch_device
        seed = hash(base._fingerprint(batch)) % (1 << 62)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
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
            noise = self._noise[index] = self.base.ops.asarray(host).to(out.dtype)
        return noise

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


def _check_form(base: Any, kind: str) -> None:
    """Raise for a loss that is not a function of the outputs alone (no Gauss-Newton split)."""
    from specops.curvature import model_form_error

    if base.loss_form != "outputs":
        what = "ggn(...)" if kind == "ggn" else f"fisher(kind={kind!r})"
        raise model_form_error(what, "loss_fn(outputs, targets), e.g. nn.CrossEntropyLoss()")


def _curvature_adapter(base: TorchAdapter, kind: str, reduction: str, num_samples: int = 1,
                       seed: int = 0, datum: str = "sample", first_batch: Any = None) -> ModelAdapter:
    """``base`` (a Hessian adapter) with its product replaced by that of ``kind``; the input checks.

    With ``first_batch``, the closed-form output Hessian is checked against autodiff on it.
    """
    from specops.curvature import check_num_samples, validated_adapter
    from specops.output_space import check_datum
    from specops.random import check_seed

    _check_form(base, kind)
    num_samples, seed, datum = check_num_samples(num_samples), check_seed(seed), check_datum(datum)
    return validated_adapter(
        base, kind, lambda b, spec: _TorchCurvature(cast(TorchAdapter, b), kind, reduction, num_samples, seed,
                                                    datum, spec),
        _loss_spec(base.loss_fn), first_batch,
        "J^T M J v, one column by forward-mode JVP and backward, blocks by vmap of torch.func jvp/vjp",
        num_samples=num_samples, datum=datum)


def _reduction(loss_fn: Any, reduction: str | None) -> str:
    """The loss's reduction: the one it states, or ``reduction`` (default ``"mean"``) for a plain function."""
    from specops.reduction import loss_name, resolve

    return resolve(reduction, _loss_reduction(loss_fn) if loss_fn is not None else None, loss_name(loss_fn))


def _check_reduction(adapter: Any, loss_fn: Any, reduction: str, first_batch: Any) -> None:
    """For a plain function, check on ``first_batch`` that it reduces as ``reduction`` says."""
    from specops.reduction import check_plain

    check_plain(adapter, loss_fn, _loss_reduction(loss_fn), reduction, first_batch, float(torch.finfo(adapter.param_dtype).eps))


def _first_batch(data: Any) -> Any:
    for batch in ModelOperator._batches_of(data):
        return batch
    return None


def _curvature_operator(kind: str, model: nn.Module, loss_fn: Any, data: Any, *,
                        wrt: Any, reduction: str | None, comm: Any, check_deterministic: bool, progress: bool,
                        loss_form: str, chunk_size: int | None, batch_size: Callable[[Any], int] | None,
                        random_layers: str, num_samples: int = 1, seed: int = 0,
                        datum: str = "sample") -> ModelOperator:
    base = TorchAdapter(model, loss_fn, wrt=wrt, loss_form=loss_form,
                        engine="double_backward", chunk_size=chunk_size, batch_size=batch_size,
                        progress=progress, random_layers=random_layers)
    _check_form(base, kind)
    reduction = _reduction(loss_fn, reduction)
    first = _first_batch(data)
    if first is not None:
        base.check_random_forward(first)
    _check_reduction(base, loss_fn, reduction, first)
    adapter = _curvature_adapter(base, kind, reduction, num_samples, seed, datum, first)
    return ModelOperator(adapter, data, reduction=reduction, comm=comm, check_deterministic=check_deterministic)


def curvature_like(H: ModelOperator, kind: str = "ggn", *, num_samples: int = 1, seed: int = 0,
                   check_deterministic: bool = False, datum: str = "sample") -> ModelOperator:
    """The GGN or a Fisher of the same model, loss, data, parameters and reduction as ``H``.

    Args:
        H: an operator from :func:`hessian`, :func:`ggn` or :func:`fisher`.
        kind: ``"ggn"``, ``"empirical"`` or ``"mc"``.
        num_samples: sampled labels per sample of ``kind="mc"``, as for :func:`fisher`.
        seed: the seed of the sampled labels of ``kind="mc"``, as for :func:`fisher`.
        datum: of ``kind="empirical"``, as for :func:`fisher`.
        check_deterministic: run the construction checks again (``H`` passed them).

    Returns:
        A :class:`specops.ModelOperator` sharing ``H``'s data and communicator.

    Raises:
        TypeError: ``H`` is not a PyTorch model operator. As :func:`fisher` otherwise.
    """
    from specops.curvature import KINDS, base_adapter, check_kind

    base = base_adapter(H, TorchAdapter)
    adapter = _curvature_adapter(base, check_kind(kind, KINDS), H.reduction, num_samples, seed, datum,
                                 _first_batch(H._data))
    return ModelOperator(adapter, H._data, reduction=H.reduction, comm=H.comm,
                         check_deterministic=check_deterministic)


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
        model: the ``nn.Module``, as for :func:`hessian`; it must return one tensor.
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
        A :class:`specops.ModelOperator` (``G.adapter.kind == "ggn"``) that every
        algorithm takes like a Hessian.

    Raises:
        ValueError: a loss that is not a function of the outputs alone (``loss_form="model"``),
            and every error that :func:`hessian` raises for the same arguments.
    """
    return _curvature_operator("ggn", model, loss_fn, data, wrt=wrt,
                               reduction=reduction,
                               comm=comm, check_deterministic=check_deterministic, progress=progress,
                               loss_form=loss_form, chunk_size=chunk_size, batch_size=batch_size,
                               random_layers=random_layers)


def fisher(model: nn.Module, loss_fn: Any, data: Any, *, kind: str = "empirical", num_samples: int = 1,
           seed: int = 0, wrt: Any = None, reduction: str | None = None, comm: Any = None,
           check_deterministic: bool = True,
           progress: bool = False, loss_form: str = "auto", chunk_size: int | None = None,
           batch_size: Callable[[Any], int] | None = None, random_layers: str = "error",
           datum: str = "sample") -> ModelOperator:
    """The Fisher matrix of a model's loss over data: empirical or Monte-Carlo sampled.

    ``kind="empirical"``: ``c sum_i g_i g_i^T`` over the per-sample gradients ``g_i`` at the
    true targets (``c = 1/N`` with ``reduction="mean"``, 1 with ``"sum"``), as the products
    ``J^T (r_i r_i^T / c) J`` with the per-sample output gradients ``r_i``, so they cost
    about a GGN product. ``kind="mc"``: targets sampled ``num_samples`` times per sample
    from the model's predictive distribution (categorical for cross-entropy, Gaussian for
    squared error), drawn once per batch from ``seed``; equal to the GGN in expectation.

    Args:
        kind: ``"empirical"`` or ``"mc"``.
        num_samples: sampled labels per sample for ``kind="mc"``.
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
        datum: of ``kind="empirical"``: ``"sample"`` (default; each sample one datum, its
            loss the loss of that sample alone) or ``"term"`` (each loss term one datum:
            each position of a cross-entropy's class axis 1, each row of the last axis of
            a squared error or binary cross-entropy; curvlinops' ``EFLinearOperator``).
            See ``docs/curvature.md``.

    Returns:
        A :class:`specops.ModelOperator` (``F.adapter.kind`` is ``kind``).

    Raises:
        ValueError: ``kind="mc"`` with a loss whose likelihood is not known (the message
            names the losses that are); a loss that is not a function of the outputs alone;
            a bad ``kind``, ``num_samples`` or ``seed``.
    """
    from specops.curvature import check_kind

    return _curvature_operator(check_kind(kind), model, loss_fn, data,
                               wrt=wrt,
                               reduction=reduction, comm=comm, check_deterministic=check_deterministic,
                               progress=progress, loss_form=loss_form, chunk_size=chunk_size,
                               batch_size=batch_size, random_layers=random_layers, num_samples=num_samples,
                               seed=seed, datum=datum)


from specops.backends.torch_optim import preconditioner, stability_threshold  # noqa: E402,F401 (optimizer state, issue 25)
