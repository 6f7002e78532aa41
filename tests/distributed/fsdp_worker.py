"""Run under ``torchrun --nproc_per_node 2``: an FSDP2 (``fully_shard``, gloo) model against one process.

Usage: ``fsdp_worker.py MODE OUT_DIR``. ``all``: each rank holds its own, unequal data;
the sharded operator's spectra are compared (in the test) with one process holding the
whole model and all the data (the unsharded backend, exact products), in float64 and
float32; then the bad inputs, each caught and printed. ``raise``: rank 1 raises while
rank 0 waits inside a sharded product (the job must end).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import specops as so
from specops.backends import torch as st
from specops.distributed import Comm, TorchComm
from specops.sharded import gather

SIZES = ((20, 17), (14, 13))  # rank 0: 37 samples, rank 1: 27 (unequal shards)


def make_model(dtype):
    torch.manual_seed(0)
    return nn_model().to(dtype)


def nn_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))  # n = 93


def shard(model, mesh, **kw):
    fully_shard(model[0], mesh=mesh, **kw)  # model[2]'s parameters stay with the root, as a transformer's embeddings
    return fully_shard(model, mesh=mesh, **kw)  # do: FSDP2 keeps the root gathered after a forward without grad


def data(dtype):
    g = torch.Generator().manual_seed(1)
    batches = []
    for sizes in SIZES:
        batches.append([(torch.randn(s, 6, generator=g, dtype=dtype), torch.randint(0, 3, (s,), generator=g))
                        for s in sizes])
    return batches


def spectra(H):
    top = so.eigsh(H, k=2, seed=0, tol=1e-5)
    d = so.spectral_density(H, num_probes=2, num_steps=10, seed=2)
    v = H.ops.random(H.shape[0], [0], 5, distribution="normal")
    return dict(eigenvalues=top.eigenvalues.tolist(), converged=top.converged.tolist(),
                hutchinson=so.trace(H, method="hutchinson", max_matvecs=6, seed=1).estimate,
                xtrace=so.trace(H, method="xtrace", max_matvecs=12, seed=1).estimate,
                nodes=d.nodes.tolist(), weights=d.weights.tolist(),
                product=gather(H.ops, H @ v[:, 0]).tolist(), loss=H.loss_at(), gradient=gather(H.ops, H.gradient())
                .tolist()), top


def block(H):
    v = H.ops.random(H.shape[0], [0], 5)[:, 0]
    top = so.eigsh(H, k=1, seed=0, tol=1e-6)
    return dict(n=int(H.shape[0]), eigenvalue=float(top.eigenvalues[0]), product=gather(H.ops, H @ v).tolist())


def run_all(rank, out):
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for dtype in (torch.float64, torch.float32):
        batches = data(dtype)
        ref_model = make_model(dtype)
        ref = st.hessian(ref_model, F.cross_entropy, batches[0] + batches[1])  # one process, all data
        results[f"one-{dtype}"], _ = spectra(ref)
        results[f"dense-{dtype}"] = np.sort(np.linalg.eigvalsh(ref.to_dense()))[::-1][:2].tolist()
        model = shard(make_model(dtype), mesh)
        t0 = time.perf_counter()
        H = st.hessian(model, F.cross_entropy, batches[rank])
        got, top = spectra(H)
        got["seconds"] = time.perf_counter() - t0
        tree = H.as_params(top.eigenvectors[:, 0])
        got["as_params"] = {k: [type(t).__name__, str(t.placements), list(t.shape), list(t.to_local().shape)]
                            for k, t in tree.items()}
        got["params"] = {k: [type(p).__name__, str(p.placements), list(p.shape), list(p.to_local().shape)]
                         for k, p in model.named_parameters()}
        got["local_rows"], got["n"] = int(top.eigenvectors.shape[0]), int(H.shape[0])
        got["engine"] = H.adapter.engine
        results[f"sharded-{dtype}"] = got
        results[f"wrt-{dtype}"] = {  # the first layer's block: one process, wrt= and restrict on FSDP2
            "one": block(st.hessian(ref_model, F.cross_entropy, batches[0] + batches[1], wrt=["0.*"])),
            "sharded": block(st.hessian(model, F.cross_entropy, batches[rank], wrt=["0.*"])),
            "restrict": block(H.restrict("0.*"))}
    # bad input, each caught on every rank
    model = shard(make_model(torch.float64), mesh)
    H = st.hessian(model, F.cross_entropy, data(torch.float64)[rank])
    cases = {
        "partly": lambda: st.hessian(fully_shard_only_first(mesh), F.cross_entropy, data(torch.float64)[rank]),
        "bf16": lambda: st.hessian(shard(make_model(torch.float32), mesh,
                                         mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)),
                                   F.cross_entropy, data(torch.float32)[rank]),
        "comm": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank], comm=Comm()),
        "batches": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank][: rank + 1]),
        "option": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank], chunk_size=4),
        "tensor_parallel": lambda: st.hessian(parallelize_module(make_model(torch.float64), mesh, {
            "0": ColwiseParallel(), "2": RowwiseParallel()}), F.cross_entropy, data(torch.float64)[rank]),
        "ggn": lambda: st.ggn(model, F.cross_entropy, data(torch.float64)[rank]),
        "empirical_fisher": lambda: st.fisher(model, F.cross_entropy, data(torch.float64)[rank]),
        "moved": lambda: (model.float(), H @ H.ops.random(H.shape[0], [0], 0))[1],
    }
    caught = {}
    for name, fn in cases.items():
        try:
            fn()
            caught[name] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is the result
            caught[name] = f"{type(e).__name__}: {e}"
    results["caught"] = caught
    results["fsdp1"] = fsdp1_error()
    with open(os.path.join(out, f"fsdp-rank{rank}.json"), "w") as f:
        json.dump(results, f)


def fully_shard_only_first(mesh):
    model = make_model(torch.float64)
    fully_shard(model[0], mesh=mesh)
    return model


def fsdp1_error():
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        wrapped = FullyShardedDataParallel(make_model(torch.float64))
    except Exception as e:  # noqa: BLE001 - FSDP1 may not run on this build's CPU
        return f"skipped: FSDP1 cannot wrap here ({type(e).__name__})"
    try:
        st.hessian(wrapped, F.cross_entropy, data(torch.float64)[0])
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def run_raise(rank):
    mesh = init_device_mesh("cpu", (2,))
    TorchComm(mesh.get_group())  # installs the abort hook
    model = shard(make_model(torch.float64), mesh)
    H = st.hessian(model, F.cross_entropy, data(torch.float64)[rank], check_deterministic=False)
    if rank == 1:
        print(f"rank 1 raises at {time.time():.3f}", flush=True)
        raise RuntimeError("deliberate failure on rank 1")
    H @ H.ops.random(H.shape[0], [0], 0)  # rank 0 waits in FSDP's collectives for rank 1
    print("rank 0 finished a product that rank 1 never joined", flush=True)


def run_docs_example():
    """The torchrun example of docs/distributed.md, as a user runs it (its group is kept for the rest)."""
    page = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "distributed.md")).read()
    code = re.search(r"<!-- sharded-example: torch -->\s*```python\n(.*?)```", page, re.S).group(1)
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kw: None
    try:
        exec(compile(code, "docs/distributed.md (sharded-example: torch)", "exec"), {"__name__": "__main__"})
    finally:
        dist.destroy_process_group = destroy


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "all":
        run_docs_example()  # it starts the process group
        run_all(dist.get_rank(), out)
    elif mode == "raise":
        dist.init_process_group("gloo")
        run_raise(dist.get_rank())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
