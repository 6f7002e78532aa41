"""Ranks as threads of one process: a communicator for testing sharded vectors in-process.

Each thread is one rank; collectives meet at a barrier and sum in rank order, so every
rank gets bit-identical results, as MPI's deterministic reductions give.
"""

from __future__ import annotations

import threading
from functools import reduce

import numpy as np

from specops.distributed import Comm
from specops.operator import LinearOperator
from specops.sharded import ShardedOps, gather


class ThreadComm(Comm):
    """Rank ``rank`` of ``size`` threads sharing ``room`` (a barrier and one slot per rank)."""

    def __init__(self, rank, size, room):
        self.rank, self.size, self.room = rank, size, room

    def _exchange(self, obj):
        slots, barrier = self.room["slots"], self.room["barrier"]
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        self.room["collectives"][self.rank] += 1
        return out

    def _sum_host(self, x):
        return reduce(np.add, self._exchange(np.array(x, dtype=np.float64)))

    def allreduce(self, X, ops):
        return ops.from_numpy(self._sum_host(ops.to_numpy(X)))

    def allgather(self, obj):
        return self._exchange(obj)

    def bcast(self, obj, root=0):
        return self._exchange(obj)[root]

    def barrier(self):
        self._exchange(None)


def run_ranks(size, fn, timeout=120.0):
    """``[fn(comm) for each rank]``, the ranks running as threads; the first rank's error is raised."""
    room = dict(slots=[None] * size, barrier=threading.Barrier(size, timeout=timeout), collectives=[0] * size)
    results, errors = [None] * size, [None] * size

    def main(rank):
        try:
            results[rank] = fn(ThreadComm(rank, size, room))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors[rank] = e
            room["barrier"].abort()  # the other ranks stop waiting for this one

    threads = [threading.Thread(target=main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


class RowShardedMatrix(LinearOperator):
    """A dense symmetric matrix of which each rank keeps its rows; vectors sharded the same way."""

    def __init__(self, A, ops):
        super().__init__(A.shape, ops)
        self.A = A
        self.rows = A[np.concatenate([np.arange(p.start, p.stop) for p in ops.pieces])] \
            if isinstance(ops, ShardedOps) else A
        self.local = ops.local if isinstance(ops, ShardedOps) else ops

    def _matmat(self, V):
        full = gather(self.ops, V)  # a test operator: each rank needs all of V for its rows
        return self.local.from_numpy(self.rows @ full)

    def loss_at(self, delta=None):
        """A quadratic "loss" 0.5 x^T A x at x = 1 + delta, for landscapes (the same on every rank)."""
        x = np.ones(self.shape[0]) + (0.0 if delta is None else gather(self.ops, delta))
        return 0.5 * float(x @ self.A @ x)
