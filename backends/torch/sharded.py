"""PyTorch models sharded with FSDP2 (``fully_shard`` on a ``DeviceMesh``) or tensor parallelism: sharded vectors.

``specops.backends.torch.hessian(model, loss_fn, data)`` on a model wrapped with
``torch.distributed.fsdp.fully_shard`` returns an operator whose vectors are sharded like
the parameters: each rank holds, of every vector, the entries of its own shards of the
parameters (FSDP2 shards each parameter by rows, ``Shard(0)``), concatenated in the order
of the parameters. The global index of an entry is its place in the flat vector of the
unsharded model, so probes are those one process draws (:class:`specops.sharded.ShardedOps`
with one range of rows per parameter); no rank ever holds an ``n``-vector. On a 2-D
``(replicate, shard)`` mesh (HSDP, placements ``(Replicate(), Shard(0))``) the replicas hold
copies of the shard group's rows: all but the first replica are not owners of their rows
(``ShardedOps(owner=False)``), so every reduction counts each row once, over all ranks.

Tensor parallelism (``parallelize_module`` on a 1-D mesh, no ``fully_shard``; every rank with
the same data) is taken the same way: a ``Shard(d)`` parameter's local shard is a box of the
global tensor (one range of global indices per index of the dimensions before the last cut
one: one per matrix row for ``Shard(1)``); a parameter every rank holds whole (``Replicate()``,
or a plain tensor the plan left alone) is held in the vectors by the mesh's first rank, which
broadcasts its entries of each product column so that every rank steps its copy alike. The
data's host sums (samples, losses, batches) are not summed over the ranks: they hold one data set.

Both at once (2-D parallelism: ``parallelize_module`` over the ``tp`` axis of a 2-D ``(dp,
tp)`` mesh, then ``fully_shard`` over its ``dp`` axis) is the two combined (:class:`_Split`):
FSDP2 shards the tensor-parallel shards by rows (placements ``(_StridedShard(0), Shard(0))``
for a column-wise layer, ``(Shard(0), Shard(1))`` for a row-wise one), still a box of the
global tensor; what the plan leaves whole is FSDP2's ``Shard(0)`` over ``dp`` alone, held in
the vectors by the first rank along ``tp``; the ranks along ``tp`` hold the same data, and
the data's host sums run over the ranks along ``dp``. With HSDP over ``(replicate, shard)``
axes instead of ``dp`` (a 3-D mesh) the replicas but the first hold copies, as above.

Products are central differences of the gradient that the model's own ``backward()``
gives: FSDP2 all-gathers the parameters in the forward pass and reduce-scatters the
gradients in the backward pass, so each rank receives its shard of the gradient of the
loss over every rank's data. ``torch.autograd.grad`` cannot differentiate through FSDP2's
parameter handling (the sharded parameters are not in the graph), and ``backward(
create_graph=True)`` returns gradients without a graph (the reduce-scatter is outside
autograd): FSDP2 offers no exact second derivative, so finite differences are the engine.
The step is that of ``engine="finite_difference"`` (``h = eps**(1/3) * max(1, rms(theta))``
along ``v / ||v||``, ``eps`` that of the lowest precision a forward pass computes in), whose
error is ``O(h^2)`` truncation plus ``O(eps / h)`` rounding of the gradients: about ``1e-10``
relative in float64 and ``1e-4`` to ``1e-3`` in float32. Double backward through a
tensor-parallel model's DTensors runs but misses the second derivative through a parallel
layer's input collectives (36 % wrong on a tensor-parallel Llama), so tensor parallelism too
uses finite differences.

The batches of each rank are weighted by their sample counts over all ranks (each rank's
loss is scaled so that FSDP2's average over the ranks is the sample-weighted mean); every
rank must pass the same number of batches (each backward is collective). Parameters are
stepped in place and restored exactly (from a copy) after each product; their ``.grad``
is kept and restored. A product writes ``theta +- h u`` into the shards from a copy kept in
one buffer of this rank's rows (allocated once); the loss is scaled by ``||v|| / 2h``, so
each side's gradient shards are added straight into the output column: beyond the two
gradients a product reads and writes the shards a few times and allocates nothing of size
``n/p``. On one process the vectors' reductions skip the collectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from specops.distributed import Comm, TorchComm, as_comm
from specops.layout import ParamLayout
from specops.model import ModelAdapter, ModelOperator, resolve_loss_form
from specops.sharded import ShardedOps


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2/DTensor parameters, or is wrapped by the older FSDP.

    Those models go to :func:`hessian` here, which explains what it cannot take.
    """
    DTensor = _dtensor_type()
    if DTensor is None:
        return False
    if type(model).__name__ == "FullyShardedDataParallel":
        return True
    return any(isinstance(p, DTensor) for p in model.parameters())


