"""specops' memory model, checked against measured peaks.

Each algorithm's working memory is a count of length-n vectors (``bytes = vectors * n *
itemsize``, on the operator's device; the model's own memory for products comes on top).
This script states the model for each algorithm and setting (:func:`model_vectors`) and
measures the peak of NumPy allocations (``tracemalloc``) of the same call on a diagonal
operator of size n, whose products allocate only their output.

Run: ``python benchmarks/memory_model.py [--n 20000]`` (seconds).
"""

from __future__ import annotations

import argparse
import tracemalloc

import numpy as np

import specops as so
from specops.backends.numpy import NumpyOps


class Diagonal(so.LinearOperator):
    """``diag(d)``: a product allocates only its (n, b) result."""

    def __init__(self, d: np.ndarray):
        super().__init__((d.size, d.size), NumpyOps(np.float64))
        self.d = d

    def _matmat(self, V):
        return self.d[:, None] * V


#: (label, function name, keyword arguments) of the settings measured.
CASES = [
    ("eigsh k=1", "eigsh", dict(k=1)),
    ("eigsh k=5", "eigsh", dict(k=5)),
    ("eigsh k=20", "eigsh", dict(k=20)),
    ("eigsh k=5 block 5", "eigsh", dict(k=5, block_size=5)),
    ("eigsh k=5 max_basis 80", "eigsh", dict(k=5, max_basis=80)),
    ("SLQ 10 x 64 (all at once)", "spectral_density", dict(num_probes=10, num_steps=64)),
    ("SLQ 10 x 64, 1 probe at once", "spectral_density", dict(num_probes=10, num_steps=64, probes_at_once=1)),
    ("SLQ 10 x 64, window 8", "spectral_density", dict(num_probes=10, num_steps=64, reorth_window=8)),
    ("SLQ 10 x 64, 1 at once, window 8", "spectral_density",
     dict(num_probes=10, num_steps=64, probes_at_once=1, reorth_window=8)),
    ("trace hutchinson 100, chunk 10", "trace", dict(method="hutchinson", max_matvecs=100)),
    ("trace hutch++ 100", "trace", dict(method="hutch++", max_matvecs=100)),
    ("trace xtrace 100", "trace", dict(method="xtrace", max_matvecs=100)),
    *[(f"trace krylov-hutch++ {m} (0.97^i)", "trace", dict(method="krylov-hutch++", max_matvecs=m, distribution="normal"))
      for m in (100, 400)],
    ("diagonal 100, chunk 10", "diagonal", dict(max_matvecs=100)),
]


def lanczos_vectors(k: int, b: int, basis: int) -> int:
    """One thick-restart Lanczos run: the basis, the restart's rotated copy of the kept
    Ritz vectors, the verification's ``V``, ``A V`` and residual, the block's work vectors
    and a few for random draws."""
    return basis + max(k, (basis - b) // 2) + 3 * k + 4 * b + 10


def model_vectors(fn: str, kw: dict) -> float:
    """The memory model: working length-n vectors of ``fn(**kw)`` (an upper bound).

    ``eigsh``: one Lanczos run (:func:`lanczos_vectors`); with the multiplicity check
    (``k > 1``, default block size, not ``LM``) the first basis is held while a second
    single-vector run searches its complement; when that check finds a repeated
    eigenvalue, block Lanczos reruns with ``b = k`` and basis ``max(40, 9k)`` after the
    first basis is freed. ``spectral_density``: ``g (w + 7)`` for ``g`` probes at once and
    a window ``w``. Traces and diagonals: per probe chunk ``c``, plus the sketch for
    Hutch++ (``m`` vectors) and XTrace (``2.5 m``) of ``m`` products; Krylov Hutch++ its
    basis (``k < m``; a buffer that doubles, with the old one while it is copied: ``3 k``)
    and two vectors per pilot (``p``, at most ``m``), so ``3 m`` bounds both, and two chunks
    more for a block's products and its orthogonalization.
    """
    if fn == "eigsh":
        k, b = kw["k"], kw.get("block_size", 1)
        basis = kw.get("max_basis", max(40, 3 * k + 6 * b))
        one = lanczos_vectors(k, b, basis)
        if k == 1 or "block_size" in kw:
            return one
        rerun = lanczos_vectors(k, k, max(40, 9 * k))
        return max(one + lanczos_vectors(1, 1, basis), rerun)
    if fn == "spectral_density":
        p, s = kw["num_probes"], kw["num_steps"]
        g = kw.get("probes_at_once", p)
        w = kw.get("reorth_window", s)
        return g * (w + 7)
    if fn == "trace":
        m, c = kw["max_matvecs"], kw.get("chunk_size", 10)
        return {"hutchinson": 4 * c + 2, "hutch++": m + 2 * c, "xtrace": 2.5 * m + 2 * c,
                "krylov-hutch++": 3 * m + 4 * c}[kw["method"]]
    if fn == "diagonal":
        return 5 * kw.get("chunk_size", 10) + 10
    raise ValueError(fn)


def peak_vectors(A, fn: str, kw: dict) -> float:
    """Measured peak of NumPy allocations during ``fn(A, **kw)``, in length-n float64 vectors."""
    tracemalloc.start()
    getattr(so, fn)(A, **kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / (A.shape[0] * 8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    A = Diagonal(np.random.default_rng(0).uniform(0.0, 1.0, args.n))
    # with Gaussian probes (Rademacher ones are exact on a diagonal) Krylov Hutch++ keeps a large basis here
    decaying = Diagonal(0.97 ** np.arange(args.n))
    print(f"n = {args.n}: working memory in length-n vectors (bytes / (n * itemsize))")
    print(f"{'setting':36} {'model':>7} {'measured':>9}")
    for label, fn, kw in CASES:
        on = decaying if "0.97^i" in label else A
        print(f"{label:36} {model_vectors(fn, kw):7.0f} {peak_vectors(on, fn, kw):9.1f}", flush=True)


if __name__ == "__main__":
    main()
