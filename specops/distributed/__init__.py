"""Data-parallel distribution: a small communicator protocol and its transports.

Each process (rank) holds a shard of the data and the whole model. A model-backed
operator's product is the sample-weighted sum of the ranks' local products: one
sum-allreduce of the (n, k) block per ``matmat``. Algorithms run redundantly on every
rank from the same seed, so every rank holds the same result.

Pieces:

- :class:`Comm`: the single-process default, and the protocol every communicator follows
  (``rank``, ``size``, ``allreduce`` of backend arrays, ``allreduce_host`` of host arrays
  and scalars, ``allgather``, ``bcast``, ``barrier``, ``agree``).
- :class:`MPIComm`: the same over mpi4py, for any MPI (MPICH, Open MPI, a cluster's own).
  GPU arrays go to a CUDA-aware MPI directly, otherwise through host memory;
  :attr:`MPIComm.cuda_aware` and :meth:`MPIComm.transport` say which. Which arrays can go
  directly, a backend says with :func:`register_device_buffers` (PyTorch's CUDA tensors).
- :class:`TorchComm`: the same over a ``torch.distributed`` process group (``torchrun``;
  NCCL reduces CUDA tensors on the device, gloo CPU tensors);
  :meth:`TorchComm.from_environment` starts the group from the launcher's variables.
- :class:`JaxComm`: the same across the processes of a multi-host JAX job
  (``jax.distributed``), JAX blocks summed on the devices.
- :func:`as_comm` and :func:`world`: a communicator from ``None``, ``"torch"``, ``"mpi"``,
  ``"auto"`` (what launched this process) or an mpi4py communicator / torch process group.
- :func:`shard`: this rank's contiguous part of a sequence, dataset or ``DataLoader``.
- :func:`local_rank` and :func:`gpu_index`: which GPU of its node a rank takes.
- :func:`abort_on_exception`: an uncaught exception on any rank ends all ranks
  (``MPI_Abort``; under torchrun, the process exits and the launcher ends the others)
  instead of leaving the others waiting in a collective forever.

See ``docs/distributed.md`` for launching, GPU binding and the cost model.

Modules, one idea each: ``protocol`` (:class:`Comm`), ``mpi``, ``torch`` and ``jax`` (the
transports), ``launch`` (launcher detection, :func:`as_comm`, :func:`world`, GPU binding),
``data`` (:func:`shard`), ``faults`` (the exception hooks). Every name is imported from
``specops.distributed`` itself.
"""

from __future__ import annotations

from specops.distributed.data import shard, shard_range
from specops.distributed.faults import abort_on_exception
from specops.distributed.jax import JaxComm
from specops.distributed.launch import (
    COMM_NAMES,
    LOCAL_RANK_VARIABLES,
    as_comm,
    gpu_index,
    launcher,
    local_rank,
    world,
)
from specops.distributed.mpi import DeviceBuffers, MPIComm, mpi_cuda_aware, register_device_buffers
from specops.distributed.protocol import Comm
from specops.distributed.torch import (
    TORCH_BACKEND_DEVICES,
    TORCH_TIMEOUT_SECONDS,
    TorchComm,
)
from specops.distributed.torch import (  # private; tests/distributed/test_torch_distributed.py imports it
    _torch_launch_environment as _torch_launch_environment,
)

# In the order of the API page (docs/api/distributed.md): the communicators, choosing one, the data, the GPU.
__all__ = [
    "Comm",
    "MPIComm",
    "TorchComm",
    "JaxComm",
    "mpi_cuda_aware",
    "register_device_buffers",
    "DeviceBuffers",
    "launcher",
    "as_comm",
    "world",
    "abort_on_exception",
    "shard_range",
    "shard",
    "local_rank",
    "gpu_index",
    "COMM_NAMES",
    "LOCAL_RANK_VARIABLES",
    "TORCH_BACKEND_DEVICES",
    "TORCH_TIMEOUT_SECONDS",
]
