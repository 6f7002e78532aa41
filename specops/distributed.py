"""Data-parallel distribution: a small communicator protocol and its MPI implementation.

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
  :attr:`MPIComm.cuda_aware` and :meth:`MPIComm.transport` say which.
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
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from specops.ops import Array, VectorOps

T = TypeVar("T")

#: Environment variables that launchers set to a process's rank within its node, in the
#: order they are consulted (Open MPI, MPICH/Hydra and Intel MPI, MVAPICH2, Cray PALS, Slurm).
LOCAL_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PALS_LOCAL_RANKID",
    "SLURM_LOCALID",
    "LOCAL_RANK",
)


class Comm:
    """The single-process communicator; also the protocol that :class:`MPIComm` follows.

    Attributes:
        rank: this process's index, ``0 <= rank < size``.
        size: the number of processes.
        local_rank: this process's index among the processes on its node.
        local_size: the number of processes on this node.
        cuda_aware: whether GPU arrays are handed to the communication library directly.
    """

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    cuda_aware = False

    def allreduce_host(self, x: Any) -> Any:
        """Sum of a host NumPy array or Python/NumPy scalar over all ranks (same type back)."""
        if self.size == 1:
            return x
        if np.ndim(x) == 0:
            total = self._sum_host(np.asarray(x).reshape(1))[0]
            return type(x)(total) if isinstance(x, (int, float)) else total
        return self._sum_host(np.ascontiguousarray(x))

    def _sum_host(self, x: np.ndarray) -> np.ndarray:
        """The sum over ranks of a contiguous host array of at least one dimension.

        Each communicator implements it for :meth:`allreduce_host`.
        """
        return x

    def allreduce(self, X: Array, ops: VectorOps) -> Array:
        """Sum of a backend array over all ranks, returned on the array's device.

        Args:
            X: a native array of ``ops`` (any shape).
            ops: the :class:`~specops.ops.VectorOps` of ``X``.

        Returns:
            The sum, a native array of ``ops`` of the shape of ``X``.
        """
        return X

    def transport(self, X: Array) -> str:
        """How :meth:`allreduce` moves ``X``.

        Returns:
            ``"none"`` (one rank), ``"device"`` (the GPU buffer goes to the communication
            library directly) or ``"host"`` (staged through host memory).
        """
        return "none"

    def allgather(self, obj: Any) -> list:
        """A list of one picklable object from every rank, in rank order."""
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``obj`` from ``root`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait for every rank."""

    def agree(self, value: T, what: str, fix: str = "") -> T:
        """Check that every rank passes an equal ``value``; raise on every rank otherwise.

        Collective: every rank must call it. As every rank sees all values, the error is
        raised everywhere and no rank is left waiting in a later collective.

        Args:
            value: a picklable value comparable with ``==``.
            what: what the value is, for the message (``"the number of parameters"``).
            fix: what to change, appended to the message.

        Returns:
            ``value``.

        Raises:
            ValueError: ranks passed different values (all of them are listed).
        """
        values = self.allgather(value)
        if any(v != values[0] for v in values[1:]):
            listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"ranks disagree on {what} ({listed}){'; ' + fix if fix else ''}")
        return value

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


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
        cuda_aware: hand GPU arrays to MPI directly (``True``) or stage them through host
            memory (``False``); default :func:`mpi_cuda_aware`, what the MPI reports.

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
        return "device" if self.cuda_aware and _writable_cuda_array(X) else "host"

    def allreduce(self, X: Array, ops: VectorOps) -> Array:
        """Sum of ``X`` over all ranks, on its device (see :meth:`Comm.allreduce`)."""
        way = self.transport(X)
        if way == "none":
            return X
        if way == "device":
            send = X.contiguous()
            recv = send.new_empty(send.shape)
            # MPI knows nothing of CUDA streams: the product must be complete before it reads.
            sys.modules["torch"].cuda.current_stream(send.device).synchronize()
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


