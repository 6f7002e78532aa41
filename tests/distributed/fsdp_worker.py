"""Run under ``torchrun --nproc_per_node 2``: an FSDP2 (``fully_shard``, gloo) model against one process.

Usage: ``fsdp_worker.py MODE OUT_DIR``. ``all``: each rank holds its own, unequal data;
the sharded operator's spectra are compared (in the test) with one process holding the
whole model and all the data (the unsharded backend, exact products), in float64 and
float32, for the Hessian and for the GGN and Fishers (``curvatures``); then the bad inputs,
each caught and printed. ``raise``: rank 1 raises while rank 0 waits inside a sharded
product (the job must end). ``cost``: times a GGN product against the Hessian's and one
FSDP2 forward+backward (prints JSON; not a test).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings

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


def ce3d_model(dtype):
    torch.manual_seed(0)  # logits (N, 3 classes, 2 positions): cross-entropy over axis 1 with a trailing axis
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 6),
                               torch.nn.Unflatten(1, (3, 2))).to(dtype)


# loss name -> (model, loss, targets of the class indices y)
LOSSES = {"ce": (make_model, F.cross_entropy, lambda y, dtype: y),
          "mse": (make_model, F.mse_loss, lambda y, dtype: F.one_hot(y, 3).to(dtype)),
          "ce3d": (ce3d_model, F.cross_entropy, lambda y, dtype: torch.stack([y, (y + 1) % 3], 1))}
CURVATURES = (("ggn", "ce"), ("empirical", "ce"), ("mc", "ce"), ("ggn", "mse"), ("mc", "mse"), ("ggn", "ce3d"))
CURVATURES_FLOAT32 = CURVATURES[:3]  # the FSDP2 path is the same for every loss; float64 checks them all


def curvature_of(kind, model, loss, batches, **kw):
    if kind == "ggn":
        return st.ggn(model, loss, batches, **kw)
    return st.fisher(model, loss, batches, estimator=kind, seed=3, **kw)


def curvature_numbers(G):
    top = so.eigsh(G, k=1, seed=0, tol=1e-6)
    v = G.ops.random(G.shape[0], [0], 5, distribution="normal")[:, 0]
    return dict(product=gather(G.ops, G @ v).tolist(), eigenvalue=float(top.eigenvalues[0]),
                converged=bool(top.converged[0]),
                trace=so.trace(G, method="hutchinson", max_matvecs=4, seed=1).estimate)


def one_process_curvature(kind, model, loss, per_rank):
    """The unsharded backend on all the data; the MC Fisher as data parallelism draws it (per rank's batches)."""
    if kind != "mc":
        return curvature_of(kind, model, loss, per_rank[0] + per_rank[1])
    sizes = [sum(int(b[0].shape[0]) for b in batches) for batches in per_rank]
    parts = [curvature_of(kind, model, loss, batches) * (size / sum(sizes)) for batches, size in zip(per_rank, sizes)]
    return parts[0] + parts[1]


def dense_ggn(model, batches):
    """J^T M J of the mean cross-entropy over every batch, from the unsharded model's Jacobian."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    inputs = torch.cat([b[0] for b in batches])

    def outputs(theta):
        pieces = torch.split(theta, [int(np.prod(s)) for s in shapes])
        return torch.func.functional_call(model, {n: t.view(s) for n, t, s in zip(names, pieces, shapes)},
                                          (inputs,))

    J = torch.autograd.functional.jacobian(outputs, flat)  # (N, C, n)
    p = torch.softmax(outputs(flat), dim=1)
    M = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / inputs.shape[0]
    return torch.einsum("icn,icd,idm->nm", J, M, J)


def curvatures(rank, mesh, dtype):
    """Each curvature of the FSDP2 model against one process (rank 0 computes the truths)."""
    results = {}
    for kind, loss_name in CURVATURES if dtype == torch.float64 else CURVATURES_FLOAT32:
        make, loss, targets = LOSSES[loss_name]
        per_rank = [[(x, targets(y, dtype)) for x, y in batches] for batches in data(dtype)]
        G = curvature_of(kind, shard(make(dtype), mesh), loss, per_rank[rank])
        got = curvature_numbers(G)
        got["engine"] = G.adapter.engine
        one = curvature_numbers(one_process_curvature(kind, make(dtype), loss, per_rank)) if rank == 0 else None
        results[f"{kind}-{loss_name}"] = {"sharded": got, "one": one}
        if (kind, loss_name) == ("ggn", "ce"):
            tree = G.as_params(G.ops.random(G.shape[0], [0], 5)[:, 0])
            results["as_params"] = {k: [type(t).__name__, str(t.placements), list(t.shape), list(t.to_local().shape)]
                                    for k, t in tree.items()}
            block = G.as_params(G.ops.random(G.shape[0], [0, 1], 5))  # a block of 2 columns: a leading axis
            results["as_params_block"] = {k: [str(t.placements), list(t.shape), list(t.to_local().shape)]
                                          for k, t in block.items()}
            model = G.adapter.base.model
            results["params"] = {k: [type(p).__name__, str(p.placements), list(p.shape), list(p.to_local().shape)]
                                 for k, p in model.named_parameters()}
            if rank == 0:
                dense = dense_ggn(make(dtype), per_rank[0] + per_rank[1]).double().numpy()
                dense = (dense + dense.T) / 2
                v = so.aslinearoperator(dense).ops.random(dense.shape[0], [0], 5, distribution="normal")[:, 0]
                results["dense"] = dict(product=(dense @ v).tolist(),
                                        eigenvalue=float(np.linalg.eigvalsh(dense)[-1]))
            H = st.hessian(model, loss, per_rank[rank], check_deterministic=False)
            block = {"restrict": G.restrict("0.*"),
                     "wrt": curvature_of(kind, model, loss, per_rank[rank], wrt=["0.*"], check_deterministic=False),
                     "like": st.curvature_like(H, "ggn").restrict("0.*")}
            one = curvature_of(kind, make(dtype), loss, per_rank[0] + per_rank[1], wrt=["0.*"])
            v = one.ops.random(one.shape[0], [0], 5)[:, 0]
            results["blocks"] = {k: gather(B.ops, B @ B.ops.asarray(v.numpy())).tolist() for k, B in block.items()}
            results["blocks"]["one"] = (one @ v).tolist()
    return results


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


class Float32Tanh(torch.nn.Module):
    """``tanh`` computed in float32 inside a float64 model (as Llama's RMS norm is)."""

    def forward(self, x):
        return torch.tanh(x.float()).to(x.dtype)


def low_precision(rank, mesh):
    """An FSDP2 product of a float64 model that computes a part in float32, and one process's exact one."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 9), Float32Tanh(), torch.nn.Linear(9, 3)).double()

    batches = data(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H = st.hessian(shard(make(), mesh), F.cross_entropy, batches[rank])
    v = H.ops.random(H.shape[0], [0], 5, distribution="normal")[:, 0]
    H1 = st.hessian(make(), F.cross_entropy, batches[0] + batches[1])
    return dict(product=gather(H.ops, H @ v).tolist(), one=H1.ops.to_numpy(H1 @ H1.ops.random(
        H1.shape[0], [0], 5, distribution="normal")[:, 0]).tolist(), warnings=[str(w.message) for w in caught])


def step_check(rank, mesh):
    """H.step_check on the top eigenvectors of a float32 model with large third derivatives (weights x 10)."""
    def make(dtype):
        model = make_model(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(10.0)
        return model

    batches = data(torch.float32)
    H = st.hessian(shard(make(torch.float32), mesh), F.cross_entropy, batches[rank])
    top = so.eigsh(H, k=2, seed=0, tol=1e-5)
    check = {k: np.asarray(v).tolist() for k, v in H.step_check(top.eigenvectors).items()}
    U = gather(H.ops, top.eigenvectors)
    U = U / np.linalg.norm(U, axis=0)
    H1 = st.hessian(make(torch.float64), F.cross_entropy, [(x.double(), y) for x, y in batches[0] + batches[1]])
    check["exact"] = np.einsum("ij,ij->j", U, H1.ops.to_numpy(H1 @ H1.ops.asarray(U))).tolist()
    return check


def data_errors(H):
    return dict(eigsh=so.eigsh(H, k=2, seed=0, tol=1e-6, data_error=True).data_stderr.tolist(),
                trace=float(so.trace(H, method="hutchinson", max_matvecs=20, seed=1, data_error=True).data_stderr))


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
        R = st.hessian(model, F.cross_entropy, batches[rank], richardson=True, check_deterministic=False)
        v = R.ops.random(R.shape[0], [0], 5, distribution="normal")  # the vector of spectra()'s product
        got["richardson"] = dict(product=gather(R.ops, R @ v[:, 0]).tolist(), engine=R.adapter.engine)
        results[f"sharded-{dtype}"] = got
        # data errors: the i-th batches of the ranks are one batch, as one process holding them concatenated
        g = torch.Generator().manual_seed(2)
        mine = [[(torch.randn(s, 6, generator=g, dtype=dtype), torch.randint(0, 3, (s,), generator=g)) for s in sizes]
                for sizes in ((9, 8, 10, 7, 9, 6), (6, 7, 5, 8, 4, 9))]  # six batches a rank, unequal sizes
        joined = [tuple(torch.cat(t) for t in zip(*pair)) for pair in zip(*mine)]
        results[f"data_error-{dtype}"] = {"sharded": data_errors(st.hessian(model, F.cross_entropy, mine[rank])),
                                          "one": data_errors(st.hessian(make_model(dtype), F.cross_entropy, joined))}
        results[f"wrt-{dtype}"] = {  # the first layer's block: one process, wrt= and restrict on FSDP2
            "one": block(st.hessian(ref_model, F.cross_entropy, batches[0] + batches[1], wrt=["0.*"])),
            "sharded": block(st.hessian(model, F.cross_entropy, batches[rank], wrt=["0.*"])),
            "restrict": block(H.restrict("0.*"))}
        results[f"curvatures-{dtype}"] = curvatures(rank, mesh, dtype)
    results["low_precision"] = low_precision(rank, mesh)
    results["step_check"] = step_check(rank, mesh)
    # bad input, each caught on every rank
    model = shard(make_model(torch.float64), mesh)
    H = st.hessian(model, F.cross_entropy, data(torch.float64)[rank])
    G = st.ggn(shard(make_model(torch.float64), mesh), F.cross_entropy, data(torch.float64)[rank])
    cases = {
        "partly": lambda: st.hessian(fully_shard_only_first(mesh), F.cross_entropy, data(torch.float64)[rank]),
        "bf16": lambda: st.hessian(shard(make_model(torch.float32), mesh,
                                         mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)),
                                   F.cross_entropy, data(torch.float32)[rank]),
        "comm": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank], comm=Comm()),
        "batches": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank][: rank + 1]),
        "option": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank], chunk_size=4),
        "exact": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank], engine="double_backward"),
        "progress": lambda: st.hessian(model, F.cross_entropy, data(torch.float64)[rank], progress=True),
        "ggn_progress": lambda: st.ggn(model, F.cross_entropy, data(torch.float64)[rank], progress="ggn"),
        "tensor_parallel": lambda: st.hessian(parallelize_module(make_model(torch.float64), mesh, {
            "0": ColwiseParallel(), "2": RowwiseParallel()}), F.cross_entropy, data(torch.float64)[rank]),
        "ggn_model_form": lambda: st.ggn(model, lambda module, batch: F.cross_entropy(module(batch[0]), batch[1]),
                                         data(torch.float64)[rank]),
        "ggn_reduction": lambda: st.ggn(model, lambda out, y: F.cross_entropy(out, y, reduction="sum"),
                                        data(torch.float64)[rank]),
        "mc_likelihood": lambda: st.fisher(model, F.l1_loss, data(torch.float64)[rank], estimator="mc"),
        "ggn_option": lambda: st.ggn(model, F.cross_entropy, data(torch.float64)[rank], random_layers="fixed"),
        "ggn_bf16": lambda: st.ggn(shard(make_model(torch.float32), mesh,
                                         mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)),
                                   F.cross_entropy, data(torch.float32)[rank]),
        "ggn_moved": lambda: (G.adapter.base.model.float(), G @ G.ops.random(G.shape[0], [0], 0))[1],
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


def run_cost(rank, repeats=9):
    """Seconds of one GGN product against the Hessian's and one FSDP2 forward+backward (medians, interleaved)."""
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, 10))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(512, 256, generator=g), torch.randint(0, 10, (512,), generator=g)
    H = st.hessian(model, F.cross_entropy, (x, y), check_deterministic=False)
    G = st.ggn(model, F.cross_entropy, (x, y), check_deterministic=False)
    v = H.ops.random(H.shape[0], [0], 0)[:, 0]

    def forward_backward():
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()

    timings = {"forward_backward": forward_backward, "hessian_product": lambda: H @ v, "ggn_product": lambda: G @ v}
    seconds = {k: [] for k in timings}
    for _ in range(repeats):
        for key, fn in timings.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            seconds[key].append(time.perf_counter() - t0)
    median = {k: float(np.median(t)) for k, t in seconds.items()}
    if rank == 0:
        print(json.dumps({"n": int(H.shape[0]), "median_seconds": median,
                          "ggn/forward_backward": median["ggn_product"] / median["forward_backward"],
                          "hessian/forward_backward": median["hessian_product"] / median["forward_backward"],
                          "ggn/hessian": median["ggn_product"] / median["hessian_product"]}), flush=True)


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
    elif mode == "cost":  # not a test: the measurement of docs/distributed.md
        dist.init_process_group("gloo")
        run_cost(dist.get_rank())
    elif mode == "raise":
        dist.init_process_group("gloo")
        run_raise(dist.get_rank())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
