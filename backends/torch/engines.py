"""The Hessian-vector product engines of :class:`~specops.backends.torch.TorchAdapter`.

Cached graph, double backward, forward-over-reverse and finite differences, and the switches of
``engine="auto"`` between them (the memory budget of the cache, :meth:`_Engines._use`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from specops.checks import finite_difference_products
from specops.model import ModelAdapter, NonDeterministicError
from specops.progress import Bar

from .calls import _map_tensors
from .formulas import _twice_differentiable
from .ops import TorchOps

#: The PyTorch product engines.
Engine = Literal["auto", "cached_graph", "double_backward", "forward_over_reverse", "finite_difference"]
ENGINES: tuple[Engine, ...] = get_args(Engine)
_REVERSE = ("cached_graph", "double_backward")


def _default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        physical = 8 << 30
    return int(0.25 * physical)


class _Engines(ModelAdapter):
    """The product engines of :class:`~specops.backends.torch.TorchAdapter` (its base class)."""

    ops: TorchOps
    _theta: Any
    _padding_rows: torch.Tensor | None
    _cache: dict[int, tuple[Any, Any, Any, int]]
    _cache_bytes: int
    _products: int
    _requested: str
    _vectorize_columns: bool
    _cheap_double_backward: bool
    _bar: Bar
    memory_budget: int
    richardson: bool
    compute_dtype: torch.dtype
    chunk_size: int | None

    if TYPE_CHECKING:
        def _prepare(self, batch: Any) -> Any: ...

        def _loss(self, theta: Any, batch: Any) -> Any: ...

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
        # strided gradients, many times slower; the rows of V.T are contiguous, without a copy when
        # V is column-major (a block of the Lanczos basis). The result is column-major too, each
        # column written once into it: PyTorch's CPU allocator maps every large new tensor afresh,
        # and the page faults of a new vector per column plus a stacking copy cost more than the
        # product. docs/backends/torch.md ("Measurements behind the code") has the figures.
        rows = V.T if V.T.is_contiguous() else [c.contiguous() for c in V.unbind(1)]  # cheaper than V.T.contiguous()
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
        if index == 0:
            self._products += 1
        if self._bar.enabled:
            self._bar.to(self._bar.count + 1)
            self._bar.show(product=self._products, batch=index + 1)
        if self._requested == "auto" and V.shape[1] > 1 and self._vectorize_columns:
            # on a GPU, one vectorized forward-over-reverse pass beats k double backwards
            # (docs/backends/torch.md, "On a GPU")
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

    def _use(self, name):
        """Switch an ``auto`` operator to the products of ``name``."""
        if name == "forward_over_reverse":
            self.engine = "forward_over_reverse"
        else:
            self._vectorize_columns = False
            if self.engine == "forward_over_reverse":
                self.engine = "cached_graph"