def _writable_cuda_array(X: Any) -> bool:
    """Whether ``X`` is a CUDA tensor that MPI can read and a new one of which it can fill.

    PyTorch CUDA tensors qualify. JAX arrays on a GPU expose ``__cuda_array_interface__``
    too, but are immutable, so there is no receive buffer to give MPI: they go through
    the host (see ``docs/distributed.md``).
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(X, torch.Tensor) and X.is_cuda


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


#: The device types each ``torch.distributed`` backend reduces. gloo is taken as CPU-only:
#: its CUDA paths copy through the host and cover few operations, NCCL is the GPU backend.
TORCH_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda"),
                         "xccl": ("xpu",), "hccl": ("npu",)}

#: Seconds a ``torch.distributed`` collective waits for the other ranks before it fails, for
#: process groups that :meth:`TorchComm.from_environment` starts (``SPECOPS_TORCH_TIMEOUT``).
TORCH_TIMEOUT_SECONDS = 600.0


class TorchComm(Comm):
    """A communicator over a ``torch.distributed`` process group (``torchrun``, NCCL, gloo).

    The same protocol as :class:`MPIComm`. With NCCL, a CUDA tensor (a PyTorch model's
    product block) is summed on the device, on the current stream; CPU tensors go to gloo
    as they are; other arrays (NumPy, JAX, TensorFlow) and host scalars are staged through
    a tensor on the group's device. Objects (:meth:`allgather`, :meth:`bcast`) go through
    ``torch.distributed``'s object collectives.

    Constructing it is collective (it gathers the ranks' host names to find
    :attr:`local_rank`): every rank of the group must construct it, in the same order.

    Args:
        group: a ``torch.distributed`` process group; default the default (world) group,
            which must be initialized (``torch.distributed.init_process_group``, or
            :meth:`from_environment` / ``as_comm("torch")`` under torchrun).
        abort_on_exception: with more than one rank, an uncaught exception prints its rank
            and traceback and ends this process at once (``os._exit(1)``): torchrun then
            ends the other ranks, and a rank waiting for it in a gloo collective fails at
            once (the connection closes) instead of waiting. ``False`` (or
            ``SPECOPS_TORCH_ABORT=0``) keeps Python's own handler.

    Attributes:
        group: the process group (``None``: the default one).
        backend: its backend, e.g. ``"nccl"``, ``"gloo"`` or ``"cpu:gloo,cuda:nccl"``.
        device: the ``torch.device`` that staged arrays and host scalars are reduced on
            (the current CUDA device for NCCL-only groups, else the CPU).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized (the message says how).
        ValueError: the default group's size differs from the launcher's ``WORLD_SIZE``.
    """

    def __init__(self, group: Any = None, *, abort_on_exception: bool = True) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("this PyTorch build has no torch.distributed; install a standard PyTorch wheel")
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: launch with torchrun (torchrun --nproc_per_node N "
                "script.py) and use specops.distributed.as_comm('torch') or TorchComm.from_environment(), "
                "which start the process group from torchrun's variables; or call "
                "torch.distributed.init_process_group(backend='nccl' or 'gloo') yourself before TorchComm()"
            )
        self.torch, self.dist, self.group = torch, dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        launched = os.environ.get("WORLD_SIZE", "").strip()
        if group is None and launched.isdigit() and int(launched) != self.size:
            raise ValueError(
                f"the default process group has {self.size} process(es) but the launcher started "
                f"WORLD_SIZE={launched}: each process would compute on its own shard alone. Initialize "
                "the group with init_method='env://' (the default under torchrun) so that it spans every "
                "process, or pass the intended subgroup as TorchComm(group)"
            )
        self._devices = self._backend_devices(self.backend)
        if self._devices is not None and "cpu" not in self._devices and "cuda" in self._devices:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.cuda_aware = self._devices is None or "cuda" in self._devices
        hosts = self.allgather(socket.gethostname()) if self.size > 1 else [socket.gethostname()]
        self.local_rank = hosts[: self.rank].count(hosts[self.rank])
        self.local_size = hosts.count(hosts[self.rank])
        if abort_on_exception and self.size > 1 and _abort_wanted("SPECOPS_TORCH_ABORT"):
            _install_exception_hook(lambda: (self.rank, self.size),
                                    "ending this process so that no rank waits for it (torchrun ends the others)",
                                    lambda: os._exit(1))

    @classmethod
    def from_environment(cls, backend: str | None = None, *, timeout: float | None = None,
                         abort_on_exception: bool = True) -> TorchComm:
        """Start the default process group from the launcher's variables and bind the GPU.

        Under ``torchrun`` the variables are ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
        ``MASTER_ADDR`` and ``MASTER_PORT``. Under Slurm's ``srun`` alone (one task per
        GPU), ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` stand in for the
        first three; ``MASTER_ADDR`` must then be exported (the first node of the job) and
        ``MASTER_PORT`` defaults to 29500. With CUDA, the process takes GPU
        ``LOCAL_RANK`` modulo the visible GPUs (``torch.cuda.set_device``) before the
        group starts. A group that is already initialized is used as it is.

        Args:
            backend: ``"nccl"``, ``"gloo"``, ``"cpu:gloo,cuda:nccl"``, ...; default NCCL
                for CPU and CUDA tensors alike (``"cpu:gloo,cuda:nccl"``) where CUDA is
                available, else gloo.
            timeout: seconds a collective waits for the other ranks before it fails: the
                last resort against a hang; default ``SPECOPS_TORCH_TIMEOUT`` or
                :data:`TORCH_TIMEOUT_SECONDS`.
            abort_on_exception: as for :class:`TorchComm`.

        Returns:
            The communicator over the default group.

        Raises:
            RuntimeError: the environment names no launch (no ``RANK``/``WORLD_SIZE``, nor
                Slurm's variables), or misses ``MASTER_ADDR``.
        """
        import datetime

        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            env = _torch_launch_environment()
            if torch.cuda.is_available():
                torch.cuda.set_device(gpu_index(torch.cuda.device_count(), None))
            if backend is None:
                backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
            seconds = float(os.environ.get("SPECOPS_TORCH_TIMEOUT", TORCH_TIMEOUT_SECONDS) if timeout is None
                            else timeout)
            # Under torchrun the agent hosts the rendezvous store (env://); a store hosted by rank 0
            # (tcp://) goes away when rank 0 exits, and a peer still holding it is aborted by C++.
            init = "env://" if "TORCHELASTIC_RUN_ID" in os.environ else f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
            _import_group_defaults()
            dist.init_process_group(backend=backend, init_method=init,
                                    rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                                    timeout=datetime.timedelta(seconds=seconds))
            atexit.register(_destroy_default_group)
        return cls(abort_on_exception=abort_on_exception)

    @staticmethod
    def _backend_devices(backend: str) -> tuple[str, ...] | None:
        """Device types the backend string reduces (``None``: unknown, let torch decide)."""
        if ":" in backend:
            return tuple(part.split(":")[0].strip() for part in backend.split(","))
        return TORCH_BACKEND_DEVICES.get(backend)

    def _check_device(self, tensor: Any) -> None:
        kind = tensor.device.type
        if self._devices is not None and kind not in self._devices:
            fix = ("initialize the process group with backend='nccl' or 'cpu:gloo,cuda:nccl' "
                   "(TorchComm.from_environment() does where CUDA is available), or keep the model on the CPU"
                   if kind != "cpu" else "initialize it with backend='cpu:gloo,cuda:nccl' or 'gloo'")
            raise ValueError(f"the process group's backend {self.backend!r} does not reduce {kind} tensors "
                             f"(it handles {', '.join(self._devices)}); {fix}")

    def _sum(self, tensor: Any) -> Any:
        """Sum ``tensor`` (owned, contiguous) over the ranks, in place."""
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group)
        return tensor

    def _sum_host(self, x: np.ndarray) -> np.ndarray:
        out = self._sum(self.torch.from_numpy(x.copy()).to(self.device))
        return out.cpu().numpy().astype(x.dtype, copy=False)

    def transport(self, X: Array) -> str:
        """How :meth:`allreduce` moves ``X`` (see :meth:`Comm.transport`)."""
        if self.size == 1:
            return "none"
        if isinstance(X, self.torch.Tensor) and X.device.type != "cpu":
            self._check_device(X)
            return "device"
        return "host"

    def allreduce(self, X: Array, ops: VectorOps) -> Array:
        """Sum of ``X`` over all ranks, on its device (see :meth:`Comm.allreduce`)."""
        way = self.transport(X)
        if way == "none":
            return X
        if isinstance(X, self.torch.Tensor):
            if way == "device" or "cpu" in (self._devices or ("cpu",)):
                return self._sum(X.detach().clone(memory_format=self.torch.contiguous_format))
            return self._sum(X.detach().to(self.device, copy=True)).to(X.device)
        host = np.ascontiguousarray(ops.to_numpy(X), dtype=ops.dtype)
        return ops.asarray(self._sum(self.torch.from_numpy(host).to(self.device)).cpu().numpy())

    def allgather(self, obj: Any) -> list:
        """A list of one picklable object from every rank, in rank order."""
        out = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``obj`` from ``root`` on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, group=self.group, group_src=root)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.size > 1:
            self._sum(self.torch.zeros(1, device=self.device))

    def __repr__(self):
        return (f"TorchComm(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"backend={self.backend!r}, device={self.device})")


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


def _import_group_defaults() -> None:
    """Import, before the default group starts, the torch modules that take it as a default argument.

    ``torch.distributed.nn.functional`` binds ``group=group.WORLD`` when it is imported. Imported
    after ``init_process_group`` (``torch.func`` imports it lazily, through ``torch._dynamo`` and
    FSDP), its functions keep the group alive after ``destroy_process_group``, so that its threads
    outlive the interpreter (see :func:`_destroy_default_group`); imported before, they hold ``None``.
    """
    try:
        import torch.distributed.nn  # noqa: F401
    except ImportError:  # pragma: no cover - a build without it has nothing that holds the group
        pass


def _destroy_default_group() -> None:
    """Destroy the default group at exit (it was started by :meth:`TorchComm.from_environment`).

    Freeing the group joins gloo's worker threads while the interpreter is still whole. A worker
    releases a collective's work after the caller has gone on; releasing the work's tensors takes
    the GIL. Once the interpreter is finalizing, Python ends a thread that asks for the GIL
    (``pthread_exit``), and that unwinding through C++'s ``noexcept`` destructors calls
    ``std::terminate``: *terminate called without an active exception*, now and then, at exit.
    The group is only freed if nothing else refers to it (see :func:`_import_group_defaults`).
    """
    import gc
    import weakref

    dist = sys.modules["torch.distributed"]
    if not dist.is_initialized():
        return
    try:  # every rank has read its last message before any rank closes its connections
        dist.barrier()
    except Exception:  # noqa: BLE001 - a peer already gone: destroy what is left
        pass
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    if group() is not None:  # held in a reference cycle: free it now, with its threads
        gc.collect()


def _torch_launch_environment() -> dict[str, str]:
    """``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` from torchrun's or Slurm's variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"]}
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"]}
    else:
        raise RuntimeError(
            "no torch.distributed launch found: RANK and WORLD_SIZE are not set. Start the script with "
            "torchrun --nproc_per_node N script.py (or srun torchrun ...; or srun alone, which sets "
            "SLURM_PROCID and SLURM_NTASKS), or call torch.distributed.init_process_group yourself"
        )
    if "MASTER_ADDR" not in env:
        raise RuntimeError(
            "MASTER_ADDR is not set: torchrun sets it; under srun alone export it as the job's first node, "
            "e.g. export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)"
        )
    out["MASTER_ADDR"] = env["MASTER_ADDR"]
    out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
    return out


