"""Run under ``torchrun --nproc_per_node 4``: FSDP2 on 2-D meshes (HSDP) against one process with all the data.

Usage: ``fsdp_mesh_worker.py OUT_DIR``. Each rank holds its own, unequal data; the model is
wrapped with ``fully_shard`` on a ``(replicate, shard)`` mesh of shapes (2, 2), (1, 4) and
(4, 1), and the sharded operator's spectra are compared (in the test) with one process
holding the whole model and all the data (the unsharded backend, exact products). Then
tensor parallelism (``parallelize_module`` on a 1-D mesh of the 4 ranks, every rank with
all the data): column- and row-wise layers (placements ``Shard(0)``, ``Shard(1)`` and a
replicated bias), and a plan that leaves a layer's parameters plain tensors; against one
process the same way. Last the bad inputs, each caught and printed: fully_shard over a
tensor-parallel 2-D (dp, tp) mesh, ranks with different data, plain parameters that differ.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp_worker import make_model, shard, spectra
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import specops as so
from specops.backends import torch as st
from specops.sharded import gather

SIZES = ((11, 9), (7, 8), (12, 5), (6, 10))  # each rank's two batches: 37 + 15 + 17 + 16 samples
MESHES = {"2x2": (2, 2), "1x4": (1, 4), "4x1": (4, 1)}
DTYPES = {"2x2": (torch.float64, torch.float32), "1x4": (torch.float64,), "4x1": (torch.float64,)}


def data(dtype):
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(s, 6, generator=g, dtype=dtype), torch.randint(0, 3, (s,), generator=g)) for s in sizes]
            for sizes in SIZES]


def tp_model(dtype, seed=0):
    torch.manual_seed(seed)  # 12 hidden units: PyTorch's tensor parallelism needs them divisible by the 4 ranks
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(dtype)  # n = 123


PLAIN = {"0": ColwiseParallel(output_layouts=Replicate())}  # the second layer's parameters stay plain tensors


def tensor_parallel(rank, mesh, plan):
    """Tensor-parallel spectra, GGN products and data errors; rank 0 also one process's (every rank: all data)."""
    results = {}
    for name, dtype, layers in (("tp", torch.float64, plan), ("tp", torch.float32, plan),
                                ("tp-plain", torch.float64, PLAIN)):
        batches = sum(data(dtype), [])
        model = parallelize_module(tp_model(dtype), mesh, layers)
        H = st.hessian(model, F.cross_entropy, batches)
        got, top = spectra(H)
        got["engine"] = H.adapter.engine
        got["data_stderr"] = so.eigsh(H, k=2, seed=0, data_error=True).data_stderr.tolist()
        G = st.ggn(model, F.cross_entropy, batches)
        got["ggn"] = gather(G.ops, G @ G.ops.random(G.shape[0], [0], 5)[:, 0]).tolist()
        got["placements"] = {k: [str(getattr(p, "placements", "plain")), list(p.shape)]
                             for k, p in model.named_parameters()}
        got["as_params"] = {k: str(getattr(t, "placements", "plain"))
                            for k, t in H.as_params(H.ops.random(H.shape[0], [0, 1], 5)).items()}
        got["local_rows"] = int(top.eigenvectors.shape[0])
        results[f"{name}-{dtype}"] = got
        if rank == 0:
            H1 = st.hessian(tp_model(dtype), F.cross_entropy, batches)
            one, _ = spectra(H1)
            one["data_stderr"] = so.eigsh(H1, k=2, seed=0, data_error=True).data_stderr.tolist()
            G1 = st.ggn(tp_model(dtype), F.cross_entropy, batches)
            one["ggn"] = G1.ops.to_numpy(G1 @ G1.ops.random(G1.shape[0], [0], 5)[:, 0]).tolist()
            results[f"one-{name}-{dtype}"] = one
    return results


def caught(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "no error"


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")  # before init_device_mesh: the mesh's subgroups come from this group
    rank = dist.get_rank()
    results = {}
    for dtype in (torch.float64, torch.float32):
        if rank == 0:  # the truth: one process, the whole model, every rank's data
            batches = data(dtype)
            results[f"one-{dtype}"], _ = spectra(st.hessian(make_model(dtype), F.cross_entropy, sum(batches, [])))
    for name, shape in MESHES.items():
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        for dtype in DTYPES[name]:
            model = shard(make_model(dtype), mesh)
            H = st.hessian(model, F.cross_entropy, data(dtype)[rank])
            got, top = spectra(H)
            got["placements"] = sorted({str(p.placements) for p in model.parameters()})
            got["local_rows"], got["owner"] = int(top.eigenvectors.shape[0]), H.ops.owner
            block = H.as_params(top.eigenvectors)  # a block of 2: each Shard(d) becomes Shard(d + 1)
            got["as_params_block"] = sorted({(str(t.placements), tuple(t.shape)) for t in block.values()})
            got["as_params_full"] = [float(t.full_tensor().abs().sum()) for t in block.values()]
            results[f"{name}-{dtype}"] = got
    tp = init_device_mesh("cpu", (4,))
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    results.update(tensor_parallel(rank, tp, plan))
    results["caught"] = {
        "tp_data": caught(lambda: st.hessian(parallelize_module(tp_model(torch.float64), tp, plan), F.cross_entropy,
                                             data(torch.float64)[rank])),
        "tp_exact": caught(lambda: st.hessian(parallelize_module(tp_model(torch.float64), tp, plan), F.cross_entropy,
                                              sum(data(torch.float64), []), engine="double_backward")),
        "tp_seed": caught(lambda: st.hessian(parallelize_module(tp_model(torch.float64, seed=rank), tp, PLAIN), F.
                                             cross_entropy, sum(data(torch.float64), [])))}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def fsdp_tp():
        model = parallelize_module(make_model(torch.float64), mesh["tp"], plan)
        fully_shard(model, mesh=mesh["dp"])
        return st.hessian(model, F.cross_entropy, data(torch.float64)[rank])

    results["caught"]["fsdp_tp"] = caught(fsdp_tp)
    with open(os.path.join(out, f"mesh-rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