def _check_model(model: nn.Module, named: list[tuple[str, Any]]) -> str:
    """Raise, naming the fix, for what finite differences of sharded gradients cannot take.

    Returns:
        How the model is split: ``"fsdp"`` (``fully_shard`` on a 1-D mesh or a 2-D
        ``(replicate, shard)`` one), ``"tp"`` (``parallelize_module`` on a 1-D mesh, no
        ``fully_shard``) or ``"fsdp_tp"`` (tensor parallelism on one axis of a 2-D mesh,
        ``fully_shard`` on the other).
    """
    if type(model).__name__ == "FullyShardedDataParallel":
        raise TypeError("the model is wrapped with the older FullyShardedDataParallel (FSDP1), whose flat "
                        "parameters specops cannot shard vectors by; wrap it with FSDP2 instead: "
                        "torch.distributed.fsdp.fully_shard(module, mesh=...) on each block and on the root")
    DTensor = _dtensor_type()
    sharded = [(name, p) for name, p in named if isinstance(p, DTensor)]
    managed, fsdp_meshes = _fsdp_managed(model)
    parallel = managed is not None and not managed  # DTensors, and no fully_shard anywhere
    plain = [name for name, p in named if not isinstance(p, DTensor)]
    if plain and not parallel:
        raise ValueError(f"the model is partly sharded: {', '.join(plain[:4])}{' ...' if len(plain) > 4 else ''} "
                         "are plain tensors while the other parameters are FSDP2 DTensors; call fully_shard on "
                         "the root module too (fully_shard(model, mesh=mesh)) so every parameter is sharded")
    foreign = [name for name, p in sharded if managed and id(p) not in managed]
    if foreign:
        raise ValueError(f"{', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''} are DTensors that "
                         "fully_shard does not manage (tensor parallel, parallelize_module or distribute_tensor) "
                         "in a model that fully_shard shards: call fully_shard on the root module too "
                         "(fully_shard(model, mesh=dp_mesh)) so every parameter is sharded by it")
    if not sharded:
        raise ValueError("no trainable parameter is a DTensor: build the operator on the model before sharding it, "
                         "or leave some sharded parameters trainable")
    meshes = {p.device_mesh for _, p in sharded}  # equal meshes may be distinct objects: compared by ==
    kind = "tp" if parallel else "fsdp"
    if not parallel and fsdp_meshes and any(m != next(iter(fsdp_meshes)) for m in list(meshes) + list(fsdp_meshes)):
        kind = "fsdp_tp"  # fully_shard over one axis of the mesh of tensor-parallel parameters
        _check_fsdp_tp(meshes, fsdp_meshes)
    elif any(m != next(iter(meshes)) for m in meshes):
        raise ValueError("the parameters are sharded over different DeviceMeshes; shard every module on one mesh")
    mesh = next(iter(meshes))
    if parallel and mesh.ndim != 1:
        raise ValueError(f"the tensor-parallel parameters are distributed over a {mesh.ndim}-D DeviceMesh without "
                         "fully_shard; specops takes tensor parallelism on a 1-D mesh (parallelize_module(model, "
                         "init_device_mesh(device, (tp,)), plan), every rank with the same data), or on one axis of "
                         "a 2-D (dp, tp) mesh with fully_shard on the other (fully_shard(model, mesh=mesh['dp']))")
    for name, p in sharded:
        kinds = [(type(q).__name__, getattr(q, "dim", None)) for q in p.placements]
        fsdp = kinds.count(("Shard", 0)) == 1 and all(k == ("Shard", 0) or k[0] == "Replicate" for k in kinds)
        both = kind == "fsdp_tp" and any(k in (("Shard", 0), ("_StridedShard", 0)) for k in kinds) and \
            all(k[0] in ("Shard", "_StridedShard", "Replicate") for k in kinds)
        if not (fsdp or both or parallel and kinds[0][0] in ("Shard", "Replicate")):
            raise ValueError(f"parameter {name!r} has placements {p.placements}; specops shards vectors as FSDP2 "
                             "does (Shard(0) on one mesh dimension, Replicate() on any other: fully_shard on a "
                             "1-D mesh or a 2-D (replicate, shard) mesh (HSDP)), as tensor parallelism on a 1-D "
                             "mesh does (Shard(d) or Replicate()), or as fully_shard over the first axis of a 2-D "
                             "(dp, tp) mesh of tensor-parallel parameters does; other placements are not "
                             "supported: shard the model with one of those to compute its spectrum")
    for name, p in named:
        if p.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"parameter {name!r} is {p.dtype}; finite differences need float32 or float64 "
                            "gradients: keep the sharded parameters in float32 (model.float() before fully_shard)")
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        policy = getattr(state(), "_mp_policy", None) if callable(state) else None
        low = [d for d in (getattr(policy, "param_dtype", None), getattr(policy, "reduce_dtype", None))
               if d is not None and d not in (torch.float32, torch.float64)]
        if low:
            raise ValueError(f"fully_shard's MixedPrecisionPolicy computes in {low[0]}: finite differences of "
                             "gradients need float32 (a bf16 gradient rounds at 4e-3, far above the difference "
                             "of two nearby gradients). Build the operator on a model sharded without "
                             "mp_policy (or with param_dtype=torch.float32, reduce_dtype=torch.float32)")
    return kind


def _check_fsdp_tp(meshes: set, fsdp_meshes: set) -> None:
    """Raise unless fully_shard's mesh (1-D, or HSDP's 2-D) is the parameters' mesh less one (tensor-parallel) axis."""
    dp = next(iter(fsdp_meshes))
    wide = {m for m in meshes if m.ndim == dp.ndim + 1}
    if len(fsdp_meshes) != 1 or dp.ndim > 2 or len(wide) != 1 or any(m != dp for m in meshes - wide):
        raise ValueError("fully_shard and tensor parallelism are combined over meshes specops cannot split "
                         f"(fully_shard over {sorted(m.ndim for m in fsdp_meshes)}-D meshes, parameters over "
                         f"{sorted(m.ndim for m in meshes)}-D meshes); specops takes one (dp, tp) mesh: "
                         "parallelize_module(model, mesh['tp'], plan), then fully_shard(module, mesh=mesh['dp']) "
                         "on each block and on the root (or mesh=mesh['replicate', 'shard'] for HSDP)")


