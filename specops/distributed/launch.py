"""What launched this process, and what follows from it: the communicator and the GPU.

:func:`launcher` reads the launcher's environment (torchrun, an MPI launcher, Slurm) without
importing a framework; :func:`as_comm` and :func:`world` turn a user's ``comm=`` or the
launch into a communicator; :func:`local_rank` and :func:`gpu_index` say which GPU of its
node a rank takes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from specops.distributed.jax import JaxComm
from specops.distributed.mpi import MPIComm
from specops.distributed.protocol import Comm
from specops.distributed.torch import TorchComm

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
