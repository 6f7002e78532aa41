"""Sharded vectors (specops.sharded) against one process: every algorithm, the same numbers.

The truth is the same algorithm run in one process on the whole matrix with the same
seed (and, for eigenvalues, the dense ``eigvalsh``). The ranks are threads of this
process (``sharded_threads.ThreadComm``); ``n`` is not divisible by the number of ranks,
and the random block is shrunk so that the probes of a rank span several blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from sharded_threads import RowShardedMatrix, run_ranks
from spectra import symmetric_with_spectrum

import specops as so
import specops.random as sr
from specops.backends.numpy import NumpyOps
from specops.sharded import ShardedOps, gather, shard_ops

N = 61


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(sr, "BLOCK", 8)


def _matrix(n=N, dtype=np.float64, double=False):
    rng = np.random.default_rng(3)
    lam = np.concatenate([[6.0, 6.0 if double else 5.0], rng.uniform(-2, 4, n - 2)])  # a double top eigenvalue?
    A, _ = symmetric_with_spectrum(lam, seed=4)
    return A.astype(dtype)


def _both(fn, A, size, dtype=np.float64):
    """``fn(op)`` in one process and on each of ``size`` thread ranks, each result gathered."""
    one = fn(RowShardedMatrix(A, NumpyOps(dtype)))

    def rank(comm):
        ops = ShardedOps(NumpyOps(dtype), comm, A.shape[0])
        return fn(RowShardedMatrix(A, ops))

    return one, run_ranks(size, rank)


def _close(a, b, tol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("size", [2, 3, 4])
def test_random_rows_are_those_of_one_process(size):
    full = sr.probes(N, [0, 5], 7, distribution="normal", stream="x")
    parts = run_ranks(size, lambda comm: ShardedOps(NumpyOps(), comm, N).random(N, [0, 5], 7, "normal", "x"))
    assert np.array_equal(np.concatenate(parts), full)


def test_random_stream_of_short_vectors_unchanged(monkeypatch):
    monkeypatch.setattr(sr, "BLOCK", 1 << 20)
    rng = sr.generator(7, "x", 5)
    assert np.array_equal(sr.probes(N, [5], 7, distribution="normal", stream="x")[:, 0], rng.standard_normal(N))
    with pytest.raises(ValueError, match="contiguous range"):
        sr.probes(N, [0], 7, rows=range(3, N + 1))


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_random_rows_in_many_ranges_like_tensor_parallel(distribution):
    """A Shard(1) slice of a 6 x 10 matrix is one range per row, several per block of 8 entries."""
    pieces = [range(10 * i + 3, 10 * i + 7) for i in range(6)] + [range(60, 61), range(0, 2)]  # any order
    full = sr.probes(N, [0, 4], 9, distribution=distribution, stream="tp")
    got = sr.probes(N, [0, 4], 9, distribution=distribution, stream="tp", rows=pieces)
    assert np.array_equal(got, full[np.concatenate([np.arange(r.start, r.stop) for r in pieces])])
    assert sr.probes(N, [0], 9, rows=[]).shape == (0, 1)
    with pytest.raises(ValueError, match="contiguous range"):
        sr.probes(N, [0], 9, rows=[range(0, 3), range(5, 2, -1)])


EIGSH = {
    "double": dict(k=3),
    "restarts": dict(k=2, max_basis=10, tol=1e-10),
    "block": dict(k=3, block_size=2),
    "smallest": dict(k=2, which="SA"),
    "power": dict(k=2, method="power", tol=1e-8, max_matvecs=4000),
}


@pytest.mark.parametrize("size", [3, 4])
@pytest.mark.parametrize("case", list(EIGSH))
def test_eigsh_matches_one_process(case, size):
    A = _matrix(double=case == "double")

    def fn(op):
        r = so.eigsh(op, seed=1, **EIGSH[case])
        return r.eigenvalues, gather(op.ops, r.eigenvectors), r.residuals, r.converged, r.num_matvecs

    one, ranks = _both(fn, A, size)
    truth = np.linalg.eigvalsh(A)
    for r in ranks:
        _close(r[0], one[0], 1e-10)
        # the same span (a double eigenvalue's basis is free), as far as converged (tol 1e-6)
        _close(r[1] @ r[1].T, one[1] @ one[1].T, 1e-6)
        assert np.array_equal(r[3], one[3])
        # a double eigenvalue's second copy is found from rounding: its residual and the
        # products it takes differ with the order of the sums (within tol); not so otherwise
        assert r[4] == one[4] or case == "double"
        _close(r[2], one[2], 1e-5 if case == "double" else 1e-8)
    want = truth[::-1][: len(one[0])] if EIGSH[case].get("which", "LA") == "LA" else truth[: len(one[0])]
    _close(one[0], want, 1e-7)


def test_eigsh_warm_start_and_dense_path():
    A = _matrix()
    V0 = np.linalg.eigh(A)[1][:, -2:] + 1e-3  # full host vectors: each rank keeps its rows

    one, ranks = _both(lambda op: so.eigsh(op, k=2, v0=V0, seed=0).eigenvalues, A, 3)
    for r in ranks:
        _close(r, one, 1e-10)
    small = _matrix(5)
    one, ranks = _both(lambda op: (so.eigsh(op, k=3).eigenvalues, so.eigsh(op, k=3).settings["method"]), small, 3)
    assert one[1] == "dense" and all(r[1] == "dense" for r in ranks)
    for r in ranks:
        _close(r[0], one[0], 1e-10)


@pytest.mark.parametrize("method, kw", [(m, dict(max_matvecs=30)) for m in ("hutchinson", "hutch++", "xtrace",
                                                                            "krylov-hutch++", "auto")]
                         + [("auto", dict(max_matvecs=300, rtol=1e-3))])  # XTrace, then Krylov Hutch++
def test_trace_matches_one_process(method, kw):
    A = _matrix()

    def fn(op):
        r = so.trace(op, method=method, seed=2, **kw)
        return r.estimate, r.stderr, r.num_matvecs, r.settings.get("estimator")

    one, ranks = _both(fn, A, 3)
    assert "rtol" not in kw or one[3] == "krylov-hutch++"
    for r in ranks:
        _close(r[:2], one[:2], 1e-10)
        assert r[2:] == one[2:]


def test_trace_float32_and_diagonal():
    A = _matrix()
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-10)):
        one, ranks = _both(lambda op: so.trace(op, method="hutchinson", max_matvecs=20, seed=2).estimate,
                           A, 3, dtype)
        for r in ranks:
            _close(r, one, tol)
    one, ranks = _both(lambda op: so.diagonal(op, max_matvecs=20, seed=5), A, 4)
    _close(np.concatenate([r.estimate for r in ranks]), one.estimate, 1e-12)
    _close(np.concatenate([r.stderr for r in ranks]), one.stderr, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_spectral_density_matches_one_process(dtype, tol):
    A = _matrix()

    def fn(op):
        d = so.spectral_density(op, num_probes=3, num_steps=12, seed=3)
        return d.nodes, d.weights

    one, ranks = _both(fn, A, 4, dtype)
    for r in ranks:
        _close(r[0], one[0], tol)
        _close(r[1], one[1], tol)


def test_tracker_warm_starts_on_shards(tmp_path):
    A = _matrix()

    def fn(op, where):
        t = so.Tracker(lambda: op, None if where is None else tmp_path / where, metrics=("eigenvalues", "trace"),
                       k=2, seed=0)
        return [t.update(step) for step in range(2)]

    one = fn(RowShardedMatrix(A, NumpyOps()), None)
    ranks = run_ranks(3, lambda comm: fn(RowShardedMatrix(A, ShardedOps(NumpyOps(), comm, N)), None))
    for r in ranks:
        for a, b in zip(r, one):
            _close(a["eigenvalues"], b["eigenvalues"], 1e-10)
            _close([a["trace"]["estimate"], a["trace"]["stderr"]], [b["trace"]["estimate"], b["trace"]["stderr"]], 1e-10)


def test_bad_rows_and_one_rank():
    with pytest.raises(ValueError, match="exactly once"):
        run_ranks(2, lambda comm: ShardedOps(NumpyOps(), comm, N, rows=range(0, 30)))
    assert isinstance(shard_ops(NumpyOps(), None, N), NumpyOps)
    with pytest.raises(ValueError, match="length"):
        run_ranks(2, lambda comm: ShardedOps(NumpyOps(), comm, N).random(N + 1, [0], 0))


def test_a_rank_that_raises_ends_every_rank():
    A = _matrix()

    def fn(comm):
        op = RowShardedMatrix(A, ShardedOps(NumpyOps(), comm, N))
        if comm.rank == 1:
            raise RuntimeError("rank 1 failed")
        return so.eigsh(op, k=2)

    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_ranks(3, fn, timeout=20)


def test_rows_in_pieces_like_fsdp():
    """Each rank holds a slice of every 'parameter': several ranges, interleaved between ranks."""
    A = _matrix()
    cuts = [0, 10, 25, 61]  # three "parameters", each split between two ranks

    def pieces(rank):
        return [range(a + (b - a) // 2 * rank, a + (b - a) // 2 if rank == 0 else b) for a, b in zip(cuts, cuts[1:])]

    def fn(comm):
        op = RowShardedMatrix(A, ShardedOps(NumpyOps(), comm, N, rows=pieces(comm.rank)))
        r = so.eigsh(op, k=2, seed=1)
        return (r.eigenvalues, gather(op.ops, r.eigenvectors), so.trace(op, method="xtrace", max_matvecs=20).estimate,
                gather(op.ops, op.ops.random(N, [0, 1], 3)))

    single = RowShardedMatrix(A, NumpyOps())
    ref = so.eigsh(single, k=2, seed=1)
    ranks = run_ranks(2, fn)
    for r in ranks:
        _close(r[0], ref.eigenvalues, 1e-10)
        _close(r[1] @ r[1].T, ref.eigenvectors @ ref.eigenvectors.T, 1e-6)
        _close(r[2], so.trace(single, method="xtrace", max_matvecs=20).estimate, 1e-10)
        assert np.array_equal(r[3], sr.probes(N, [0, 1], 3))
    with pytest.raises(ValueError, match="exactly once"):
        run_ranks(2, lambda comm: ShardedOps(NumpyOps(), comm, N, rows=[range(0, 10), range(5, 61)][comm.rank:]))


def test_landscape_along_sharded_directions():
    A = _matrix()

    def fn(op):
        eig = so.eigsh(op, k=1, seed=0)
        random = so.landscape(op, "random-2d", span=0.5, steps=3, seed=4)
        return random.losses, so.landscape(op, eig, span=0.5, steps=3).losses

    one, ranks = _both(fn, A, 3)
    for r in ranks:
        _close(r[0], one[0], 1e-10)
        # an eigenvector's sign is free (TSQR and Householder QR may pick the other): the line may run backwards
        flip = one[1] if abs(r[1][0] - one[1][0]) < abs(r[1][0] - one[1][-1]) else one[1][::-1]
        _close(r[1], flip, 1e-10)


def test_a_bar_on_rank_0_only_takes_the_same_collectives():
    # Only rank 0 draws a progress bar (it wraps the operator); every decision must still be
    # one broadcast on every rank, else the other ranks wait forever (a sharded FSDP2 run hung).
    A = _matrix()

    def fn(op, progress):
        e = so.eigsh(op, k=2, seed=1, progress=progress)
        t = so.trace(op, method="xtrace", max_matvecs=30, seed=2, progress=progress)
        d = so.spectral_density(op, num_probes=2, num_steps=12, seed=3, progress=progress)
        return e.eigenvalues, t.estimate, d.nodes

    one = fn(RowShardedMatrix(A, NumpyOps(np.float64)), False)
    ranks = run_ranks(3, lambda comm: fn(RowShardedMatrix(A, ShardedOps(NumpyOps(np.float64), comm, N)),
                                         comm.rank == 0), timeout=60.0)
    for r in ranks:
        for got, want in zip(r, one):
            _close(got, want, 1e-10)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_copies_of_rows_count_once_like_hsdp(dtype, tol):
    """A (2, 2) mesh: ranks 2 and 3 hold copies (owner=False) of ranks 0 and 1's rows, as HSDP's replicas."""
    A = _matrix(dtype=dtype)
    cuts = [0, 10, 25, 61]
    halves = [[range(a, (a + b) // 2) for a, b in zip(cuts, cuts[1:])],
              [range((a + b) // 2, b) for a, b in zip(cuts, cuts[1:])]]

    def fn(op):
        top = so.eigsh(op, k=3, block_size=2, seed=1)  # a block: the TSQR of the owners' R factors
        d = so.spectral_density(op, num_probes=2, num_steps=12, seed=2)
        return (top.eigenvalues, top.residuals, gather(op.ops, top.eigenvectors),
                so.trace(op, method="xtrace", max_matvecs=20, seed=3).estimate,
                so.trace(op, method="hutch++", max_matvecs=21, seed=3).estimate, d.nodes, d.weights)

    one = fn(RowShardedMatrix(A, NumpyOps(dtype)))
    ranks = run_ranks(4, lambda comm: fn(RowShardedMatrix(A, ShardedOps(NumpyOps(dtype), comm, N,
                                                                        rows=halves[comm.rank % 2],
                                                                        owner=comm.rank < 2))))
    for r in ranks:
        for key in (0, 1, 3, 4, 5, 6):
            _close(r[key], one[key], tol)
        _close(r[2] @ r[2].T, one[2] @ one[2].T, 100 * tol)
        for key in (0, 1, 3, 4, 5, 6):  # every rank, copy or owner, the same host results
            assert np.array_equal(r[key], ranks[0][key])


def test_copies_must_copy_an_owners_rows():
    with pytest.raises(ValueError, match="exactly once"):  # both halves copies: rows 30..61 owned by none
        run_ranks(2, lambda comm: ShardedOps(NumpyOps(), comm, N, rows=[range(0, 30), range(30, 61)][comm.rank],
                                             owner=comm.rank == 0))
    with pytest.raises(ValueError, match="no owner holds"):
        run_ranks(3, lambda comm: ShardedOps(NumpyOps(), comm, N, rows=[range(0, 30), range(30, 61),
                                                                        range(0, 31)][comm.rank],
                                             owner=comm.rank < 2))


def test_a_rank_with_no_rows_on_torch_vectors():
    """FSDP2 cuts 9 rows 3/3/3/0 over 4 ranks: a rank may hold none; torch's reductions of no rows give zeros."""
    torch = pytest.importorskip("torch")
    from specops.backends.torch.ops import TorchOps

    A = _matrix()
    rows = [range(0, 30), range(30, 61), range(61, 61)]

    def fn(op):
        return (so.eigsh(op, k=2, seed=1).eigenvalues, so.trace(op, method="xtrace", max_matvecs=20, seed=3).estimate)

    one = fn(RowShardedMatrix(A, NumpyOps()))
    ranks = run_ranks(3, lambda comm: fn(RowShardedMatrix(A, ShardedOps(TorchOps(torch.float64, "cpu"), comm, N,
                                                                        rows=rows[comm.rank]))))
    for r in ranks:
        _close(r[0], one[0], 1e-10)
        _close(r[1], one[1], 1e-10)
