"""Run under ``torchrun --nproc_per_node 8``: HSDP with tensor parallelism on a (2, 2, 2) mesh, against one process.

Usage: ``hsdp_tp_worker.py OUT_DIR``. The MLP of ``fsdp_mesh_worker.py`` is split column-
then row-wise over the mesh's ``tp`` axis, then wrapped with ``fully_shard`` over its
``(replicate, shard)`` axes (HSDP); the four ``(replicate, shard)`` coordinates hold their
own, unequal batches, the same along ``tp``. Rank 0 also computes one process's numbers
with the whole model on the collective batches (the four groups' ``i``-th batches as one).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp_mesh_worker import data, tp_model
from fsdp_worker import spectra
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from specops.backends import torch as st


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("replicate", "shard", "tp"))
    dtype = torch.float64
    groups = data(dtype)  # one list of batches per (replicate, shard) coordinate
    r, s, _ = mesh.get_coordinate()
    model = parallelize_module(tp_model(dtype), mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model[0], mesh=mesh["replicate", "shard"])
    fully_shard(model, mesh=mesh["replicate", "shard"])
    H = st.hessian(model, F.cross_entropy, groups[2 * r + s])
    got, top = spectra(H)
    got.update(rows=int(top.eigenvectors.shape[0]), owner=bool(H.ops.owner),
               placements=sorted({str(p.placements) for p in model.parameters()}))
    results = {"hsdp_tp": got}
    if rank == 0:
        collective = [tuple(torch.cat(parts) for parts in zip(*batches)) for batches in zip(*groups)]
        results["one"], _ = spectra(st.hessian(tp_model(dtype), F.cross_entropy, collective))
    with open(os.path.join(out, f"hsdp-tp-rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