def _fsdp_managed(model: nn.Module) -> tuple[set[int] | None, set]:
    """The ids of the sharded parameters that ``fully_shard`` manages (None where PyTorch hides them), and its meshes."""
    ids: set[int] = set()
    meshes: set[Any] = set()
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if callable(state) else None
        params = getattr(group, "fsdp_params", None) if group is not None else None
        if group is not None and params is None:
            return None, meshes
        mesh = getattr(getattr(group, "mesh_info", None), "mesh", None)
        if mesh is not None:
            meshes.add(mesh)
        ids.update(id(fp.sharded_param) for fp in params or [])
    return ids, meshes


def _is_copy(p: Any) -> bool:
    """Whether this rank holds a copy of another rank's shard (not the first replica on a Replicate dimension)."""
    coordinate = p.device_mesh.get_coordinate()
    return any(type(q).__name__ == "Replicate" and coordinate[d] != 0 for d, q in enumerate(p.placements))


def _mesh_group(mesh: Any) -> Any:
    """The process group of all the mesh's ranks (the world's where the mesh holds every rank)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == torch.distributed.get_world_size():
        return torch.distributed.group.WORLD
    return mesh._flatten().get_group()  # a sub-mesh of the world: its ranks as one group


class _Split:
    """How a sharded model's ranks split its parameters and its data, from :func:`_check_model`'s kind.

    Attributes:
        kind: ``"fsdp"``, ``"tp"`` or ``"fsdp_tp"``.
        mesh: the mesh of every rank (the 2-D ``(dp, tp)`` mesh for ``"fsdp_tp"``).
        tp_dim: the tensor-parallel axis of ``mesh`` (None for ``"fsdp"``): its ranks hold the
            same data and copies of every parameter it does not shard.
        tp_comm: a communicator over this rank's ranks along ``tp_dim`` (None for ``"fsdp"``).
        data_comm: the communicator the data's host sums (samples, losses, batches) are summed
            over: every rank (``"fsdp"``), this rank alone (``"tp"``), the ranks along the
            ``fully_shard`` axes (``"fsdp_tp"``).
        replica: whether this rank holds copies of another rank's rows (HSDP: every replica
            but the first), which every reduction counts once (``ShardedOps(owner=False)``).
    """

    def __init__(self, kind: str, named: list[tuple[str, Any]], comm: Comm, model: nn.Module) -> None:
        self.kind = kind
        meshes = [p.device_mesh for _, p in named if hasattr(p, "device_mesh")]
        self.mesh = max(meshes, key=lambda m: m.ndim)
        self.tp_dim: int | None = None
        self.tp_comm: Comm | None = None
        self.data_comm: Comm = comm
        self.replica = kind == "fsdp" and _is_copy(next(p for _, p in named if hasattr(p, "device_mesh")))
        if kind == "tp":
            self.tp_dim, self.tp_comm, self.data_comm = 0, comm, Comm()
        elif kind == "fsdp_tp":  # fully_shard's mesh (1-D, or HSDP's 2-D) holds the ranks of one tp coordinate
            dp = next(iter(_fsdp_managed(model)[1]))
            dp_ranks = {int(r) for r in dp.mesh.flatten()}
            along = [set(torch.distributed.get_process_group_ranks(self.mesh.get_group(d)))
                     for d in range(self.mesh.ndim)]
            self.tp_dim = next((d for d, ranks in enumerate(along) if not ranks <= dp_ranks), self.mesh.ndim - 1)
            self.tp_comm = TorchComm(self.mesh.get_group(self.tp_dim))
            self.data_comm = TorchComm(_mesh_group(dp))
            self.replica = dp.ndim == 2 and dp.get_coordinate()[0] != 0

    def shared(self, p: Any) -> bool:
        """Whether every rank along the tensor-parallel axis holds a copy of ``p`` (not a shard of its own)."""
        if self.tp_dim is None:
            return False
        if not hasattr(p, "device_mesh") or p.device_mesh.ndim < self.mesh.ndim:
            return True  # a plain tensor the plan left alone, or fully_shard's shard of one
        return type(p.placements[self.tp_dim]).__name__ == "Replicate"

    def source(self) -> int:
        """The global rank that holds the copies of this rank's tensor-parallel group (its first)."""
        coordinate = list(self.mesh.get_coordinate())
        coordinate[int(self.tp_dim or 0)] = 0
        return int(self.mesh.mesh[tuple(coordinate)])

    def first(self) -> bool:
        """Whether this rank is the first along the tensor-parallel axis (it holds the copies' entries)."""
        return self.tp_dim is not None and self.mesh.get_coordinate()[self.tp_dim] == 0


