"""Faults: an uncaught exception on one rank ends every rank instead of leaving them waiting.

Without a hook, a rank that dies of an exception leaves the others blocked in their next
collective until the job's time runs out. Each transport installs
:func:`_install_exception_hook` with its own way to end the job (``MPI_Abort`` for
:class:`~specops.distributed.MPIComm`; ``os._exit(1)`` under torchrun and JAX, whose
launchers or connections then end the others); :func:`_abort_wanted` reads the variables
that switch it off.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any


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

