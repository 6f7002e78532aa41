"""The torchrun side of the distributed tests: ``torchrun --nproc_per_node 2 torch_worker.py MODE OUTDIR``.

The checks are those of ``mpi_worker.py``, over a :class:`~specops.distributed.TorchComm` on a
gloo process group that ``as_comm("torch")`` starts from torchrun's variables. Modes:
    ``all``: in one launch (start-up is most of the cost): the communicator's operations
        (``basics-rankR.json``); spectra of the NumPy and PyTorch models for every split
        (``FRAMEWORK-SPLIT-rankR.json``); a ``DistributedSampler`` loader of 239 samples
        through :func:`~specops.distributed.shard` (``sampler-rankR.json``); mismatched
        models and a non-finite loss on one rank, caught on every rank (printed); at exit,
        after specops destroyed the group, whether the group object and gloo's threads are gone
        (``exit-rankR.json``: they must be, before the interpreter finalizes).
    ``raise``: rank 1 raises while rank 0 waits in a product's allreduce (must end the job).
    ``cuda``: on a GPU machine (``benchmarks/gpu_check.sh``): the PyTorch model on this rank's
        GPU over the backend ``$SPECOPS_TEST_TORCH_BACKEND`` (default NCCL where CUDA is), for
        every split; rank 0 compares with one CPU process and prints the largest relative
        difference. Exits non-zero above 1e-10.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenarios
from mpi_worker import run_basics, run_mismatch, run_raise, run_spectra, write

from specops.distributed import TorchComm, as_comm, launcher, shard

SAMPLER_SAMPLES = 239  # odd: a DistributedSampler over 2 ranks pads with one repeated sample


def check_at_exit(out):
    """Register, before the group starts, an exit check that runs after specops destroyed it.

    atexit runs last-registered first, so this runs after the destruction that
    ``as_comm("torch")`` registers. A gloo worker thread still alive when the interpreter
    finalizes can be ended inside a C++ destructor (*terminate called without an active
    exception*); the check records what is left instead of waiting for that rare abort.
    """
    import atexit
    import weakref

    held = {}

    def record():
        tasks = "/proc/self/task"
        names = []
        if os.path.isdir(tasks):
            for task in os.listdir(tasks):
                try:
                    with open(os.path.join(tasks, task, "comm")) as f:
                        names.append(f.read().strip())
                except OSError:  # the thread ended meanwhile
                    pass
        write(out, f"exit-rank{held['rank']}.json", {
            "group_alive": held["group"]() is not None,
            "gloo_threads": sorted(n for n in names if "gloo" in n),
            "threads_listed": bool(names),
        })

    atexit.register(record)

    def keep(comm):
        import torch.distributed as dist

        held["rank"], held["group"] = comm.rank, weakref.ref(dist.group.WORLD)

    return keep


def run_sampler(comm, out):
    import torch

    dataset = scenarios.torch_dataset(SAMPLER_SAMPLES)
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=scenarios.BATCH, sampler=sampler)
    H = scenarios.build_torch(None, comm, batches=shard(loader, comm))
    result = scenarios.spectra(H, k=2, probes=8, steps=8)
    result["padded_samples_per_rank"] = len(sampler)
    write(out, f"sampler-rank{comm.rank}.json", result)


def run_cuda(comm):
    import numpy as np

    sizes = scenarios.PLAN["torch"][1]
    worst = 0.0
    for how in scenarios.SPLITS:
        H = scenarios.build_torch(scenarios.split(scenarios.NUM_SAMPLES, comm, how), comm, device=comm_device(comm))
        got = scenarios.spectra(H, **sizes)
        transport = comm.transport(H.params_vector())
        if comm.rank == 0:
            ref = scenarios.spectra(scenarios.build_torch(range(scenarios.NUM_SAMPLES)), **sizes)
            for key in scenarios.KEYS:
                a, b = np.asarray(got[key], dtype=float), np.asarray(ref[key], dtype=float)
                worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)))
            print(f"{comm!r} {how}: transport {transport}, largest relative difference to one CPU process "
                  f"{worst:.2e}", flush=True)
    if worst > scenarios.RTOL:
        raise SystemExit(f"CUDA over {comm.backend} differs from the CPU by {worst:.2e}")


def comm_device(comm):
    """The GPU that :meth:`TorchComm.from_environment` bound (the CPU where there is none)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def main():
    mode, out = sys.argv[1], sys.argv[2]
    detected = launcher()
    if mode == "cuda":
        return run_cuda(TorchComm.from_environment(os.environ.get("SPECOPS_TEST_TORCH_BACKEND") or None))
    keep = check_at_exit(out) if mode == "all" else None
    comm = as_comm("torch")
    assert isinstance(comm, TorchComm), comm
    if keep is not None:
        keep(comm)
    if mode == "raise":
        return run_raise(comm)
    if mode != "all":
        raise SystemExit(f"unknown mode {mode!r}")
    run_basics(comm, out)
    write(out, f"env-rank{comm.rank}.json", {"launcher": detected, "backend": comm.backend,
                                              "device": str(comm.device), "repr": repr(comm)})
    for framework in ("numpy", "torch"):
        run_spectra(comm, framework, out)
    run_sampler(comm, out)
    run_mismatch(comm, catch=True)


if __name__ == "__main__":
    main()
