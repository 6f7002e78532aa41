"""The parts of specops.distributed that need no MPI: sharding, placement, agreement, defaults."""

from __future__ import annotations

import numpy as np
import pytest

from specops.distributed import (
    LOCAL_RANK_VARIABLES,
    Comm,
    as_comm,
    gpu_index,
    local_rank,
    mpi_cuda_aware,
    shard,
    shard_range,
    world,
)


class FakeComm(Comm):
    """Rank ``rank`` of ``size``; ``allgather`` returns the values the test planted."""

    def __init__(self, rank, size, gathered=None):
        self.rank, self.size, self.gathered = rank, size, gathered

    def allgather(self, obj):
        return self.gathered if self.gathered is not None else [obj] * self.size


@pytest.mark.parametrize("n", [0, 1, 5, 17, 100])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_shards_partition_the_items_in_order(n, size):
    items = list(range(n))
    parts = [shard(items, FakeComm(r, size)) for r in range(size)]
    assert [x for p in parts for x in p] == items
    lengths = [len(p) for p in parts]
    assert max(lengths) - min(lengths) <= 1
    assert [list(shard_range(n, FakeComm(r, size))) for r in range(size)] == parts


def test_shard_of_arrays_and_index_only_sequences():
    X = np.arange(20).reshape(10, 2)
    np.testing.assert_array_equal(shard(X, FakeComm(1, 3)), X[3:6])

    class Indexable:  # __getitem__ by integer only, like many datasets
        def __len__(self):
            return 5

        def __getitem__(self, i):
            if not isinstance(i, int):
                raise TypeError("integers only")
            return i * 10

    assert shard(Indexable(), FakeComm(1, 2)) == [20, 30, 40]


def test_shard_rejects_iterators():
    with pytest.raises(TypeError, match="shard needs items with a length"):
        shard(iter(range(4)), FakeComm(0, 2))


def test_shard_of_torch_dataset_and_loader():
    torch = pytest.importorskip("torch")
    data = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    part = shard(data, FakeComm(1, 2))
    assert isinstance(part, torch.utils.data.Subset) and list(part.indices) == [5, 6, 7, 8, 9]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    got = [b[1].tolist() for b in shard(loader, FakeComm(1, 2))]
    assert got == [[5, 6], [7, 8], [9]]
    with pytest.raises(ValueError, match="no shuffling"):
        shard(torch.utils.data.DataLoader(data, batch_size=2, shuffle=True), FakeComm(0, 2))


def test_agree_raises_on_disagreement_listing_every_rank():
    assert FakeComm(0, 2).agree(5, "x") == 5
    with pytest.raises(ValueError, match=r"ranks disagree on the width \(rank 0: 3, rank 1: 4\); fix it"):
        FakeComm(0, 2, gathered=[3, 4]).agree(3, "the width", "fix it")


def test_model_operator_rejects_mismatched_parameter_counts():
    """The check the operator runs at construction, fed another rank's size by the fake comm."""
    import scenarios

    class Planted(FakeComm):  # the other rank's (parameters, dtype); other gathers mirror this rank
        def allgather(self, obj):
            return [(640, "float64"), (630, "float64")] if isinstance(obj, tuple) else [obj, obj]

    comm = Planted(0, 2)
    with pytest.raises(ValueError, match=r"ranks disagree on the number of parameters.*rank 1: \(630"):
        scenarios.build_numpy(range(scenarios.NUM_SAMPLES), comm)


def test_single_process_comm_is_the_identity():
    c = as_comm(None)
    x = np.arange(3.0)
    assert (c.rank, c.size, c.local_rank, c.transport(x)) == (0, 1, 0, "none")
    assert c.allreduce(x, None) is x and c.allreduce_host(2.5) == 2.5
    assert c.allgather("a") == ["a"] and c.bcast("b") == "b"
    assert as_comm(c) is c
    with pytest.raises(ValueError, match="comm must be one of"):
        as_comm("world")


