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
- :func:`shard`: this rank's contiguous part of a sequence, dataset or ``DataLoader``.
- :func:`local_rank` and :func:`gpu_index`: which GPU of its node a rank takes.
- :func:`abort_on_exception`: an uncaught exception on any rank ends all ranks
  (``MPI_Abort``) instead of leaving the others waiting in a collective forever.

See ``docs/distributed.md`` for launching, GPU binding and the cost model.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np

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

    def allreduce_host(self, x):
        """Sum of a host NumPy array or Python/NumPy scalar over all ranks (same type back)."""
        return x

    def allreduce(self, X, ops):
        """Sum of a backend array over all ranks, returned on the array's device.

        Args:
            X: a native array of ``ops`` (any shape).
            ops: the :class:`~specops.ops.VectorOps` of ``X``.
        """
        return X

    def transport(self, X) -> str:
        """How :meth:`allreduce` moves ``X``: ``"none"`` (one rank), ``"device"`` (the GPU
        buffer goes to MPI directly) or ``"host"`` (staged through host memory)."""
        return "none"

    def allgather(self, obj) -> list:
        """A list of one picklable object from every rank, in rank order."""
        return [obj]

    def bcast(self, obj, root: int = 0):
        """``obj`` from ``root`` on every rank."""
        return obj

    def barrier(self):
        """Wait for every rank."""

    def agree(self, value, what: str, fix: str = ""):
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

    def __init__(self, comm=None, *, abort_on_exception: bool = True, cuda_aware: bool | None = None):
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
        if abort_on_exception and self.size > 1 and os.environ.get("SPECOPS_MPI_ABORT", "1") != "0":
            _install_abort_hook(self.comm)

    def allreduce_host(self, x):
        if np.ndim(x) == 0:
            a = np.asarray(x)
            total = self.allreduce_host(a.reshape(1))[0]
            return type(x)(total) if isinstance(x, (int, float)) else total
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        self.comm.Allreduce(x, out, op=self.MPI.SUM)
        return out

    def transport(self, X) -> str:
        if self.size == 1:
            return "none"
        return "device" if self.cuda_aware and _writable_cuda_array(X) else "host"

    def allreduce(self, X, ops):
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

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def __repr__(self):
        return (f"MPIComm(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"cuda_aware={self.cuda_aware})")


def _writable_cuda_array(X) -> bool:
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


def as_comm(comm) -> Comm:
    """``None`` -> the single-process communicator; an mpi4py communicator -> :class:`MPIComm`.

    Raises:
        TypeError: ``comm`` is something else.
    """
    if comm is None:
        return Comm()
    if isinstance(comm, Comm):
        return comm
    if type(comm).__module__.startswith("mpi4py"):
        return MPIComm(comm)
    raise TypeError(f"comm must be None, a specops Comm or an mpi4py communicator, got {type(comm).__name__}")


def world() -> Comm:
    """``MPIComm()`` over ``COMM_WORLD`` when launched by an MPI launcher, else :class:`Comm`.

    Lets one script run both as ``python script.py`` and as ``mpiexec -n 4 python script.py``.
    A launch of several processes is recognised by the size its launcher sets
    (``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``, ``PALS_SIZE``, ``SLURM_STEP_NUM_TASKS``) being
    above one; mpi4py is imported only then.
    """
    sizes = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PALS_SIZE", "SLURM_STEP_NUM_TASKS")
    if any(os.environ.get(name, "1").strip() not in ("", "0", "1") for name in sizes):
        return MPIComm()
    return Comm()


# --- faults ---------------------------------------------------------------------------
def abort_on_exception(comm=None):
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


def _install_abort_hook(comm=None):
    import threading

    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    if getattr(sys.excepthook, "_specops_abort", False):
        return

    def report_and_abort(exc_type, exc, tb, where="") -> None:
        try:
            rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            sys.stderr.write(f"\nspecops: uncaught exception on rank {rank} of {size}{where}; "
                             f"aborting all ranks (MPI_Abort)\n{text}")
            sys.stderr.flush()
            sys.stdout.flush()
            time.sleep(1.0)  # let the launcher forward the message before MPI_Abort tears down its pipes
        finally:
            comm.Abort(1)

    def excepthook(exc_type, exc, tb):
        report_and_abort(exc_type, exc, tb)

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        report_and_abort(args.exc_type, args.exc_value, args.exc_traceback,
                         f" in thread {args.thread.name if args.thread else '?'}")

    excepthook._specops_abort = True
    sys.excepthook = excepthook
    threading.excepthook = thread_hook


# --- sharding and placement -------------------------------------------------------------
def shard_range(n: int, comm=None) -> range:
    """The indices ``range(lo, hi)`` of ``n`` items that this rank owns.

    Contiguous blocks in rank order whose sizes differ by at most one; every index
    belongs to exactly one rank, and the split depends only on ``n`` and the number of
    ranks.
    """
    comm = as_comm(comm)
    return range(comm.rank * n // comm.size, (comm.rank + 1) * n // comm.size)


def shard(items, comm=None):
    """The contiguous part of ``items`` that this rank owns (see :func:`shard_range`).

    Args:
        items: a sequence that slices (a list of batches, a NumPy array, a tensor), a
            map-style dataset with ``__len__`` and ``__getitem__`` (a torch ``Dataset``
            becomes a ``torch.utils.data.Subset``), or a torch ``DataLoader`` without
            shuffling: a new loader with the same settings over this rank's share of the
            *samples*. Sharding samples rather than batches keeps every rank's work equal;
            any split gives the same Hessian, as batches are weighted by sample count.
        comm: ``None`` or a communicator.

    Raises:
        ValueError: a shuffling or batch-sampler ``DataLoader`` (its shards would not be
            fixed, or not split by sample).
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
    if not isinstance(loader.sampler, torch_data.SequentialSampler) or loader.batch_size is None:
        raise ValueError(
            "shard() splits a DataLoader by sample and needs one with a plain batch_size and no "
            "shuffling or custom sampler (the Hessian is multiplied many times over the same data); "
            "build DataLoader(shard(dataset, comm), batch_size=..., shuffle=False) yourself instead"
        )
    return torch_data.DataLoader(
        shard(loader.dataset, comm), batch_size=loader.batch_size, shuffle=False,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def local_rank(comm=None) -> int:
    """This process's index among the processes on its node.

    A :class:`MPIComm` knows it exactly (``MPI_COMM_TYPE_SHARED`` split). Otherwise the
    variables of :data:`LOCAL_RANK_VARIABLES` are read, which launchers set before
    MPI starts (useful to pick a GPU before importing a framework); 0 if none is set.
    """
    if comm is not None:
        return as_comm(comm).local_rank
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def gpu_index(num_devices: int, comm=None) -> int:
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
