"""Vectors sharded over the ranks of a communicator: each rank holds some rows of every vector.

:class:`ShardedOps` wraps any backend's :class:`~specops.ops.VectorOps`. Every vector
and every basis of an algorithm is, on each rank, its rows of the global ``n``: one
contiguous ``range(lo, hi)``, or several (a model sharded by FSDP holds a slice of each
parameter), concatenated in order; the operator's ``shape`` stays global.
A reduction over the rows (inner products, Gram blocks, column norms and dots, the
coefficients of a projection, the finite check) is the backend's local partial
followed by one all-reduce, so every rank holds the same host values and runs the
same host-side work (tridiagonals, Rayleigh-Ritz, stopping rules). Products with a
small replicated matrix (``X @ C``) are local. Random probes are drawn by global
index (:func:`specops.random.probes` with ``rows``): a sharded run draws exactly the
vectors one process draws for the same seed.

Ranks may also hold copies of other ranks' rows (``owner=False``: the replicas of a
2-D mesh, as HSDP's replicate dimension): a copy's partial enters every reduction as
zeros, so each row is counted once and one all-reduce over all ranks gives every rank
the same bits (see :class:`ShardedOps`).

Host arrays whose first dimension (or, for a stack of bases, second) is the global
``n`` are taken as full vectors and cut to this rank's rows: :meth:`ShardedOps.asarray`
of a full NumPy vector gives its shard. ``to_numpy`` of a vector gives this rank's rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from specops import random as _random
from specops.distributed import as_comm, shard_range
from specops.ops import Array, VectorOps


class ShardedOps(VectorOps):
    """A backend's vector operations on row shards of ``n``-vectors, reduced over ``comm``.

    Args:
        local: the vector operations of this rank's arrays (any backend).
        comm: the communicator whose ranks hold the shards.
        n: the global length of a vector.
        rows: this rank's rows: a ``range``, or a sequence of ranges whose rows are
            concatenated in that order; default :func:`specops.distributed.shard_range`
            (blocks in rank order whose sizes differ by at most one).
        owner: whether this rank's rows count in the reductions. ``False`` on a rank that
            holds a copy of another rank's rows (the same ranges: a replica of HSDP's
            replicate dimension); its partials enter the all-reduce as zeros. Reducing
            over all ranks, copies as zeros, rather than over one replica's ranks or over
            all ranks divided by the number of copies, counts each row exactly once and
            gives every rank the same bits from one collective (a sum of ``R`` equal
            partials divided by ``R`` is not always the partial, and separate groups
            agree only while their inputs and reduction orders do).

    Raises:
        ValueError: the owners' rows do not cover ``0..n`` exactly once, or a copy's rows
            are not those of an owner.
    """

    sharded = True

    def __init__(self, local: VectorOps, comm: Any, n: int, rows: range | Sequence[range] | None = None,
                 owner: bool = True) -> None:
        if isinstance(local, ShardedOps):
            raise TypeError("local must be one rank's vector operations, not already sharded ones")
        self.local, self.comm, self.n = local, as_comm(comm), int(n)
        rows = shard_range(self.n, self.comm) if rows is None else rows
        self.pieces = [rows] if isinstance(rows, range) else list(rows)
        self.count = sum(len(p) for p in self.pieces)
        self.owner = bool(owner)
        super().__init__(local.dtype, local.device)
        self.name, self.in_place = local.name, local.in_place
        if any(not isinstance(p, range) or p.step != 1 for p in self.pieces):
            raise ValueError(f"rows must be ranges of step 1 (or a sequence of them), got {rows!r}")
        everyone = self.comm.allgather(([(p.start, p.stop) for p in self.pieces], self.owner))
        owned = [pieces for pieces, own in everyone if own]
        spans = sorted(span for pieces in owned for span in pieces if span[0] < span[1])
        ends = [0] + [b for _, b in spans]
        if any(a != e for (a, _), e in zip(spans, ends)) or ends[-1] != self.n:
            raise ValueError(f"the ranks' rows {spans} do not cover 0..{self.n} exactly once; pass each rank "
                             "its rows (specops.distributed.shard_range for contiguous blocks), and owner=False "
                             "on the ranks that hold a copy of another rank's rows")
        copies = [r for r, (pieces, own) in enumerate(everyone) if not own and pieces not in owned]
        if copies:
            raise ValueError(f"ranks {copies} hold copies (owner=False) of rows that no owner holds as one set; "
                             "a copy must hold exactly the rows of one owning rank")
        #: the place of this rank's rows (or of the rows it copies) among the owners', in rank order
        mine = [(p.start, p.stop) for p in self.pieces]
        self._slot = sum(own for _, own in everyone[: self.comm.rank]) if self.owner else owned.index(mine)

    def __repr__(self) -> str:
        return f"ShardedOps({self.local!r}, {self.count} of {self.n} rows in {len(self.pieces)} pieces, " \
               f"ranks={self.comm.size}{'' if self.owner else ', a copy'})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardedOps) and (self.local, self.n, self.pieces) == (other.local, other.n,
                                                                                       other.pieces)

    def __hash__(self) -> int:
        return hash((ShardedOps, self.local, self.n, self.count))

    # --- shapes: a global n becomes this rank's rows ---------------------------------
    def _shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        axis = 1 if len(shape) == 3 else 0
        if len(shape) > axis and shape[axis] == self.n:
            shape = shape[:axis] + (self.count,) + shape[axis + 1:]
        return shape

    def _cut(self, a: Any) -> Any:
        ndim = len(a.shape)
        axis = 1 if ndim == 3 else 0
        if ndim > axis and a.shape[axis] == self.n and self.count != self.n:
            parts = [a[(slice(None),) * axis + (slice(p.start, p.stop),)] for p in self.pieces]
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts, axis=axis) if isinstance(a, np.ndarray) else self.local.concat(parts, axis)
        return a

    def _counted(self, x: Any) -> Any:
        """This rank's partial, or zeros on a copy (so that each row is counted once)."""
        if self.owner:
            return x
        return np.zeros_like(x) if isinstance(x, (np.ndarray, float, int)) else self.local.zeros(tuple(x.shape))

    def local_rows(self, n: int) -> int:
        return self.count if n == self.n else n

    def decide(self, value: Any) -> Any:
        return self.comm.bcast(value, 0)

    # --- required ----------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return self.local.is_native(x)

    def asarray(self, x: Any) -> Array:
        return self.local.asarray(self._cut(x if hasattr(x, "shape") else np.asarray(x)))

    def to_numpy(self, x: Array) -> np.ndarray:
        return self.local.to_numpy(x)

    def zeros(self, shape: tuple[int, ...]) -> Array:
        return self.local.zeros(self._shape(shape))

    def buffer(self, shape: tuple[int, ...]) -> Array:
        return self.local.buffer(self._shape(shape))

    def concat(self, arrays: Sequence[Array], axis: int) -> Array:
        return self.local.concat(arrays, axis)

    def inner(self, X: Array, Y: Array) -> Array:
        return self.comm.allreduce(self._counted(self.local.inner(X, Y)), self.local)

    def combine(self, X: Array, C: Array | np.ndarray) -> Array:
        return self.local.combine(X, C)

    def column_norms(self, X: Array) -> np.ndarray:
        return np.sqrt(self.comm.allreduce_host(self._counted(self.local.column_norms(X) ** 2)))

    def qr(self, X: Array) -> tuple[Array, Array]:
        """Tall-skinny QR: local QRs, then one QR of the owners' stacked ``R`` factors on the host."""
        k, m = X.shape[1], X.shape[0]
        if m >= k:
            Q, R = self.local.qr(X)
            R = self.local.to_numpy(R)
        else:  # fewer rows than columns: this rank's rows are their own R
            Q, R = None, self.local.to_numpy(X)
        Rs = [r for r, own in self.comm.allgather((R, self.owner)) if own]
        Q2, R2 = np.linalg.qr(np.concatenate(Rs, axis=0))
        signs = np.where(np.diag(R2) < 0, -1.0, 1.0)  # a positive diagonal: one answer on every rank
        Q2, R2 = Q2 * signs, R2 * signs[:, None]
        start = sum(r.shape[0] for r in Rs[: self._slot])
        block = Q2[start : start + R.shape[0]]
        Q = self.local.from_numpy(block) if Q is None else self.local.combine(Q, block)
        return Q, self.local.from_numpy(R2)

    def all_finite(self, X: Array) -> bool:
        finite = self.count == 0 or self.local.all_finite(X)  # a rank may hold no rows (FSDP2's chunks)
        return int(self.comm.allreduce_host(int(not finite))) == 0

    # --- derived, with the reductions made global --------------------------------------
    def einsum(self, spec: str, *arrays: Array) -> Array:
        inputs, output = spec.replace(" ", "").split("->")
        if all("n" in term for term in inputs.split(",")) and "n" not in output:
            return self.comm.allreduce(self._counted(self.local.einsum(spec, *arrays)), self.local)
        return self.local.einsum(spec, *arrays)

    def from_numpy(self, a: np.ndarray) -> Array:
        return self.local.from_numpy(self._cut(np.asarray(a)))

    def write_block(self, buffer: Array, start: int, X: Array, axis: int = 1) -> Array:
        return self.local.write_block(buffer, start, X, axis)

    def subtract_from(self, W: Array, Y: Array) -> Array:
        return self.local.subtract_from(W, Y)

    def subtract_combine(self, W: Array, X: Array, C: Array | np.ndarray) -> Array:
        return self.local.subtract_combine(W, X, C)

    def column_dots(self, X: Array, Y: Array) -> np.ndarray:
        return self.comm.allreduce_host(self._counted(self.local.column_dots(X, Y)))

    def host_column_dots(self, X: Array, Y: Array) -> np.ndarray:
        return self.comm.allreduce_host(self._counted(self.local.host_column_dots(X, Y)))

    def to_host(self, X: Array) -> np.ndarray:
        return self.local.to_host(X)

    def move(self, X: Array, source: VectorOps) -> Array:
        return self.local.move(X, source.local if isinstance(source, ShardedOps) else source)

    def host(self) -> VectorOps:
        return ShardedOps(self.local.host(), self.comm, self.n, self.pieces, self.owner)

    def free_memory(self) -> int:
        return self.local.free_memory()

    def random(self, n: int, columns: Iterable[int], seed: int, distribution: _random.Distribution = "rademacher",
               stream: str = "") -> Array:
        if n != self.n:
            raise ValueError(f"random vectors of length {n} from sharded operations of length {self.n}")
        columns = list(columns)
        return self.local.from_numpy(_random.probes(n, columns, seed, distribution=distribution, stream=stream,
                                                    rows=self.pieces))

    def identity_columns(self, n: int, start: int, stop: int) -> Array:
        E, at = np.zeros((self.count, stop - start), dtype=self.dtype), 0
        for p in self.pieces:
            j = np.arange(max(start, p.start), min(stop, p.stop))
            E[at + j - p.start, j - start] = 1.0
            at += len(p)
        return self.local.from_numpy(E)


def shard_ops(local: VectorOps, comm: Any, n: int, rows: range | Sequence[range] | None = None,
              owner: bool = True) -> VectorOps:
    """``local`` itself on one rank, else :class:`ShardedOps` over ``comm``."""
    comm = as_comm(comm)
    return local if comm.size == 1 and rows is None else ShardedOps(local, comm, n, rows, owner)


def gather(ops: VectorOps, X: Array) -> np.ndarray:
    """The full host array of a sharded vector or block on every rank (for tests and small ``n``).

    It materializes ``n`` entries per column on every rank: meant for checks, not for
    the vectors of a model that is sharded because it does not fit.
    """
    if not isinstance(ops, ShardedOps):
        return ops.to_numpy(X)
    local = ops.to_numpy(X)
    out = np.zeros((ops.n,) + local.shape[1:])
    for part, pieces in ops.comm.allgather((local, ops.pieces)):
        at = 0
        for p in pieces:
            out[p.start : p.stop] = part[at : at + len(p)]
            at += len(p)
    return out


__all__ = ["ShardedOps", "gather", "shard_ops"]
