"""What every ``specops`` command shares.

The usage error, number arguments, user callables, MPI detection and rank-0 printing.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specops.distributed import Comm

#: Environment variables by which MPI launchers announce the number of processes.
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


class UsageError(ValueError):
    """An invalid argument, found before any computation."""


# --- argument types ---------------------------------------------------------------------------
def number(kind: type[int] | type[float], minimum: float | None = None, exclusive: bool = False,
           maximum: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type=``: ``kind`` (int or float), finite, within the bounds.

    Args:
        kind: ``int`` or ``float``.
        minimum: the smallest allowed value (None: unbounded).
        exclusive: the minimum itself is not allowed.
        maximum: the largest allowed value (None: unbounded).

    Returns:
        A function from the argument's text to its value that raises
        ``argparse.ArgumentTypeError`` with the rule it broke.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive else '>='} {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


# --- distribution -----------------------------------------------------------------------------
def launched_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes an MPI launcher started, from its environment (1 if none).

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        The number of processes.
    """
    environ = os.environ if environ is None else environ
    for var in MPI_SIZE_VARS:
        try:
            return max(int(environ[var]), 1)
        except (KeyError, ValueError):
            continue
    return 1


def launched_rank0() -> bool:
    """Whether this process is rank 0 of its launcher (or not launched by MPI or torchrun at all)."""
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    return (launched_size() <= 1 and "RANK" not in os.environ) or rank == "0"


def detect_comm(name: str = "auto") -> Comm:
    """The communicator ``--comm name`` asks for (see :func:`specops.distributed.as_comm`).

    ``"auto"``: a :class:`~specops.distributed.TorchComm` under torchrun, an
    :class:`~specops.distributed.MPIComm` under ``mpiexec -n N`` with N > 1, else the
    single-process communicator (and neither torch.distributed nor mpi4py is started).

    Args:
        name: ``"auto"``, ``"torch"``, ``"mpi"`` or ``"none"`` (the ``--comm`` argument).

    Returns:
        The communicator; the single-process one wherever only one process runs.

    Raises:
        UsageError: the named launch is missing (e.g. ``--comm torch`` outside torchrun).
    """
    from specops.distributed import Comm, as_comm, launcher

    if name == "auto" and launcher() is None and launched_size() <= 1:
        return Comm()
    try:
        comm = as_comm(name)
    except (RuntimeError, ImportError) as e:
        raise UsageError(f"--comm {name}: {e}") from e
    return comm if comm.size > 1 else Comm()


# --- loading user callables -------------------------------------------------------------------
def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """``"package.module:name"`` -> the object (``name`` may be dotted).

    Args:
        spec: ``"package.module:name"``.
        what: the argument that named it, for the messages.

    Returns:
        The callable.

    Raises:
        UsageError: naming ``what`` (the argument) and what is wrong with ``spec``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} must look like 'module:callable' (e.g. mypkg.models:make_model), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{what}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what}: {spec} is not callable")
    return obj


def call_user(fn: Callable[[], Any], what: str) -> Any:
    """``fn()``, with any exception turned into a :class:`UsageError` naming ``what``.

    Args:
        fn: the user's callable.
        what: what it is, for the message.

    Returns:
        What ``fn()`` returns.

    Raises:
        UsageError: ``fn()`` raised.
    """
    try:
        return fn()
    except Exception as e:
        raise UsageError(f"{what} raised {type(e).__name__}: {e}") from e


# --- output -----------------------------------------------------------------------------------
class Printer:
    """Prints on rank 0 only; progress bars (tqdm, :mod:`specops.progress`) go to stderr."""

    def __init__(self, rank: int, progress: bool) -> None:
        self.rank0 = rank == 0
        self.progress = progress and self.rank0

    def __call__(self, text: str = "", stream: IO[str] | None = None) -> None:
        """Print ``text`` (to stdout, or ``stream``) on rank 0."""
        if self.rank0:
            print(text, file=stream or sys.stdout, flush=True)

    def bar(self, label: str) -> str | bool:
        """The ``progress=`` argument of a library call: its bar's label, or False (no bar).

        Args:
            label: the bar's label.

        Returns:
            ``label`` when progress is shown on this rank, else ``False``.
        """
        return label if self.progress else False
