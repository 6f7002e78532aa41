"""The MPI transport: :class:`MPIComm` over mpi4py, and whether the MPI takes GPU buffers.

GPU arrays go to a CUDA-aware MPI directly, otherwise through host memory. This module
knows no framework: a backend whose arrays can be handed to MPI on the device says so with
:func:`register_device_buffers` (the PyTorch backend does, for CUDA tensors, when
``specops.backends.torch`` is imported). Arrays of no registered kind (NumPy, JAX, whose
GPU arrays are immutable and so offer no receive buffer, TensorFlow) are staged through
the host.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from specops.distributed.faults import _abort_wanted, _install_abort_hook
from specops.distributed.protocol import Comm

if TYPE_CHECKING:
    from specops.ops import Array, VectorOps


class DeviceBuffers(NamedTuple):
    """How a framework's device arrays are handed to a CUDA-aware MPI (see :func:`register_device_buffers`).

    Attributes:
        accepts: ``accepts(X)``: whether ``X`` is a device array that MPI can read, and a new
            one of which it can fill.
        buffers: ``buffers(X) -> (send, recv)``: ``X``'s values in a contiguous array and a
            new array of the same shape, dtype and device for MPI to fill, once every pending
            device operation on ``X`` is complete (MPI knows nothing of streams).
    """

    accepts: Callable[[Any], bool]
    buffers: Callable[[Any], tuple[Any, Any]]


#: The device-array kinds that backends registered, consulted in order.
_DEVICE_BUFFERS: list[DeviceBuffers] = []


def register_device_buffers(accepts: Callable[[Any], bool], buffers: Callable[[Any], tuple[Any, Any]]) -> None:
    """Let :class:`MPIComm` hand a framework's device arrays to a CUDA-aware MPI directly.

    Called by a backend when it is imported; registering the same pair twice is harmless.
    An array that no registered ``accepts`` takes is staged through host memory.

    Args:
        accepts: ``accepts(X)``: whether ``X`` is a device array that MPI can read, and a new
            one of which it can fill.
        buffers: ``buffers(X) -> (send, recv)``: ``X``'s values contiguous and a new array of
            its shape to receive the sum, after every pending device operation on ``X``.
    """
    entry = DeviceBuffers(accepts, buffers)
    if entry not in _DEVICE_BUFFERS:
        _DEVICE_BUFFERS.append(entry)


def _device_buffers(X: Any) -> DeviceBuffers | None:
    """The registered kind that takes ``X`` to MPI on its device, or ``None`` (host staging)."""
    return next((entry for entry in _DEVICE_BUFFERS if entry.accepts(X)), None)


class MPIComm(Comm):
    """A communicator over mpi4py (any MPI: MPICH, Open MPI, a cluster's own).

    Constructing it is collective (it splits the communicator by node to find
    :attr:`local_rank`): every rank must construct it, in the same order.

    Args:
        comm: an ``mpi4py.MPI.Comm``; default ``MPI.COMM_WORLD``.
        abort_on_exception: with more than one rank, install
            :func:`abort_on_exception` so that an uncaught exception on any rank ends
            all ranks. Pass ``False`` (or set ``SPECOPS_MPI_ABORT=0``) to keep Python's
            own handler, e.g. when the program catches errors and coordinates itself.
        cuda_aware: hand GPU arrays (of the kinds registered with :func:`register_device_buffers`)
            to MPI directly (``True``) or stage them through host memory (``False``); default
            :func:`mpi_cuda_aware`, what the MPI reports.

    Attributes:
        cuda_aware: whether GPU arrays go to MPI directly; :meth:`transport` tells per array.
    """

    def __init__(self, comm: Any = None, *, abort_on_exception: bool = True,
                 cuda_aware: bool | None = None) -> None:
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
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.cuda_aware = mpi_cuda_aware() if cuda_aware is None else bool(cuda_aware)
        if abort_on_exception and self.size > 1 and _abort_wanted("SPECOPS_MPI_ABORT"):
            _install_abort_hook(self.comm)

    def _sum_host(self, x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=self.MPI.SUM)
        return out

    def transport(self, X: Array) -> str:
        """How :meth:`allreduce` moves ``X`` (see :meth:`Comm.transport`)."""
        if self.size == 1:
            return "none"
        return "device" if self.cuda_aware and _device_buffers(X) is not None else "host"

    def allreduce(self, X: Array, ops: VectorOps) -> Array:
        """Sum of ``X`` over all ranks, on its device (see :meth:`Comm.allreduce`)."""
        way = self.transport(X)
        if way == "none":
            return X
        if way == "device":
            entry = _device_buffers(X)
            assert entry is not None  # transport() found it
            send, recv = entry.buffers(X)
            self.comm.Allreduce(send, recv, op=self.MPI.SUM)
            return recv
        host = np.ascontiguousarray(ops.to_numpy(X), dtype=ops.dtype)
        out = np.empty_like(host)
        self.comm.Allreduce(host, out, op=self.MPI.SUM)
        return ops.asarray(out)

    def allgather(self, obj: Any) -> list:
        """A list of one picklable object from every rank, in rank order."""
        return self.comm.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``obj`` from ``root`` on every rank."""
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        """Wait for every rank."""
        self.comm.Barrier()

    def __repr__(self):
        return (f"MPIComm(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"cuda_aware={self.cuda_aware})")


def mpi_cuda_aware() -> bool:
    """Whether the MPI in use takes CUDA device buffers, as it reports itself.

    In order: the environment variable ``SPECOPS_MPI_CUDA_AWARE`` (``1``/``0``) if set;
    ``MPIX_Query_cuda_support()`` (Open MPI, and MPICH builds that provide it);
    ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA)`` (MPICH >= 4); Cray MPICH's
    ``MPICH_GPU_SUPPORT_ENABLED=1``; MVAPICH2's ``MV2_USE_CUDA=1``. Otherwise ``False``,
    the safe answer: host staging works with every MPI.
    """
    forced = os.environ.get("SPECOPS_MPI_CUDA_AWARE")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes", "on")
    try:
        import ctypes

        from mpi4py import MPI

        lib = ctypes.CDLL(MPI.__file__)  # symbols of the MPI library it links are found through it
        query = getattr(lib, "MPIX_Query_cuda_support", None)
        if query is not None and query() == 1:
            return True
        gpu_query = getattr(lib, "MPIX_GPU_query_support", None)
        if gpu_query is not None:
            supported = ctypes.c_int(0)
            if gpu_query(ctypes.c_int(0), ctypes.byref(supported)) == 0 and supported.value:  # 0: CUDA
                return True
    except (ImportError, OSError):
        pass
    return os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1" or os.environ.get("MV2_USE_CUDA") == "1"
