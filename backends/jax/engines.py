"""The Hessian-vector product engines of :class:`~specops.backends.jax.JaxAdapter`, and ``"auto"``'s policy.

- ``"forward_over_reverse"`` (:class:`ForwardOverReverse`): ``jvp`` of ``grad``, the columns
  of a block mapped by ``vmap`` and the whole product compiled once by ``jax.jit``. Within
  one call the primal (the gradient pass) does not depend on the column, so ``vmap``
  evaluates it once and batches only the tangents: the saving ``jax.linearize`` would
  bring, without keeping every batch's residuals in memory between products.
- ``"finite_difference"`` (:class:`FiniteDifference`): central differences of gradients
  (:func:`specops.checks.finite_difference_products`), for a ``custom_vjp`` whose backward
  rule is not differentiable.
- ``"auto"``: :func:`choose` picks forward-over-reverse, the exact product; the core's
  construction check (:func:`specops.checks.check_engine`) moves it to finite differences
  (:func:`fall_back`) when it finds it wrong. :class:`EngineChoice` says which engine is in
  use and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp

from specops._checks import choice
from specops.checks import finite_difference_products, machine_epsilon
from specops.ops import VectorOps

#: A product engine: ``jvp`` of ``grad`` (exact), central differences of gradients, or the policy's pick
Engine = Literal["auto", "forward_over_reverse", "finite_difference"]
#: the values of :data:`Engine`
ENGINES: tuple[Engine, ...] = ("auto", "forward_over_reverse", "finite_difference")


@dataclass(frozen=True)
class EngineChoice:
    """The engine in use and why.

    Attributes:
        requested: the ``engine=`` the user passed.
        engine: the engine that computes the products.
        reason: why that one.
    """

    requested: Engine
    engine: Engine
    reason: str


def choose(requested: Engine) -> EngineChoice:
    """The engine for ``engine=requested``: ``"auto"`` is forward-over-reverse, any other itself.

    Raises:
        ValueError: ``requested`` is not one of :data:`ENGINES`.
    """
    requested = choice("engine", requested, ENGINES)
    if requested == "auto":
        return EngineChoice("auto", "forward_over_reverse",
                            "auto: jvp of grad is exact and one compiled program; the construction check "
                            "moves to finite differences if it finds it wrong")
    return EngineChoice(requested, requested, "requested")


def fall_back(current: EngineChoice) -> EngineChoice:
    """``current`` moved to finite differences: the construction check found its engine wrong."""
    return EngineChoice(current.requested, "finite_difference",
                        f"the construction check found {current.engine} wrong (a backward rule that is not "
                        "differentiable, e.g. a custom_vjp): central differences of gradients need none")


#: ``call(fn, batch, *vectors)``: ``fn(flat, fixed, batch, *vectors)`` where the adapter runs it
Call = Callable[..., Any]


class ForwardOverReverse:
    """``jit(vmap(jvp(grad(loss))))``, over blocks of at most ``chunk_size`` columns.

    Args:
        scalar_loss: ``scalar_loss(flat, fixed, batch)``, pure and traceable.
        call: the adapter's ``call(fn, batch, *vectors)`` (it places the arguments).
        chunk_size: columns per compiled call (memory grows with it).
        constrain: wraps the traced product (a sharded adapter pins its output's sharding).
    """

    name: Engine = "forward_over_reverse"

    def __init__(self, scalar_loss: Callable[..., Any], call: Call, chunk_size: int,
                 constrain: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> None:
        self.scalar_loss, self.call, self.chunk_size = scalar_loss, call, chunk_size
        #: how many times the product was traced (each a compilation)
        self.num_traces = 0
        self.program = jax.jit(self._block if constrain is None else constrain(self._block))

    def _block(self, flat: Any, fixed: Any, batch: Any, V: Any) -> Any:
        self.num_traces += 1  # runs only while tracing: counts compilations

        def grad(p: Any) -> Any:
            return jax.grad(self.scalar_loss)(p, fixed, batch)

        def column(v: Any) -> Any:
            return jax.jvp(grad, (flat,), (v,))[1]

        if V.ndim == 1:  # one vector (H @ v): no reshapes outside the compiled program
            return column(V)
        if V.shape[1] == 1:  # a single column: no vmap (batching one column costs ~0.2 ms a product)
            return column(V[:, 0])[:, None]
        return jax.vmap(column, in_axes=1, out_axes=1)(V)

    def products(self, batch: Any, V: Any) -> Any:
        """``H V`` for a block ``V`` (n, k) on one batch."""
        k, c = V.shape[1], self.chunk_size
        if k <= c:
            return self.call(self.program, batch, V)
        blocks = [self.call(self.program, batch, V[:, j : j + c]) for j in range(0, k, c)]
        return jnp.concatenate(blocks, axis=1)

    def vector(self, batch: Any, v: Any) -> Any:
        """``H v`` for a vector ``v`` (n,) on one batch."""
        return self.call(self.program, batch, v)


class FiniteDifference:
    """Central differences of gradients along each column.

    Args:
        gradient_at: ``gradient_at(batch, delta)``: the batch's gradient at ``theta + delta``.
        theta: the parameters (their norm sets the step).
        num_params: the number of parameters (``theta`` may carry zero padding rows).
        ops: the vectors' operations.
    """

    name: Engine = "finite_difference"

    def __init__(self, gradient_at: Callable[[Any, Any], Any], theta: Any, num_params: int,
                 ops: VectorOps) -> None:
        self.gradient_at, self.ops = gradient_at, ops
        self.theta, self.num_params = theta, num_params

    def products(self, batch: Any, V: Any) -> Any:
        """``H V`` for a block ``V`` (n, k) on one batch."""
        scale = max(1.0, float(jnp.linalg.norm(self.theta)) / max(self.num_params, 1) ** 0.5)
        return finite_difference_products(lambda d: self.gradient_at(batch, d), V, self.ops,
                                          eps=machine_epsilon(self.ops.dtype), scale=scale)[0]

    def vector(self, batch: Any, v: Any) -> Any:
        """``H v`` for a vector ``v`` (n,) on one batch."""
        return self.products(batch, v[:, None])[:, 0]


__all__ = ["ENGINES", "Engine", "EngineChoice", "FiniteDifference", "ForwardOverReverse", "choose",
           "fall_back"]