def _local(p: Any) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard, or a plain tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def _rows(p: Any, start: int) -> list[range]:
    """The global rows of a parameter's local entries, in their row-major order, its first entry at ``start``.

    A DTensor's local shard is a box of the global tensor: one range for a shard by rows
    (``Shard(0)``), one range per row for a shard by columns (``Shard(1)``, as a row-wise
    parallel linear layer's weight), and so on; a plain tensor is one range.
    """
    if not hasattr(p, "device_mesh"):
        return [range(start, start + p.numel())]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    full, shape, offset = tuple(p.shape), tuple(int(s) for s in shape), tuple(int(o) for o in offset)
    if 0 in shape:
        return []
    cut = [d for d in range(len(full)) if shape[d] != full[d]]
    if not cut:
        return [range(start, start + p.numel())]
    k = cut[-1]  # the dimensions after k are whole: each index of those before it is one range
    length = int(np.prod(shape[k:]))
    lead = np.stack(np.meshgrid(*[np.arange(o, o + s) for o, s in zip(offset[:k], shape[:k])], indexing="ij"),
                    axis=-1).reshape(-1, k) if k else np.zeros((1, 0), dtype=int)
    corners = np.concatenate([lead, np.tile([offset[k]] + [0] * (len(full) - k - 1), (len(lead), 1))], axis=1)
    firsts = np.ravel_multi_index(tuple(corners.T), full) if full else np.zeros(1, dtype=int)
    return [range(start + int(f), start + int(f) + length) for f in firsts]


class _ProductsReduced(Comm):
    """``comm``, except that products are not summed: FSDP2's reduce-scatter has done it.

    The data's host sums (samples, losses, batches) are summed over ``data`` (:attr:`_Split.
    data_comm`): with tensor parallelism the ranks along its axis hold the same data, counted once.
    """

    def __init__(self, comm: Comm, data: Comm) -> None:
        self.inner, self.data = comm, data
        self.rank, self.size = comm.rank, comm.size
        self.local_rank, self.local_size = comm.local_rank, comm.local_size

    def allreduce_host(self, x: Any) -> Any:
        return self.data.allreduce_host(x)

    def allreduce(self, X: Any, ops: Any) -> Any:
        return X

    def allgather(self, obj: Any) -> list:
        return self.inner.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.inner.bcast(obj, root)

    def barrier(self) -> None:
        self.inner.barrier()


