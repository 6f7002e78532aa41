"""Twice-differentiable formulas: cheaper double backward on CPU, second derivatives PyTorch lacks.

Graphs for products are built under :func:`_twice_differentiable`, which reroutes the functions of
:data:`_SECOND_ORDER` (and, on CPU, :data:`_OVERRIDES`) to the formulas here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


# --- cheaper double backward ------------------------------------------------------------
# Profiled on CPU (docs/backends/torch.md, "CPU: where a product's time went"), a product
# through a cached graph cost well over the two gradients it should: PyTorch's double backward
# of a convolution (``_convolution_double_backward``) forms its weight term as a convolution of
# batch-transposed copies (twice a forward convolution, plus the copies), and that of batch
# norm (``batchnorm_double_backward``) is a composite of full-size passes even with fixed
# statistics (several times its backward). The two classes below and the mode after them give both
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
