"""The communicator protocol: :class:`Comm`, the single-process communicator every transport extends.

A transport (:mod:`~specops.distributed.mpi`, :mod:`~specops.distributed.torch`,
:mod:`~specops.distributed.jax`) sets ``rank``, ``size``, ``local_rank``, ``local_size`` and
``cuda_aware``, and implements ``_sum_host``, ``allreduce``, ``transport``, ``allgather``,
``bcast`` and ``barrier``; :meth:`Comm.allreduce_host` and :meth:`Comm.agree` are written
once here on top of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from specops.ops import Array, VectorOps

T = TypeVar("T")


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

