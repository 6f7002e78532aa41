"""The engines checked: the cross-check, the core's engine-check primitives, the precision watch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from specops.checks import identity
from specops.model import NonDeterministicError

from .calls import _map_tensors
from .engines import _Engines
from .params import _listing


class _EngineChecks(_Engines):
    """The checks of the engines of :class:`~specops.backends.torch.TorchAdapter` (its base class)."""

    model: nn.Module
    loss_fn: Any
    loss_form: str
    random_layers: str
    param_dtype: torch.dtype
    autocast: torch.dtype | None
    _batch_size_fn: Any
    cross_check_error: float | None
    #: the cross-check's reverse-over-reverse products ``(batch, V, HV)``, taken by :meth:`check_product`
    _checked_products: tuple[Any, torch.Tensor, torch.Tensor] | None = None

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
        original, batch = batch, self._prepare(batch)
        self._check_precision(batch)
        if self.engine == "finite_difference":
            return
        # Reverse-over-reverse on the core check's two probes (one graph build): its symmetry test
        # reuses them (check_product) instead of building the batch's graph again.
        V = self.ops.random(self.num_params, [0, 1], 0, distribution="normal", stream="engine_check")
        if self._padding_rows is not None:
            V = V * self._padding_rows
        v = V[:, :1]
        products, failures = {}, {}
        for name, fn, columns in (("reverse_over_reverse", self._reverse_over_reverse, V),
                                  ("forward_over_reverse", self._forward_over_reverse, v)):
            try:
                product = fn(batch, columns)
                product = product if self._padding_rows is None else product * self._padding_rows
                if name == "reverse_over_reverse":
                    self._checked_products = (original, V, product)
                products[name] = product[:, :1]
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
        memo, self._checked_products = self._checked_products, None
        if self._padding_rows is not None:
            V = V * self._padding_rows
        if (memo is not None and memo[0] is batch and self.engine in ("cached_graph", "double_backward")
                and memo[1].shape == V.shape and torch.equal(memo[1], V)):
            return memo[2]  # the cross-check's reverse-over-reverse products of the same probes
        batch = self._prepare(batch)
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
        lowest = watch_precision(self.model, self.param_dtype, lambda: self._loss(self._theta, batch), stacklevel=5)
        if lowest is not None:
            self.compute_dtype = lowest

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


# the engines are checked on this many samples of the first batch: a wrong formula is wrong on any
# samples, and the checks then cost a fraction of a product (ResNet-20 on 64 images: docs/backends/torch.md)
_CHECK_SAMPLES = 8
# engines agree within this (relative), by the lowest precision a forward pass computes in
_ROUNDING = {torch.bfloat16: 1e-1, torch.float16: 2e-2, torch.float32: 2e-3, torch.float64: 1e-7}
_NORM_OR_ATTENTION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
                      nn.MultiheadAttention)


def watch_precision(model: nn.Module, param_dtype: torch.dtype, forward: Callable[[], Any], note: str = "",
                    stacklevel: int = 2) -> torch.dtype | None:
    """Run ``forward()`` (without gradients); warn if it computes in a lower precision than ``param_dtype``.

    Args:
        model: the model whose modules name where (hooks on its own modules, not global
            ones, which make torch.compile warn).
        param_dtype: the parameters' dtype.
        forward: one forward pass of the loss.
        note: appended to the warning.
        stacklevel: of the warning.

    Returns:
        The lowest precision seen, which bounds the products' accuracy; None if none is lower.
    """
    watch = _WatchPrecision(torch.finfo(param_dtype).bits)

    def leave(module: Any, args: Any, output: Any) -> None:
        watch.stack.pop()  # (a forward hook that returns something replaces the output)

    handles = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(lambda m, a: watch.stack.append(m)), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), watch:
            forward()
    finally:
        for h in handles:
            h.remove()
    if not watch.found:
        return None
    lowest = min(watch.found.values(), key=lambda d: torch.finfo(d).bits)
    where = _listing(sorted({f"{k} ({d})".replace("torch.", "") for k, d in watch.found.items()}))
    warnings.warn(f"the model's parameters are {param_dtype} but a forward pass computes parts in lower precision: "
                  f"{where}. Products, and every spectrum from them, are accurate to {lowest} rounding only{note}",
                  RuntimeWarning, stacklevel=stacklevel)
    return lowest


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
