"""Seeded probe vectors, drawn on the host so every backend sees the same numbers.

Column ``j`` of a probe matrix is drawn from its own generator seeded by
``(seed, stream, j)``: the result does not depend on how columns are chunked, on the
backend, on the device or on the number of MPI ranks.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

KINDS = ("rademacher", "normal")


def check_seed(seed: Any) -> int:
    """Validate a user seed: a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_kind(kind: str) -> str:
    """Validate a probe distribution: one of :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"unknown probe distribution {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def generator(seed: int, stream: str = "", index: int = 0) -> np.random.Generator:
    """A NumPy generator for one (seed, stream, index) triple."""
    key = zlib.crc32(stream.encode())
    return np.random.default_rng(np.random.SeedSequence([check_seed(seed), key, int(index)]))


def probes(n: int, columns: Iterable[int], seed: int, kind: str = "rademacher", stream: str = "") -> np.ndarray:
    """Host float64 probe matrix (n, len(columns)).

    Args:
        n: length of each probe.
        columns: the column indices to draw (an iterable of ints or a ``range``).
        seed: the user's seed.
        kind: ``"rademacher"`` (entries +-1) or ``"normal"`` (standard Gaussian).
        stream: a name that separates independent uses of one seed.

    Returns:
        The probes, one column per entry of ``columns``.

    Raises:
        ValueError: a negative or non-integer seed, or an unknown ``kind``.
    """
    check_kind(kind)
    columns = list(columns)
    out = np.empty((n, len(columns)))
    for c, j in enumerate(columns):
        rng = generator(seed, stream, j)
        if kind == "rademacher":
            out[:, c] = rng.integers(0, 2, size=n, dtype=np.int8) * 2.0 - 1.0
        else:
            out[:, c] = rng.standard_normal(n)
    return out
