"""The multi-host JAX transport: :class:`JaxComm` over the processes of a ``jax.distributed`` job."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

import numpy as np

from specops.distributed.faults import _abort_wanted, _install_exception_hook
from specops.distributed.protocol import Comm

if TYPE_CHECKING:
    from specops.ops import Array, VectorOps


class JaxComm(Comm):
    """A communicator over the processes of a multi-host JAX job (``jax.distributed``).

    After ``jax.distributed.initialize()`` on every process (each host holding its own
    shard of the data, split over its own devices with ``hessian(..., devices="local")``),
    a JAX product block is summed *on the devices* by one compiled program over a mesh of
    one device per process (XLA's all-reduce: NCCL between GPUs, gloo between CPUs); host
    arrays and scalars and picklable objects go through
    ``jax.experimental.multihost_utils``. Every process must construct it, in the same order.

    Args:
        abort_on_exception: as for :class:`TorchComm`: an uncaught exception prints its
            rank and ends the process at once (``SPECOPS_JAX_ABORT=0`` keeps Python's handler);
            the others fail in their next collective when the connection closes, or when
            the coordination service misses the process's heartbeats.

    Raises:
        RuntimeError: ``jax.distributed.initialize()`` has not been called.
    """

    def __init__(self, *, abort_on_exception: bool = True) -> None:
        import jax
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if jax._src.distributed.global_state.client is None:
            raise RuntimeError(
                "jax.distributed is not initialized: call jax.distributed.initialize(coordinator_address, "
                "num_processes, process_id) on every process first (on Slurm and Cloud TPU, "
                "jax.distributed.initialize() finds them itself), then build JaxComm()"
            )
        self.jax, self.hosts = jax, multihost_utils
        self.rank, self.size = jax.process_index(), jax.process_count()
        heads: dict[int, Any] = {}
        for d in jax.devices():  # one device per process: the lowest id, where its vectors live
            if d.process_index not in heads or d.id < heads[d.process_index].id:
                heads[d.process_index] = d
        self.device = heads[self.rank]
        mesh = Mesh(np.array([heads[p] for p in range(self.size)]), ("process",))
        self._stacked = NamedSharding(mesh, PartitionSpec("process"))
        self._sum = jax.jit(lambda a: a.sum(axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
        self.cuda_aware = self.device.platform == "gpu"
        hosts = self.allgather(socket.gethostname())
        self.local_rank = hosts[: self.rank].count(hosts[self.rank])
        self.local_size = hosts.count(hosts[self.rank])
        if abort_on_exception and self.size > 1 and _abort_wanted("SPECOPS_JAX_ABORT"):
            _install_exception_hook(lambda: (self.rank, self.size), "ending this process so that no rank waits for it",
                                    lambda: os._exit(1))

    def _sum_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.hosts.process_allgather(x)).sum(axis=0).astype(x.dtype, copy=False)

    def transport(self, X: Array) -> str:
        """How :meth:`allreduce` moves ``X`` (see :meth:`Comm.transport`)."""
        if self.size == 1:
            return "none"
        return "device" if isinstance(X, self.jax.Array) else "host"

    def allreduce(self, X: Array, ops: VectorOps) -> Array:
        """Sum of ``X`` over all ranks, on its device (see :meth:`Comm.allreduce`)."""
        way = self.transport(X)
        if way == "none":
            return X
        if way == "host":
            return ops.asarray(self.allreduce_host(np.ascontiguousarray(ops.to_numpy(X), dtype=ops.dtype)))
        mine = self.jax.device_put(X[None], self.device)
        stacked = self.jax.make_array_from_single_device_arrays((self.size, *X.shape), self._stacked, [mine])
        return self.jax.device_put(self._sum(stacked).addressable_data(0), next(iter(X.devices())))

    def allgather(self, obj: Any) -> list:
        """A list of one picklable object from every rank, in rank order."""
        if self.size == 1:
            return [obj]
        import pickle

        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        lengths = np.asarray(self.hosts.process_allgather(np.array([data.size], dtype=np.int64))).ravel()
        padded = np.zeros(int(lengths.max()), dtype=np.uint8)
        padded[: data.size] = data
        rows = np.asarray(self.hosts.process_allgather(padded))
        return [pickle.loads(rows[r, : lengths[r]].tobytes()) for r in range(self.size)]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``obj`` from ``root`` on every rank."""
        return self.allgather(obj if self.rank == root else None)[root]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.size > 1:
            self.hosts.sync_global_devices("specops barrier")

    def __repr__(self):
        return f"JaxComm(rank={self.rank}, size={self.size}, device={self.device})"
