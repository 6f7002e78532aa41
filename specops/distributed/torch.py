"""The ``torch.distributed`` transport: :class:`TorchComm` (``torchrun``; NCCL, gloo).

Also what starting and ending the default process group needs: the launcher's variables
(:func:`_torch_launch_environment`), the modules to import before the group starts
(:func:`_import_group_defaults`) and its teardown at exit (:func:`_destroy_default_group`).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from specops.distributed.faults import _abort_wanted, _install_exception_hook
from specops.distributed.protocol import Comm

if TYPE_CHECKING:
    from specops.ops import Array, VectorOps

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

        from specops.distributed.launch import gpu_index  # here: launch imports this module

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