def launcher() -> str | None:
    """What started this process: ``"torch"``, ``"mpi"`` or ``None``.

    ``"torch"``: torchrun, or ``torch.distributed`` already initialized; ``"mpi"``: an MPI
    launcher; ``None``: a single process. torchrun is recognised by ``TORCHELASTIC_RUN_ID``, or ``RANK``, ``WORLD_SIZE`` and
    ``MASTER_ADDR`` together, with ``WORLD_SIZE`` above one; an MPI launch by the size its
    launcher sets (``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``, ``PALS_SIZE``,
    ``SLURM_STEP_NUM_TASKS``) above one. torchrun is checked first, as ``srun torchrun``
    sets Slurm's variables too. Neither torch nor mpi4py is imported.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return "torch"
    env = os.environ
    torchrun = "TORCHELASTIC_RUN_ID" in env or all(v in env for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
    if torchrun and env.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        return "torch"
    sizes = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PALS_SIZE", "SLURM_STEP_NUM_TASKS")
    if any(env.get(name, "1").strip() not in ("", "0", "1") for name in sizes):
        return "mpi"
    return None


COMM_NAMES = ("auto", "torch", "mpi", "jax", "none")


def as_comm(comm: Any) -> Comm:
    """A communicator from what a user passes as ``comm=``.

    Args:
        comm: ``None`` or ``"none"`` (one process); ``"auto"`` (:func:`world`: what
            launched this process); ``"torch"`` (:meth:`TorchComm.from_environment`);
            ``"mpi"`` (:class:`MPIComm` over ``COMM_WORLD``); ``"jax"`` (:class:`JaxComm`, after
            ``jax.distributed.initialize()``); a specops :class:`Comm`; an
            mpi4py communicator; or a ``torch.distributed`` process group.

    Returns:
        The communicator (``comm`` itself if it is a specops :class:`Comm`).

    Raises:
        TypeError: ``comm`` is something else.
        ValueError: an unknown name.
    """
    if comm is None:
        return Comm()
    if isinstance(comm, Comm):
        return comm
    if isinstance(comm, str):
        name = comm.strip().lower()
        if name not in COMM_NAMES:
            raise ValueError(f"comm must be one of {COMM_NAMES}, got {comm!r}")
        return {"none": Comm, "auto": world, "torch": TorchComm.from_environment, "mpi": MPIComm,
                "jax": JaxComm}[name]()
    if type(comm).__module__.startswith("mpi4py"):
        return MPIComm(comm)
    if type(comm).__module__.startswith("torch"):
        return TorchComm(comm)
    raise TypeError(
        "comm must be None, 'auto', 'torch', 'mpi', a specops Comm, an mpi4py communicator or a torch process "
        f"group, got {type(comm).__name__}"
    )


def world() -> Comm:
    """The communicator of whatever launched this process (see :func:`launcher`).

    :class:`TorchComm` under torchrun (starting the process group if needed),
    ``MPIComm()`` over ``COMM_WORLD`` under an MPI launcher, else the single-process
    :class:`Comm`. Lets one script run as ``python script.py``, as
    ``torchrun --nproc_per_node 4 script.py`` and as ``mpiexec -n 4 python script.py``.
    """
    how = launcher()
    if how == "torch":
        return TorchComm.from_environment()
    if how == "mpi":
        return MPIComm()
    return Comm()


# --- faults ---------------------------------------------------------------------------
def abort_on_exception(comm: Any = None) -> None:
    """Make an uncaught exception on this rank end every rank of the job.

    Without this, a rank that dies of an exception leaves the others waiting in their
    next collective (an Allreduce in the middle of a product) until the job's time runs
    out; with it, the rank prints its rank and traceback to stderr and calls
    ``MPI_Abort``, which ends all ranks with a non-zero exit status. Installs
    ``sys.excepthook`` and ``threading.excepthook``; installing twice is harmless.

    :class:`MPIComm` installs it by default (``MPIComm(abort_on_exception=False)`` or
    ``SPECOPS_MPI_ABORT=0`` leave the hooks alone). It acts on uncaught exceptions only:
    code that catches an exception on one rank must itself keep the ranks in step.
    ``python -m mpi4py script.py`` gives the same protection for a whole script.

    Args:
        comm: the mpi4py communicator to abort (default ``COMM_WORLD``).
    """
    _install_abort_hook(comm)


def _abort_wanted(variable: str) -> bool:
    """Whether the environment leaves the abort hook on (``SPECOPS_ABORT`` or ``variable`` = 0: off)."""
    return all(os.environ.get(name, "1").strip() != "0" for name in ("SPECOPS_ABORT", variable))


def _install_abort_hook(comm: Any = None) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    _install_exception_hook(lambda: (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()),
                            "aborting all ranks (MPI_Abort)", lambda: comm.Abort(1))


def _install_exception_hook(where: Callable[[], tuple[int, int]], how: str, end: Callable[[], object]) -> None:
    """On an uncaught exception, report it and call ``end()``.

    The report, to stderr: the rank (``where() -> (rank, size)``), ``how`` the job ends and
    the traceback. Installing twice is harmless.
    """
    import threading

    if getattr(sys.excepthook, "_specops_abort", False):
        return

    def report_and_end(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None,
                       thread: str = "") -> None:
        try:
            rank, size = where()
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            sys.stderr.write(f"\nspecops: uncaught exception on rank {rank} of {size}{thread}; {how}\n{text}")
            sys.stderr.flush()
            sys.stdout.flush()
            time.sleep(1.0)  # let the launcher forward the message before the job is torn down
        finally:
            end()

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        report_and_end(exc_type, exc, tb)

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        report_and_end(args.exc_type, args.exc_value, args.exc_traceback,
                       f" in thread {args.thread.name if args.thread else '?'}")

    excepthook._specops_abort = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
    threading.excepthook = thread_hook


# --- sharding and placement -------------------------------------------------------------
def shard_range(n: int, comm: Any = None) -> range:
    """The indices ``range(lo, hi)`` of ``n`` items that this rank owns.

    Contiguous blocks in rank order whose sizes differ by at most one; every index
    belongs to exactly one rank, and the split depends only on ``n`` and the number of
    ranks.

    Args:
        n: the number of items.
        comm: ``None`` or a communicator.

    Returns:
        This rank's indices.
    """
    comm = as_comm(comm)
    return range(comm.rank * n // comm.size, (comm.rank + 1) * n // comm.size)


def shard(items: Any, comm: Any = None) -> Any:
    """The contiguous part of ``items`` that this rank owns (see :func:`shard_range`).

    Args:
        items: a sequence that slices (a list of batches, a NumPy array, a tensor), a
            map-style dataset with ``__len__`` and ``__getitem__`` (a torch ``Dataset``
            becomes a ``torch.utils.data.Subset``), or a torch ``DataLoader`` without
            shuffling: a new loader with the same settings over this rank's share of the
            *samples*. Sharding samples rather than batches keeps every rank's work equal;
            any split gives the same Hessian, as batches are weighted by sample count.
            A loader with a ``DistributedSampler`` (as in DDP training) is split already:
            the new loader takes the sampler's samples for this rank, less the repeated
            samples it pads with.
        comm: ``None`` or a communicator.

    Returns:
        This rank's part, of the kind of ``items`` (a slice, a ``Subset``, a ``DataLoader``;
        a list for a sequence that does not slice).

    Raises:
        ValueError: a shuffling or batch-sampler ``DataLoader`` (its shards would not be
            fixed, or not split by sample), or one whose ``DistributedSampler`` is for
            another rank or number of ranks.
        TypeError: ``items`` has no length (an iterator or generator).
    """
    comm = as_comm(comm)
    torch_data = getattr(sys.modules.get("torch"), "utils", None)
    torch_data = getattr(torch_data, "data", None)
    if torch_data is not None and isinstance(items, torch_data.DataLoader):
        return _shard_loader(items, comm, torch_data)
    if not hasattr(items, "__len__"):
        raise TypeError(
            f"shard needs items with a length (a list, an array, a dataset), got {type(items).__name__}; "
            "for a generator, build the list first"
        )
    part = shard_range(len(items), comm)
    if torch_data is not None and isinstance(items, torch_data.Dataset):
        return torch_data.Subset(items, list(part))
    try:
        return items[part.start:part.stop]
    except (TypeError, KeyError):
        return [items[i] for i in part]


def _shard_loader(loader, comm, torch_data):
    sampler = loader.sampler
    if loader.batch_size is None:
        raise ValueError(
            "shard() splits a DataLoader by sample and needs one with a plain batch_size (not a batch_sampler); "
            "build DataLoader(shard(dataset, comm), batch_size=..., shuffle=False) yourself instead"
        )
    if hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):  # DistributedSampler: already split
        dataset = _distributed_sampler_subset(loader, sampler, comm, torch_data)
    elif isinstance(sampler, torch_data.SequentialSampler):
        dataset = shard(loader.dataset, comm)
    else:
        raise ValueError(
            "shard() splits a DataLoader by sample and needs one with no shuffling and no custom sampler "
            "(the Hessian is multiplied many times over the same data), or one with a DistributedSampler; "
            "build DataLoader(shard(dataset, comm), batch_size=..., shuffle=False) yourself instead"
        )
    return torch_data.DataLoader(
        dataset, batch_size=loader.batch_size, shuffle=False,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def _distributed_sampler_subset(loader, sampler, comm, torch_data):
    """This rank's samples of a ``DistributedSampler``, in its order, without its padding.

    A ``DistributedSampler`` (``drop_last=False``) repeats the first samples so that every
    rank gets as many: a Hessian over them would count those twice. Its order (shuffled
    or not) is fixed by its seed and epoch, so the subset is the same in every pass.
    """
    if (int(sampler.num_replicas), int(sampler.rank)) != (comm.size, comm.rank):
        raise ValueError(
            f"the loader's DistributedSampler is for rank {sampler.rank} of {sampler.num_replicas}, but this "
            f"process is rank {comm.rank} of {comm.size}; build it with num_replicas=comm.size, rank=comm.rank "
            "(its defaults under an initialized torch.distributed)"
        )
    n = len(loader.dataset)
    indices = [i for j, i in enumerate(sampler) if sampler.rank + j * sampler.num_replicas < n]
    return torch_data.Subset(loader.dataset, indices)


def local_rank(comm: Any = None) -> int:
    """This process's index among the processes on its node.

    A :class:`MPIComm` knows it exactly (``MPI_COMM_TYPE_SHARED`` split). Otherwise the
    variables of :data:`LOCAL_RANK_VARIABLES` are read, which launchers set before
    MPI starts (useful to pick a GPU before importing a framework); 0 if none is set.

    Args:
        comm: ``None`` (read the launcher's variables) or a communicator.

    Returns:
        The local rank.
    """
    if comm is not None:
        return as_comm(comm).local_rank
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def gpu_index(num_devices: int, comm: Any = None) -> int:
    """The GPU this rank takes: its local rank modulo the GPUs it can see.

    With one rank per GPU and all GPUs visible, local rank ``r`` takes GPU ``r``. Where
    the launcher already gives each rank its own GPU (``srun --gpus-per-task=1``,
    ``CUDA_VISIBLE_DEVICES`` per rank), each rank sees one and takes index 0.

    Args:
        num_devices: GPUs visible to this process (``torch.cuda.device_count()``,
            ``len(jax.local_devices(backend="gpu"))``).
        comm: ``None`` (read the launcher's variables) or a communicator.

    Returns:
        The device index, e.g. for ``torch.device("cuda", index)``.

    Raises:
        ValueError: no GPU is visible.
    """
    if num_devices < 1:
        raise ValueError(
            "no GPU is visible to this process; check CUDA_VISIBLE_DEVICES and the launcher's "
            "GPU options, or run on the CPU"
        )
    return local_rank(comm) % num_devices
