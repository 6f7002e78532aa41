"""The JAX backend: Hessians of ``loss_fn(params, batch)`` for any parameter pytree.

``params`` may be a raw dict, a Flax ``params`` collection (or a linen variables dict,
or an NNX module's state), an Equinox module's array part or a Haiku parameter
mapping: anything ``jax.tree_util`` flattens. :func:`hessian` turns a loss, parameters
and data into a :class:`specops.model.ModelOperator`; this package supplies only the
framework's pieces, one file each:

- :mod:`.ops`: vector operations on JAX arrays (:class:`JaxOps`), dense matrices;
- :mod:`.params`: which leaves are differentiated, and their names;
- :mod:`.batches`: batch sizes, and a batch split over one process's devices (:class:`DataMesh`);
- :mod:`.engines`: the product engines (``jvp`` of ``grad``, central differences) and
  ``engine="auto"``'s policy;
- :mod:`.adapter`: the per-batch functions, compiled once (:class:`JaxAdapter`);
- :mod:`.model_loss`: a loss from a model and a loss of its outputs (:func:`model_loss`);
- :mod:`.curvature`: Gauss-Newton and Fisher (:func:`ggn`, :func:`fisher`);
- :mod:`.sharded`: parameters sharded over a mesh, vectors sharded alike;
- :mod:`.optim`: optax states as preconditioners and stability thresholds.

Parameters are named by their pytree path, keys joined by dots:
``{"layers": [{"w": ...}]}`` has the block ``"layers.0.w"``; a bare array is
``"params"``. Select blocks with those names or glob patterns (``"layers.0.*"``).

Vectors are immutable JAX arrays of the parameters' dtype on the parameters'
device; float64 needs ``jax.config.update("jax_enable_x64", True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from specops.model import ModelOperator

from .adapter import JaxAdapter
from .batches import DataMesh, batch_size
from .curvature import fisher, ggn
from .engines import ENGINES, Engine
from .model_loss import model_loss
from .ops import JaxOps, matrix_operator
from .optim import preconditioner, stability_threshold
from .sharded import ShardedJaxAdapter, mesh_of

# the names of the API reference (preconditioner and stability_threshold are documented with .optim)
__all__ = ["ENGINES", "DataMesh", "Engine", "JaxAdapter", "JaxOps", "batch_size", "fisher", "ggn", "hessian",
           "matrix_operator", "model_loss"]


def hessian(loss_fn: Callable[..., Any], params: Any, data: Any, *, wrt: Any = None, reduction: str | None = None,
            comm: Any = None, check_deterministic: bool = True, dtype: Any = None, chunk_size: int = 16,
            devices: Any = None, engine: Engine = "auto", cross_check: bool = True) -> ModelOperator:
    """The Hessian of ``loss_fn(params, batch)`` over ``data`` with respect to ``params``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, pure and traceable by JAX; it
            reduces over the batch as ``reduction`` says.
        params: any pytree of parameters (dict, Flax params, Equinox arrays, Haiku).
            Leaves placed with ``NamedSharding`` over a mesh of several devices make the
            vectors sharded over the mesh too (:mod:`specops.backends.jax.sharded`).
        data: one batch (a tuple or dict of arrays) or a re-iterable of batches; an
            unequal last batch is compiled for once.
        wrt: ``None`` (every leaf), or pytree-path names / glob patterns
            (``"layers.0.*"``) of the leaves to differentiate; the rest are held fixed.
        reduction: ``"mean"`` (batches weighted by sample count; the default) or ``"sum"``.
            The first batch's loss is compared with its halves' at construction: a loss
            that behaves as the other reduction raises.
        comm: ``None`` or a communicator; each rank passes its own shard of the data.
        check_deterministic: check every batch's loss is finite and that two identical
            products agree.
        dtype: cast the floating leaves first (``jnp.float64`` needs ``jax_enable_x64``).
        chunk_size: columns of a block evaluated by one compiled ``vmap`` call.
        devices: split every batch over several devices, one compiled program per
            product (data parallel within the process): ``"local"`` (every local
            device), a list of devices, or a ``jax.sharding.Mesh``. Batches whose size
            the number of devices does not divide run on the parameters' device alone.
            ``None`` (default): the parameters' device. Across hosts, combine it with
            ``comm=`` (see ``docs/distributed.md``).
        engine: ``"auto"`` (``"forward_over_reverse"``, unless the construction check finds
            it wrong: then ``"finite_difference"``, with a warning), ``"forward_over_reverse"``
            (``jit(vmap(jvp(grad(loss))))``) or ``"finite_difference"`` (central differences of
            gradients: for a ``custom_vjp`` whose backward is not differentiable).
        cross_check: check the engine on the first batch at construction: symmetry on two
            probes and central differences of gradients
            (:func:`specops.checks.check_engine`); ``H.engine_check`` holds what it found.

    Returns:
        A :class:`specops.ModelOperator`: ``H @ v`` takes and returns JAX arrays.

    Raises:
        TypeError: leaves that cannot be differentiated (integers, functions), or a
            loss that is not a floating scalar.
        ValueError: a loss that is not a scalar; a selection that matches nothing.
        specops.NonFiniteError: a non-finite loss (naming the batch).
        ValueError: an explicit ``engine`` that the construction check finds wrong (the
            message names ``engine="finite_difference"``).

    Example:
        >>> import jax.numpy as jnp
        >>> from specops.backends import jax as sj
        >>> params = {"w": jnp.array([1.0, 2.0])}
        >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0.5, 1.0])
        >>> H = sj.hessian(lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2), params, (x, y))
        >>> H.to_dense()
        array([[1., 0.],
               [0., 1.]])
    """
    from specops.reduction import check_plain, loss_name
    from specops.reduction import resolve as resolve_reduction

    mesh = mesh_of(params)  # parameters sharded over a mesh: vectors sharded alike
    make = JaxAdapter if mesh is None else partial(ShardedJaxAdapter, mesh=mesh)
    adapter = make(loss_fn, params, wrt=wrt, dtype=dtype, chunk_size=chunk_size, devices=devices,
                   engine=engine)
    resolved = resolve_reduction(reduction, None, loss_name(loss_fn))
    return ModelOperator(adapter, data, reduction=resolved, comm=comm, check_deterministic=check_deterministic,
                         cross_check=cross_check, first_batch_check=lambda first: check_plain(
                             adapter, loss_fn, None, resolved, first, float(np.finfo(adapter.ops.dtype).eps)))
