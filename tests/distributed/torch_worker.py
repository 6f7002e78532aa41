"""The torchrun side of the distributed tests: ``torchrun --nproc_per_node 2 torch_worker.py MODE OUTDIR``.

The checks are those of ``mpi_worker.py``, over a :class:`~specops.distributed.TorchComm` on a
gloo process group that ``as_comm("torch")`` starts from torchrun's variables. Modes:
    ``all``: in one launch (start-up is most of the cost): the communicator's operations
        (``basics-rankR.json``); spectra of the NumPy and PyTorch models for every split
        (``FRAMEWORK-SPLIT-rankR.json``); a ``DistributedSampler`` loader of 239 samples
        through :func:`~specops.distributed.shard` (``sampler-rankR.json``); mismatched
        models and a non-finite loss on one rank, caught on every rank (printed).
    ``raise``: rank 1 raises while rank 0 waits in a product's allreduce (must end the job).
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


def run_sampler(comm, out):
    import torch

    dataset = scenarios.torch_dataset(SAMPLER_SAMPLES)
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=scenarios.BATCH, sampler=sampler)
    H = scenarios.build_torch(None, comm, batches=shard(loader, comm))
    result = scenarios.spectra(H, k=2, probes=8, steps=8)
    result["padded_samples_per_rank"] = len(sampler)
    write(out, f"sampler-rank{comm.rank}.json", result)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    detected = launcher()
    comm = as_comm("torch")
    assert isinstance(comm, TorchComm), comm
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
