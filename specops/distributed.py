"""Data-parallel distribution: a small communicator protocol and its MPI implementation.

Each process (rank) holds a shard of the data and the whole model. A model-backed
operator's product is the sample-weighted sum of the ranks' local products: one
sum-allreduce of the (n, k) block per ``matmat``. Algorithms run redundantly on every
rank from the same seed, so every rank holds the same result.
"""

from __future__ import annotations

import numpy as np


class Comm:
    """The single-process communicator; also the protocol that :class:`MPIComm` follows.

    Attributes:
        rank: this process's index, 0 <= rank < size.
        size: the number of processes.
    """

    rank = 0
    size = 1

    def allreduce_host(self, x):
        """Sum of a host NumPy array (or scalar) over all ranks."""
        return x

    def allreduce(self, X, ops):
        """Sum of a backend array over all ranks (returned on the array's device)."""
        return X

    def allgather(self, obj) -> list:
        """A list of one picklable object from every rank."""
        return [obj]

    def bcast(self, obj, root: int = 0):
        """``obj`` from ``root`` on every rank."""
        return obj

    def barrier(self):
        """Wait for every rank."""

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class MPIComm(Comm):
    """A communicator over mpi4py (any MPI: MPICH, Open MPI, a cluster's own).

    Args:
        comm: an ``mpi4py.MPI.Comm``; default ``MPI.COMM_WORLD``.
    """

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MPIComm needs mpi4py: pip install 'specops[mpi]' (mpi4py plus an MPI such as "
                "the mpich wheel, or your cluster's MPI)"
            ) from e
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allreduce_host(self, x):
        if np.isscalar(x) or np.ndim(x) == 0:
            return self.comm.allreduce(x, op=self.MPI.SUM)
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=self.MPI.SUM)
        return out

    def allreduce(self, X, ops):
        if self.size == 1:
            return X
        host = np.ascontiguousarray(ops.to_numpy(X).astype(ops.dtype, copy=False))
        out = np.empty_like(host)
        self.comm.Allreduce(host, out, op=self.MPI.SUM)
        return ops.asarray(out)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()


def as_comm(comm) -> Comm:
    """``None`` -> the single-process communicator; an mpi4py communicator -> :class:`MPIComm`."""
    if comm is None:
        return Comm()
    if isinstance(comm, Comm):
        return comm
    if type(comm).__module__.startswith("mpi4py"):
        return MPIComm(comm)
    raise TypeError(f"comm must be None, a specops Comm or an mpi4py communicator, got {type(comm).__name__}")


def shard(items, comm=None):
    """The contiguous part of ``items`` (a sequence) that this rank owns.

    Shards differ in size by at most one item; every item belongs to exactly one rank.
    """
    comm = as_comm(comm)
    n = len(items)
    lo = comm.rank * n // comm.size
    hi = (comm.rank + 1) * n // comm.size
    return items[lo:hi]