class FSDPAdapter(ModelAdapter):
    """Finite differences of FSDP2 gradients on this rank's shards (see the module docstring).

    Args:
        model: a model wrapped with ``fully_shard``.
        loss_fn: ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)``.
        comm: the communicator of the model's mesh.
        weights: ``batch size -> weight`` of a batch in the data loss (its samples over all
            ranks' samples for ``reduction="mean"``, 1 for ``"sum"``).
        loss_form: see :func:`specops.backends.torch.hessian`.
        wrt: the parameters to take the Hessian in (see :func:`specops.backends.torch.hessian`).
        richardson: Richardson extrapolation of the steps ``h`` and ``2h`` (four gradients
            a column, truncation error ``O(h^4)``; :func:`specops.checks.finite_difference_products`).
    """

    def __init__(self, model: nn.Module, loss_fn: Any, comm: Comm, weights: Callable[[int], float],
                 loss_form: str = "auto", wrt: Any = None, richardson: bool = False,
                 split: _Split | None = None) -> None:
        from .calls import _LossModule
        from .ops import TorchOps
        from .params import _resolve_params

        self.model, self.loss_fn, self.loss_form = model, loss_fn, resolve_loss_form(loss_fn, loss_form)
        self.richardson = bool(richardson)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters: the Hessian would be empty")
        kind = _check_model(model, named)
        self.split = split if split is not None else _Split(kind, named, comm, model)
        self.engine = ("finite_difference: central differences of " +
                       {"tp": "tensor-parallel gradients (backward)",
                        "fsdp": "FSDP2 gradients (backward + reduce-scatter)",
                        "fsdp_tp": "tensor-parallel FSDP2 gradients (backward + reduce-scatter)"}[kind] +
                       (", Richardson-extrapolated over the steps h and 2h" if richardson else ""))
        chosen = set(_resolve_params(model, wrt))
        named = [(name, p) for name, p in named if name in chosen]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.layout = ParamLayout(self.names, [tuple(p.shape) for p in self.params])
        # tensor parallel: a parameter the ranks along the tensor-parallel axis hold copies of (Replicate(),
        # or a plain tensor) is held in the vectors by the axis's first rank; the others step their copy
        # from its entries
        self._shared = [self.split.shared(p) for p in self.params]
        self._held = [not shared or self.split.first() for shared in self._shared]
        local = _local(self.params[0])
        vectors = comm if comm.size > 1 else Comm()  # one process: its reductions need no collective
        pieces = [r for name, p, held in zip(self.names, self.params, self._held) if held
                  for r in _rows(p, self.layout.blocks[name].start)]
        self.ops = self._sharded = ShardedOps(TorchOps(local.dtype, local.device), vectors, self.layout.num_params,
                                              pieces, owner=not self.split.replica)
        self.comm, self.weights = comm, weights
        if self.split.tp_comm is not None:
            copies = [float(torch.sum(_local(p).detach().double())) for p, shared in zip(self.params, self._shared)
                      if shared]
            self.split.tp_comm.agree(copies, "the replicated parameters' sums",
                                     "with tensor parallelism the parameters outside parallelize_module's plan are "
                                     "copies on every rank: initialize the model with the same seed on every rank")
        self._loss = _LossModule(model, loss_fn, self.loss_form, local.dtype)
        self._fsdp_modules = [m for m in model.modules() if hasattr(m, "reshard") and hasattr(m, "_get_fsdp_state")]
        self._fingerprint = self._layout_now()
        self._theta: torch.Tensor | None = None  # the saved shards during a product (n_local numbers)
        self._theta_dtype, self._device = local.dtype, local.device
        self.compute_dtype = local.dtype  # lowered by check_precision
        rms = self.ops.column_norms(self.params_vector()[:, None])[0] / np.sqrt(self.layout.num_params)
        self._scale = max(1.0, float(rms))
        self._step_factor = 1.0  # set by step_check: the products at h/2 and 2h

    def _layout_now(self) -> list[tuple]:
        return [(id(p), _local(p).shape, p.device, getattr(p, "placements", None), p.dtype)
                for p in self.model.parameters() if p.requires_grad]

    def _reshard(self) -> None:
        """Return every FSDP2 module's parameters to their shards.

        A forward without gradients leaves the root's parameters unsharded (FSDP2 keeps the
        root gathered after its forward, for the backward that usually follows).
        """
        for module in self._fsdp_modules:
            module.reshard()

    def _check_unchanged(self) -> None:
        self._reshard()
        if self._layout_now() != self._fingerprint:
            raise RuntimeError("the model's parameters were moved, re-sharded or replaced after the operator was "
                               "built (device, dtype, placements or local shapes differ); build the operator "
                               "again for the model as it is now")

    # --- ModelAdapter -------------------------------------------------------------------
    def batch_size(self, batch: Any) -> int:
        t = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))
        return int(t.shape[0])

    def params_vector(self) -> torch.Tensor:
        held = [_local(p).detach().reshape(-1) for p, h in zip(self.params, self._held) if h]
        return torch.cat(held) if held else torch.zeros(0, dtype=self._theta_dtype, device=self._device)

    def _locals(self) -> list[torch.Tensor]:
        return [_local(p) for p in self.params]

    def _direction(self, v: torch.Tensor) -> list[torch.Tensor]:
        """``v`` (this rank's rows) as one tensor per parameter, shaped like its local shard.

        With tensor parallelism the replicated parameters' entries come from the mesh's first
        rank, which holds them: one broadcast over the mesh (every rank calls this together).
        """
        out: list[Any] = []
        at = 0
        for p, held in zip(self._locals(), self._held):
            out.append(v[at : at + p.numel()].view(p.shape) if held else None)
            at += p.numel() if held else 0
        if any(self._shared) and self.split.tp_comm is not None and self.split.tp_comm.size > 1:
            shared = [i for i, s in enumerate(self._shared) if s]
            local = self._locals()
            sizes = [local[i].numel() for i in shared]
            buffer = (torch.cat([out[i].reshape(-1) for i in shared]) if self._held[shared[0]]
                      else torch.empty(sum(sizes), dtype=v.dtype, device=v.device))
            group = self.split.mesh.get_group(self.split.tp_dim)
            torch.distributed.broadcast(buffer, self.split.source(), group=group)
            for i, piece in zip(shared, torch.split(buffer, sizes)):
                out[i] = piece.view(local[i].shape)
        return out

    def _saved_shards(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """The shards copied into a buffer of this rank's rows, kept between products (no new allocation)."""
        if self._theta is None:
            self._theta = torch.empty(sum(s.numel() for s in shards), dtype=shards[0].dtype, device=shards[0].device)
        saved, at = [], 0
        with torch.no_grad():
            for s in shards:
                saved.append(self._theta[at : at + s.numel()].view_as(s))
                saved[-1].copy_(s)
                at += s.numel()
        return saved

    @staticmethod
    def _write(shards: list[torch.Tensor], theta: list[torch.Tensor], v: list[torch.Tensor] | None,
               alpha: float) -> None:
        """Set the shards to ``theta + alpha * v`` (``theta`` where ``v`` is None) in place, in one pass."""
        with torch.no_grad():
            for i, (s, t) in enumerate(zip(shards, theta)):
                if v is None:
                    s.copy_(t)
                else:
                    torch.add(t, v[i], alpha=alpha, out=s)

    @contextlib.contextmanager
    def _stepping(self) -> Iterator[Callable[[list[torch.Tensor], float], None]]:
        """Within it, ``step(d, alpha)`` sets the shards to ``theta + alpha * d`` in place, in one pass.

        ``d`` is a direction per parameter (:meth:`_direction` of a vector).

        ``theta`` is the shards on entry, copied into one buffer of this rank's rows
        (allocated once); on exit the shards are ``theta`` again, exactly.
        """
        shards = self._locals()
        theta = self._saved_shards(shards)
        try:
            yield lambda v, alpha: self._write(shards, theta, v, alpha)
        finally:
            self._write(shards, theta, None, 0.0)

    def check_precision(self, batch: Any) -> None:
        """Warn if a forward pass computes in a lower precision than the parameters; the step follows it.

        As the unsharded backend's check (Hugging Face's Llama computes RMS norm in float32 in a
        float64 model): :attr:`compute_dtype`, the lowest precision seen, sets the step, whose
        rounding error is that precision's. One forward on every rank together.
        """
        from .checks import watch_precision

        try:
            lowest = watch_precision(self.model, self._theta_dtype, lambda: self._loss(batch),
                                     note=" (the finite-difference step is set for it)", stacklevel=4)
        except Exception:  # noqa: BLE001 - a loss that fails here fails the operator's checks, with their message
            return
        finally:
            self._reshard()
        if lowest is not None:
            self.compute_dtype = lowest

    def step_size(self, dtype: torch.dtype) -> float:
        """The central-difference step ``h = eps**(1/3) * max(1, rms(theta))`` along a unit direction.

        ``eps`` is that of the lowest precision a forward pass computes in
        (:meth:`check_precision`); ``eps**(1/5)`` with Richardson extrapolation, whose
        truncation error is ``O(h^4)``.
        """
        lowest = min(dtype, self.compute_dtype, key=lambda d: torch.finfo(d).bits)
        return float(torch.finfo(lowest).eps) ** (1 / 5 if self.richardson else 1 / 3) * self._scale * \
            self._step_factor

    @contextlib.contextmanager
    def _grads_kept(self) -> Iterator[None]:
        """Within it, backward passes may write the parameters' ``.grad``: restored on exit."""
        saved = [p.grad for p in self.params]
        try:
            yield
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def _backward_into(self, out: torch.Tensor, objective: Callable[[], torch.Tensor], alpha: float) -> None:
        """Add ``alpha`` times this rank's shard of the gradient of the scalar ``objective()`` to ``out``.

        One forward and one backward through FSDP2 (whose reduce-scatter sums every rank's
        batch); the gradient shards are read straight into ``out``.
        """
        for p in self.params:
            p.grad = None
        objective().backward()
        at = 0
        with torch.no_grad():
            for p, held in zip(self.params, self._held):
                if not held:  # a copy of the first rank's replicated parameter: its gradient is that rank's
                    continue
                size = _local(p).numel()
                if p.grad is not None:
                    out[at : at + size].add_(_local(p.grad).reshape(-1), alpha=alpha)
                at += size

    def _scale_of(self, batch: Any) -> float:
        # FSDP2 averages the gradients of the ranks along its axes: scaled by their number times the weight,
        # the average is the weighted sum; tensor parallel ranks share one batch, whose gradient each gives whole
        return self.split.data_comm.size * self.weights(self.batch_size(batch))

    def loss(self, batch: Any, delta: Any = None) -> float:
        """The batch's weighted loss (its share of the data loss; the operator's weights are 1)."""
        self._check_unchanged()
        try:
            with torch.no_grad(), self._stepping() if delta is not None else contextlib.nullcontext() as step:
                if step is not None:
                    step(self._direction(delta), 1.0)
                return self.weights(self.batch_size(batch)) * float(self._loss(batch))
        finally:
            self._reshard()

    def gradient(self, batch: Any) -> torch.Tensor:
        self._check_unchanged()
        out = torch.zeros(self._sharded.count, dtype=self._theta_dtype, device=self._device)
        scale = self._scale_of(batch)
        with self._grads_kept():
            self._backward_into(out, lambda: self._loss(batch) * scale, 1.0)
        return out

    def hvp(self, index: int, batch: Any, V: torch.Tensor) -> torch.Tensor:
        """Central differences ``D(h) = (g(theta + h u) - g(theta - h u)) / 2h`` along each column's ``u``.

        With Richardson extrapolation ``(4 D(h) - D(2h)) / 3``, four gradients a column. The
        shards are written in place (``theta + t u`` in one pass from a saved copy, no
        perturbed tensor allocated); each gradient's coefficient (``||v|| / 2h`` and the
        extrapolation's weights) scales the loss, so the gradient shards are added into the
        output column as they come (no rescaling pass); the shards and their ``.grad`` are
        restored exactly at the end.
        """
        self._check_unchanged()
        scale = self._scale_of(batch)
        h = self.step_size(V.dtype)
        # (step, coefficient of the gradient there)
        stencil = ([(h, 4 / (6 * h)), (-h, -4 / (6 * h)), (2 * h, -1 / (12 * h)), (-2 * h, 1 / (12 * h))]
                   if self.richardson else [(h, 1 / (2 * h)), (-h, -1 / (2 * h))])
        norms = self.ops.column_norms(V)
        out = torch.zeros_like(V)
        with self._grads_kept(), self._stepping() as step:
            for j in range(V.shape[1]):
                if norms[j] == 0.0:
                    continue
                direction = self._direction(V[:, j])
                for at, coefficient in stencil:
                    step(direction, at / float(norms[j]))
                    weight = scale * float(norms[j]) * coefficient  # the 1/2h factor rides in the loss
                    self._backward_into(out[:, j], lambda: self._loss(batch) * weight, 1.0)
        return out

    def curvature_primitives(self) -> Any:
        """The GGN and Fisher products of this model (:mod:`specops.backends.torch.sharded_curvature`)."""
        from .sharded_curvature import PRIMITIVES

        return PRIMITIVES

    def subset(self, names: list[str]) -> ModelAdapter:
        """The adapter of the named parameters: vectors sharded over their rows only."""
        return FSDPAdapter(self.model, self.loss_fn, self.comm, self.weights, self.loss_form, wrt=list(names),
                           richardson=self.richardson, split=self.split)

    def as_params(self, v: torch.Tensor) -> dict[str, Any]:
        """``v`` (this rank's rows, (n_local,) or (n_local, k)) as DTensors with the parameters' placements.

        A block's tensors have a leading axis of length k (each ``Shard(d)`` becomes
        ``Shard(d + 1)``). With tensor parallelism a plain parameter's entries are a plain
        tensor, the same on every rank (collective: every rank calls this together).
        """
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        columns = [self._direction(v)] if v.dim() == 1 else [self._direction(v[:, j]) for j in range(v.shape[1])]
        out = {}
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            piece = columns[0][i] if v.dim() == 1 else torch.stack([c[i] for c in columns])
            if not hasattr(p, "device_mesh"):
                out[name] = piece
            elif v.dim() == 1:
                out[name] = DTensor.from_local(piece, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            else:
                shape = (v.shape[1], *p.shape)  # PyTorch takes a global shape only with its stride
                placements = [_StridedShard(q.dim + 1, split_factor=q.split_factor) if isinstance(q, _StridedShard)
                              else Shard(q.dim + 1) if isinstance(q, Shard) else q for q in p.placements]
                out[name] = DTensor.from_local(piece, p.device_mesh, placements, shape=shape,
                                               stride=torch.empty(shape, device="meta").stride())
        return out

    def unflatten(self, v: torch.Tensor) -> dict:
        return self.as_params(v)


class _ShardedModelOperator(ModelOperator):
    """A :class:`~specops.model.ModelOperator` whose batches the adapter weights itself.

    Its ``i``-th product is collective: the ``i``-th batches of every rank (of the one
    shared batch, with tensor parallelism), weighted by their samples, are one batch.
    """

    def _weights(self):
        return [1.0] * len(self.batch_sizes)

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    def step_check(self, V: torch.Tensor) -> dict[str, np.ndarray]:
        """The finite-difference step's error along the columns of ``V`` (e.g. returned eigenvectors).

        The Rayleigh quotients ``q(t) = u^T D(t) u`` of the unit columns ``u`` at the steps
        ``h/2``, ``h`` and ``2h`` (three products a column). While the truncation error
        (``O(h^2)``) dominates, the differences ``q(h) - q(2h)`` and ``q(h/2) - q(h)`` are in the
        ratio 4 : 1, and ``(4 q(h/2) - q(h)) / 3`` is the quotient of the exact Hessian to
        ``O(h^4)``; the error of the operator's own quotient ``q(h)`` is then about
        ``4 (q(h) - q(h/2)) / 3``. A ratio far from 4 means rounding dominates (the step's error
        is below its noise, about ``|q(h/2) - q(h)|``) or the step is outside the expansion's
        range (``richardson=True`` on a float32 transformer).

        Args:
            V: (n_local, k) this rank's rows of the vectors (normalized here).

        Returns:
            ``quotients`` (3, k) at ``h/2, h, 2h``; ``extrapolated`` (k,); ``error`` (k,) the
            estimated error of ``q(h)``; ``ratio`` (k,) ``(q(h) - q(2h)) / (q(h/2) - q(h))``;
            ``truncation`` (k,) whether the ratio is within 2.5-5.5 (the estimate holds).
        """
        V = V if V.dim() == 2 else V[:, None]
        U = V / torch.as_tensor(self.ops.column_norms(V), dtype=V.dtype, device=V.device)
        adapter: Any = getattr(self.adapter, "base", self.adapter)  # a GGN's products step its base
        quotients = []
        for factor in (0.5, 1.0, 2.0):
            adapter._step_factor = factor
            try:
                quotients.append(self.ops.column_dots(U, self.matmat(U)))
            finally:
                adapter._step_factor = 1.0
        q = np.asarray(quotients, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (q[1] - q[2]) / (q[0] - q[1])
        return dict(quotients=q, extrapolated=(4 * q[0] - q[1]) / 3, error=4 * (q[1] - q[0]) / 3, ratio=ratio,
                    truncation=(ratio > 2.5) & (ratio < 5.5))

    def _batch_forms(self, forms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The collective batches' forms (already reduced over the ranks), weights and sample counts."""
        sizes = np.asarray(self.comm.allreduce_host(np.asarray(self.batch_sizes, dtype=np.float64)), dtype=np.float64)
        weights = sizes / self.num_samples if self.reduction == "mean" else np.ones_like(sizes)
        return forms / weights[:, None, None], weights, sizes

    def restrict(self, index: Any) -> Any:
        """As :meth:`ModelOperator.restrict`; parameter names give an FSDP2 operator of those parameters."""
        if isinstance(index, str) or (isinstance(index, (list, tuple)) and index
                                      and all(isinstance(s, str) for s in index)):
            return _ShardedModelOperator(self.adapter.subset(self.layout.select(index)), self._data,
                                         reduction=self.reduction, comm=self.comm, check_deterministic=False,
                                         _checked=True)
        return super().restrict(index)


def hessian(model: nn.Module, loss_fn: Any, data: Any, *, reduction: str = "mean", comm: Any = None,
            check_deterministic: bool = True, loss_form: str = "auto", **options: Any) -> ModelOperator:
    """The Hessian of an FSDP2 model's loss over every rank's data, with sharded vectors.

    Called by :func:`specops.backends.torch.hessian` for a model with DTensor parameters
    (see the module docstring).

    Args:
        model: a model wrapped with ``fully_shard`` on a 1-D ``DeviceMesh`` or a 2-D
            ``(replicate, shard)`` one (HSDP), split by ``parallelize_module`` on a 1-D mesh,
            or both over the axes of a 2-D ``(dp, tp)`` mesh.
        loss_fn: ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)``.
        data: this rank's batches (a batch ``(inputs, targets)`` or a list of them); every
            rank passes the same number of batches (with tensor parallelism, the same batches
            as the other ranks along its axis).
        reduction: ``"mean"`` (weighted by samples over all ranks) or ``"sum"``.
        comm: ``None`` (the model's mesh) or a communicator over the same ranks.
        check_deterministic: as in :func:`specops.backends.torch.hessian`.
        loss_form: see :func:`specops.backends.torch.hessian`.
        **options: options of the unsharded backend: ``wrt`` selects parameters as there (the
            vectors are sharded over their rows only; a product still costs two gradients of
            the whole model); those that do not apply here raise.

    Returns:
        A :class:`specops.ModelOperator` whose vectors are this rank's shards.

    Raises:
        TypeError: a model wrapped with the older ``FullyShardedDataParallel``.
        ValueError: a partly sharded model, a mixed-precision policy, placements other than
            FSDP2's, tensor parallelism's on a 1-D mesh or both's on a 2-D mesh, a
            communicator of other ranks,
            unequal numbers of batches (with tensor parallelism: different batches, or
            replicated parameters that differ), options that do not apply.
    """
    wrt = options.pop("wrt", None)
    richardson = bool(options.pop("richardson", False))
    engine = options.pop("engine", None) or "auto"
    if options.pop("progress", False):
        raise ValueError("progress= (a bar of the batches each product evaluates) does not apply to an FSDP2 model: "
                         "pass progress= to the algorithm instead, e.g. so.eigsh(H, k=5, progress=True)")
    used = {k for k, v in options.items() if v not in (None, "auto", False, True, "error", "finite_difference")}
    if used:
        raise ValueError(f"{', '.join(sorted(used))} do not apply to an FSDP2 model: its products are finite "
                         "differences of FSDP2's gradients; leave them out")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    kind = _check_model(model, named)
    if engine not in ("auto", "finite_difference"):
        raise ValueError(f"engine={engine!r} does not apply to " + (
            "a tensor-parallel model: double backward through its DTensors misses the second derivative through "
            "the collectives of a parallel layer's input (measured 36% wrong on a tensor-parallel Llama), so its "
            "products are finite differences of its gradients (engine='auto' or 'finite_difference')"
            if kind == "tp" else "an FSDP2 model: FSDP2 offers no exact second derivative (its reduce-scatter is "
            "outside autograd), so its products are finite differences of its gradients (engine='auto' or "
            "'finite_difference')"))
    mesh = max((p.device_mesh for _, p in named if hasattr(p, "device_mesh")), key=lambda m: m.ndim)
    group = _mesh_group(mesh)
    if comm is None:
        comm = TorchComm(group)
    comm = as_comm(comm)
    ranks = torch.distributed.get_process_group_ranks(group)
    if comm.size != len(ranks) or sorted(comm.allgather(torch.distributed.get_rank())) != sorted(ranks):
        raise ValueError(f"comm= holds other ranks ({comm!r}) than the model's DeviceMesh {ranks}; pass comm=None "
                         "(the mesh's group) or a communicator over the mesh's ranks")
    batches = [data] if isinstance(data, (tuple, dict)) else list(data)
    sizes = [int((b[0] if isinstance(b, (tuple, list)) else next(iter(b.values()))).shape[0]) for b in batches]
    split = _Split(kind, named, comm, model)
    if split.tp_comm is not None:
        split.tp_comm.agree((sizes, _fingerprint(batches)), "the batches (sizes and sums)",
                            "with tensor parallelism every rank computes on the same batches: pass every rank "
                            "the same data" + (" (the same along the mesh's tensor-parallel axis)"
                                               if kind == "fsdp_tp" else ""))
    if kind != "tp":
        comm.agree(len(batches), "the number of batches",
                   "with FSDP2 every backward is collective: give every rank the same number of batches (their "
                   "sizes may differ)")
    total = int(split.data_comm.allreduce_host(int(sum(sizes))))

    def weight(size: int) -> float:
        return size / total if reduction == "mean" else 1.0

    adapter = FSDPAdapter(model, loss_fn, comm, weight, loss_form=loss_form, wrt=wrt, richardson=richardson,
                          split=split)
    if batches:
        adapter.check_precision(batches[0])
    return _ShardedModelOperator(adapter, batches if len(batches) > 1 else batches[0], reduction=reduction,
                                 comm=_ProductsReduced(comm, split.data_comm),
                                 check_deterministic=check_deterministic)


def _fingerprint(batches: list) -> list[float]:
    """A sum of every tensor of every batch (NaN as 0), to tell whether ranks hold the same data."""
    sums = []
    for batch in batches:
        tensors = batch.values() if isinstance(batch, dict) else batch
        sums += [float(torch.nan_to_num(t.detach().double()).sum()) for t in tensors if isinstance(t, torch.Tensor)]
    return sums


__all__ = ["FSDPAdapter", "hessian", "is_sharded"]