def test_world_without_a_launcher_is_single_process(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PALS_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert type(world()) is Comm
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a batch script's own step: one process
    assert type(world()) is Comm


def test_local_rank_from_launcher_variables(monkeypatch):
    for name in LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")  # consulted before Slurm's
    assert local_rank() == 5
    assert local_rank(FakeComm(0, 2)) == 0  # a communicator's own value wins


def test_gpu_index_wraps_around_the_visible_devices(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    assert gpu_index(4) == 1
    assert gpu_index(1) == 0  # the launcher gave each rank its own GPU
    with pytest.raises(ValueError, match="no GPU is visible"):
        gpu_index(0)


def test_cuda_awareness_can_be_forced(monkeypatch):
    monkeypatch.setenv("SPECOPS_MPI_CUDA_AWARE", "1")
    assert mpi_cuda_aware() is True
    monkeypatch.setenv("SPECOPS_MPI_CUDA_AWARE", "0")
    assert mpi_cuda_aware() is False


class _Rank0(FakeComm):
    """Rank 0 of 2: records every decision it broadcasts."""

    def __init__(self):
        super().__init__(0, 2)
        self.sent = []

    def bcast(self, obj, root=0):
        self.sent.append(obj)
        return obj


class _Rank1(FakeComm):
    """Rank 1 of 2, whose reductions differ from rank 0's beyond the last bit (as a
    non-deterministic GPU reduction would); its broadcasts receive rank 0's decisions."""

    def __init__(self, sent):
        super().__init__(1, 2)
        self.sent, self.received = list(sent), 0
        self.rng = np.random.default_rng(0)

    def allreduce(self, X, ops):
        return X * (1 + 1e-12 * self.rng.standard_normal(X.shape))

    def bcast(self, obj, root=0):
        got = self.sent.pop(0)
        assert type(got) is type(obj) and np.shape(got) == np.shape(obj), "ranks reached different decisions"
        self.received += 1
        return got


@pytest.mark.parametrize("run", [
    lambda H: __import__("specops").eigsh(H, k=3, tol=1e-8),
    lambda H: __import__("specops").eigsh(H, k=2, method="power", tol=1e-6, max_matvecs=400),
    lambda H: __import__("specops").spectral_density(H, num_probes=4, num_steps=30),
    lambda H: __import__("specops").trace(H, max_matvecs=200, rtol=0.05),
    lambda H: __import__("specops").trace(H, method="hutchinson", max_matvecs=200, rtol=0.05),
    lambda H: __import__("specops").trace(H, method="krylov-hutch++", max_matvecs=200, rtol=0.01),
    lambda H: __import__("specops").trace(H, max_matvecs=200, rtol=0.005),  # XTrace, then Krylov Hutch++
], ids=["lanczos", "power", "slq", "trace-auto", "trace-hutchinson", "trace-krylov", "trace-auto-krylov"])
def test_every_branch_follows_rank_0_when_a_rank_computes_differently(run):
    """Each data-dependent branch goes through ``decide`` (rank 0's value, broadcast): a rank
    whose products differ takes rank 0's path, consuming exactly rank 0's decisions."""
    import scenarios

    r0 = _Rank0()
    out0 = run(scenarios.build_numpy(range(scenarios.NUM_SAMPLES), r0))
    assert len(r0.sent) >= 3
    r1 = _Rank1(r0.sent)
    out1 = run(scenarios.build_numpy(range(scenarios.NUM_SAMPLES), r1))
    assert r1.received == len(r0.sent) and not r1.sent
    assert out1.num_matvecs == out0.num_matvecs


class _Peer(FakeComm):
    """Rank ``rank`` of 2 whose peer mirrors it, except that the peer's ``fail_at``-th
    failure report (the gathered outcome of a local step) is ``failure``."""

    def __init__(self, rank, fail_at, failure):
        super().__init__(rank, 2)
        self.fail_at, self.failure, self.reports = fail_at, failure, 0

    def allgather(self, obj):
        if obj is None or isinstance(obj, str):  # a failure report: None when the step worked
            self.reports += 1
            peer = self.failure if self.reports == self.fail_at else None
            return [obj, peer] if self.rank == 0 else [peer, obj]
        return [obj, obj]


def test_a_shard_that_does_not_fit_the_model_raises_on_every_rank():
    """The peer's data does not fit the model: its loss raises there only. Every rank raises
    the same error naming that rank and the cause, so none waits in a collective."""
    import scenarios

    failure = "ValueError: matmul: shapes do not fit"
    for rank, peer in ((0, 1), (1, 0)):
        with pytest.raises(RuntimeError, match="evaluating the loss of every batch failed on 1 of 2 ranks "
                                               rf"\(rank {peer}: ValueError: matmul: shapes do not fit\)"):
            scenarios.build_numpy(range(scenarios.NUM_SAMPLES), _Peer(rank, 2, failure))
    # the failing rank itself: its own error is gathered and is the cause
    import specops.backends.numpy as snp

    def loss(theta, batch):
        raise ValueError("a batch of 3 features for a model of 4")

    with pytest.raises(RuntimeError, match="failed on 1 of 2 ranks \\(rank 1: ValueError: a batch of 3") as info:
        snp.hessian(loss, lambda t, b: t, lambda t, b, V: V, np.zeros(2), (np.zeros((4, 3)), np.zeros(4)),
                    comm=_Peer(1, 0, None))
    assert isinstance(info.value.__cause__, ValueError)


class _TwoRankMPI:
    """The part of an mpi4py communicator ``MPIComm.allreduce`` calls, as if a second rank held
    the same block: ``Allreduce`` writes twice the send buffer into the receive buffer."""

    def __init__(self, log):
        self.log = log

    def Allreduce(self, send, recv, op):
        self.log.append(("Allreduce", type(send).__name__, op))
        recv[...] = 2 * np.asarray(send)


class _DeviceBlock(np.ndarray):
    """Stands in for a framework's device array (a CUDA tensor) whose backend registered it."""


def _two_rank_mpi_comm(log, cuda_aware):
    from types import SimpleNamespace

    from specops.distributed import MPIComm

    comm = MPIComm.__new__(MPIComm)  # no MPI here: rank 0 of 2 over the fake above
    comm.rank, comm.size, comm.cuda_aware = 0, 2, cuda_aware
    comm.comm, comm.MPI = _TwoRankMPI(log), SimpleNamespace(SUM="sum")
    return comm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mpi_hands_registered_device_arrays_to_mpi_directly(monkeypatch, dtype):
    """Arrays of a kind a backend registered go to a CUDA-aware MPI as the buffers the backend
    prepares (before MPI reads them); every other array is staged through the host."""
    from specops.backends.numpy import NumpyOps
    from specops.distributed import mpi, register_device_buffers

    monkeypatch.setattr(mpi, "_DEVICE_BUFFERS", [])
    log = []

    def buffers(X):
        log.append(("buffers", X.dtype))
        return np.ascontiguousarray(X).view(_DeviceBlock), np.empty_like(X)

    def accepts(X):
        return isinstance(X, _DeviceBlock)

    register_device_buffers(accepts, buffers)
    register_device_buffers(accepts, buffers)  # twice: registered once
    assert len(mpi._DEVICE_BUFFERS) == 1
    ops = NumpyOps(dtype)
    X = np.asfortranarray(np.arange(6, dtype=dtype).reshape(3, 2)).view(_DeviceBlock)
    comm = _two_rank_mpi_comm(log, cuda_aware=True)
    assert comm.transport(X) == "device"
    got = comm.allreduce(X, ops)
    np.testing.assert_array_equal(np.asarray(got), 2 * np.arange(6, dtype=dtype).reshape(3, 2))
    assert got.dtype == dtype
    assert log == [("buffers", dtype), ("Allreduce", "_DeviceBlock", "sum")]  # prepared, then read

    log.clear()  # a host array: no device buffers, MPI sums a host copy of the operator's dtype
    x = np.arange(4, dtype=dtype)
    assert comm.transport(x) == "host"
    np.testing.assert_array_equal(comm.allreduce(x, ops), 2 * x)
    assert log == [("Allreduce", "ndarray", "sum")]

    log.clear()  # an MPI that is not CUDA-aware: registered arrays too go through the host
    comm = _two_rank_mpi_comm(log, cuda_aware=False)
    assert comm.transport(X) == "host"
    np.testing.assert_array_equal(np.asarray(comm.allreduce(X, ops)), 2 * np.asarray(X))
    assert [entry[0] for entry in log] == ["Allreduce"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_backend_registers_cuda_tensors_for_mpi(monkeypatch, dtype):
    """Importing the torch backend registers its CUDA-tensor buffers; they copy a
    non-contiguous block, allocate a fresh receive buffer and wait for the device's stream."""
    torch = pytest.importorskip("torch")
    tb = pytest.importorskip("specops.backends.torch.ops")  # the vector operations register the buffers
    from specops.distributed import mpi

    [entry] = [e for e in mpi._DEVICE_BUFFERS if e.accepts is tb._is_cuda_tensor]
    assert mpi._device_buffers(torch.zeros(3)) is None  # CPU tensors go through the host
    assert not tb._is_cuda_tensor(np.zeros(3))
    waited = []
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device: type("Stream", (), {"synchronize": lambda self: waited.append(device)})())
    X = torch.arange(12, dtype=getattr(torch, dtype)).reshape(3, 4).T  # a transposed, non-contiguous view
    send, recv = entry.buffers(X)
    assert send.is_contiguous() and torch.equal(send, X)
    assert recv.shape == X.shape and recv.dtype == X.dtype and recv.device == X.device
    assert recv.data_ptr() not in (send.data_ptr(), X.data_ptr())
    assert waited == [X.device]
