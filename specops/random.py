"""Seeded probe vectors, drawn on the host so every backend sees the same numbers.

Column ``j`` of a probe matrix is drawn from its own generator seeded by
``(seed, stream, j)``: the result does not depend on how columns are chunked, on the
backend, on the device or on the number of MPI ranks.

Entries are drawn in blocks of :data:`BLOCK` rows, block ``b >= 1`` of column ``j``
from its own generator seeded by ``(seed, stream, j, b)``, so that a rank holding
rows ``lo..hi-1`` of a sharded vector draws only the blocks it overlaps and gets
exactly those rows of the vector one process draws. Block 0 is the first ``BLOCK``
draws of the column's generator, so vectors of up to ``BLOCK`` entries are those of
specops before sharding; longer ones differ from them past entry ``BLOCK``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

import numpy as np

#: The probe distributions: entries +-1, or standard Gaussian.
Distribution = Literal["rademacher", "normal"]
DISTRIBUTIONS: tuple[Distribution, ...] = get_args(Distribution)
#: Rows drawn from one generator (see the module's docstring).
BLOCK = 1 << 20


def check_seed(seed: Any) -> int:
    """Validate a user seed: a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_distribution(distribution: str) -> Distribution:
    """Validate a probe distribution: one of :data:`DISTRIBUTIONS`."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown probe distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    return distribution


def generator(seed: int, stream: str = "", index: int = 0, block: int = 0) -> np.random.Generator:
    """A NumPy generator for one (seed, stream, index) triple and block of rows (0: the first)."""
    key = zlib.crc32(stream.encode())
    entropy = [check_seed(seed), key, int(index)] + ([int(block)] if block else [])
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _draw(rng: np.random.Generator, size: int, distribution: str) -> np.ndarray:
    if distribution == "rademacher":
        return rng.integers(0, 2, size=size, dtype=np.int8) * 2.0 - 1.0
    return rng.standard_normal(size)


def probes(n: int, columns: Iterable[int], seed: int, distribution: Distribution = "rademacher", stream: str = "",
           rows: range | Sequence[range] | None = None) -> np.ndarray:
    """Host float64 probe matrix (n, len(columns)), or the rows ``rows`` of it.

    Args:
        n: length of each probe.
        columns: the column indices to draw (an iterable of ints or a ``range``).
        seed: the user's seed.
        distribution: ``"rademacher"`` (entries +-1) or ``"normal"`` (standard Gaussian).
        stream: a name that separates independent uses of one seed.
        rows: a contiguous ``range(lo, hi)`` of row indices (a rank's shard), or a sequence
            of them whose rows are concatenated in that order (a tensor-parallel shard holds
            one range per row of a matrix): only those rows are drawn, equal to the same
            rows of the full matrix. Each block of ``BLOCK`` entries is drawn once however
            many ranges it serves. Default: all ``n``.

    Returns:
        The probes, one column per entry of ``columns`` (as many rows as ``rows`` holds).

    Raises:
        ValueError: a negative or non-integer seed, an unknown ``distribution``, or ``rows``
            not step-1 ranges inside ``0..n``.
    """
    check_distribution(distribution)
    pieces = [range(n)] if rows is None else [rows] if isinstance(rows, range) else list(rows)
    if any(not isinstance(r, range) or r.step != 1 or not 0 <= r.start <= r.stop <= n for r in pieces):
        raise ValueError(f"rows must be a contiguous range inside 0..{n} (or a sequence of them), got {rows!r}")
    columns = list(columns)
    ats = np.cumsum([0] + [len(r) for r in pieces])
    out = np.empty((int(ats[-1]), len(columns)))
    ends: dict[int, int] = {}  # block -> the last entry any range needs from it (a block's draws are a prefix)
    for r in pieces:
        for b in range(r.start // BLOCK, -(-r.stop // BLOCK)):
            ends[b] = max(ends.get(b, 0), min(r.stop, (b + 1) * BLOCK))
    for c, j in enumerate(columns):
        drawn = {b: _draw(generator(seed, stream, j, b), end - b * BLOCK, distribution) for b, end in ends.items()}
        for r, at in zip(pieces, ats):
            for b in range(r.start // BLOCK, -(-r.stop // BLOCK)):
                start = b * BLOCK
                a, z = max(r.start, start), min(r.stop, start + BLOCK)
                out[at + a - r.start : at + z - r.start, c] = drawn[b][a - start : z - start]
    return out
