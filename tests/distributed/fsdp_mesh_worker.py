"""Run under ``torchrun --nproc_per_node 4``: FSDP2 on 2-D meshes (HSDP) against one process with all the data.

Usage: ``fsdp_mesh_worker.py OUT_DIR``. Each rank holds its own, unequal data; the model is
wrapped with ``fully_shard`` on a ``(replicate, shard)`` mesh of shapes (2, 2), (1, 4) and
(4, 1), and the sharded operator's spectra are compared (in the test) with one process
holding the whole model and all the data (the unsharded backend, exact products). Then
tensor parallelism (``parallelize_module`` on a 1-D mesh of the 4 ranks, every rank with
all the data): column- and row-wise layers (placements ``Shard(0)``, ``Shard(1)`` and a
replicated bias), and a plan that leaves a layer's parameters plain tensors; against one
process the same way. Then the same plans on a (2, 2) (dp, tp) mesh with ``fully_shard`` over
dp (``_StridedShard`` placements), each dp rank with its own data. Last the bad inputs, each
caught and printed: ranks with different data (along the tensor-parallel axis), plain
parameters that differ, fully_shard left off the root of a tensor-parallel model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings

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

SIZES = ((11, 9), (7, 8), (12, 5), (6, 10))  # each rank's two batches: 20 + 15 + 17 + 16 = 68 samples
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


def fsdp_tp(model, mesh):
    """``model`` split by tensor parallelism over the (dp, tp) mesh's second axis, fully_shard over its first."""
    fully_shard(model[0], mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"])


def extra_curvatures(model, batches):
    """The Monte-Carlo Fisher and the Hessian block of the first layer."""
    return {"mc": st.fisher(model, F.cross_entropy, batches, estimator="mc", seed=3),
            "block": st.hessian(model, F.cross_entropy, batches).restrict("0.*")}


def tensor_parallel(rank, mesh, plan, both=None):
    """Tensor-parallel spectra, GGN products and data errors; rank 0 also one process's (with all the data).

    With ``both`` (a 2-D (dp, tp) mesh), the tensor-parallel model is also sharded by
    ``fully_shard`` over the mesh's first axis, and the ranks along it hold different data.
    """
    results = {}
    for name, dtype, layers in (("tp", torch.float64, plan), ("tp", torch.float32, plan),
                                ("tp-plain", torch.float64, PLAIN)):
        batches = sum(data(dtype), [])
        model = parallelize_module(tp_model(dtype), mesh if both is None else both["tp"], layers)
        if both is not None:  # dp rank i holds the batches of ranks 2i and 2i + 1 (unequal sizes)
            name, i = f"fsdp-{name}", both.get_coordinate()[0]
            model, batches = fsdp_tp(model, both), sum(data(dtype)[2 * i : 2 * i + 2], [])
        H = st.hessian(model, F.cross_entropy, batches)
        got, top = spectra(H)
        got["engine"], got["num_samples"] = H.adapter.engine, H.num_samples
        got["data_stderr"] = so.eigsh(H, k=2, seed=0, data_error=True).data_stderr.tolist()
        G = st.ggn(model, F.cross_entropy, batches)
        got["ggn"] = gather(G.ops, G @ G.ops.random(G.shape[0], [0], 5)[:, 0]).tolist()
        got["placements"] = {k: [str(getattr(p, "placements", "plain")), list(p.shape)]
                             for k, p in model.named_parameters()}
        got["as_params"] = {k: str(getattr(t, "placements", "plain"))
                            for k, t in H.as_params(H.ops.random(H.shape[0], [0, 1], 5)).items()}
        got["local_rows"] = int(top.eigenvectors.shape[0])
        block = H.as_params(top.eigenvectors)  # a block of 2: each Shard(d) becomes Shard(d + 1)
        got["as_params_block"] = {k: str(getattr(t, "placements", "plain")) for k, t in block.items()}
        got["as_params_full"] = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t).tolist()
                                 for k, t in block.items()}
        if name == "fsdp-tp" and dtype == torch.float64:  # the MC Fisher and a block, on the (dp, tp) mesh
            for key, C in extra_curvatures(model, batches).items():
                got[key] = gather(C.ops, C @ C.ops.random(C.shape[0], [0], 5)[:, 0]).tolist()
        results[f"{name}-{dtype}"] = got
        if rank == 0 and name == "fsdp-tp" and dtype == torch.float64:  # MC labels: drawn per dp rank's batches
            halves = [sum(data(dtype)[2 * i : 2 * i + 2], []) for i in range(2)]
            sizes = [sum(int(b[0].shape[0]) for b in h) for h in halves]
            parts = [extra_curvatures(tp_model(dtype), h) for h in halves]
            for key in parts[0]:
                C1 = (parts[0][key] * (sizes[0] / sum(sizes)) + parts[1][key] * (sizes[1] / sum(sizes))
                      if key == "mc" else extra_curvatures(tp_model(dtype), sum(data(dtype), []))[key])
                results[f"one-{key}"] = C1.ops.to_numpy(C1 @ C1.ops.random(C1.shape[0], [0], 5)[:, 0]).tolist()
        if rank == 0:  # one process: the collective batches (with fully_shard, the dp ranks' i-th together)
            halves = [sum(data(dtype)[2 * i : 2 * i + 2], []) for i in range(2)]
            batches = (sum(data(dtype), []) if both is None else
                       [tuple(torch.cat(parts) for parts in zip(a, b)) for a, b in zip(*halves)])
            H1 = st.hessian(tp_model(dtype), F.cross_entropy, batches)
            one, _ = spectra(H1)
            one["num_samples"] = H1.num_samples
            one["data_stderr"] = so.eigsh(H1, k=2, seed=0, data_error=True).data_stderr.tolist()
            G1 = st.ggn(tp_model(dtype), F.cross_entropy, batches)
            one["ggn"] = G1.ops.to_numpy(G1 @ G1.ops.random(G1.shape[0], [0], 5)[:, 0]).tolist()
            one["eigenvectors"] = {k: t.tolist() for k, t in H1.as_params(so.eigsh(H1, k=2, seed=0, tol=1e-5)
                                                                         .eigenvectors).items()}
            results[f"one-{name}-{dtype}"] = one
    return results


def llama(rank, mesh):
    """A Hugging Face Llama split by tensor parallelism over ``tp`` and fully_shard over ``dp``: loss, gradient, product.

    Each dp rank holds two sequences as two batches; rank 0 also computes one process's exact
    numbers on the collective batches (the dp ranks' ``i``-th sequences together).
    """
    from tp_llama_worker import CONFIG, loss_fn, make, plan

    ids = torch.randint(0, CONFIG["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(1))
    model = parallelize_module(make(), mesh["tp"], plan(CONFIG["num_hidden_layers"]))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    i = mesh.get_coordinate()[0]

    def numbers(H):
        v = H.ops.random(H.shape[0], [0], 3, distribution="normal")[:, 0]
        return dict(loss=H.loss_at(), gradient=gather(H.ops, H.gradient()).tolist(),
                    product=gather(H.ops, H @ v).tolist(), rows=int(v.shape[0]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float32 RMS norm's precision warning (tested in test_tp_llama.py)
        results = {"fsdp_tp": numbers(st.hessian(model, loss_fn, [(ids[2 * i : 2 * i + 1],),
                                                                  (ids[2 * i + 1 : 2 * i + 2],)]))}
        if rank == 0:
            batches = [(ids[0::2],), (ids[1::2],)]
            results["one"] = numbers(st.hessian(make(), loss_fn, batches))
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
    results.update(tensor_parallel(rank, tp, plan, both=mesh))
    if importlib.util.find_spec("transformers") is not None:
        results["llama"] = llama(rank, mesh)

    def root_left_out():
        model = parallelize_module(tp_model(torch.float64), mesh["tp"], plan)
        fully_shard(model[0], mesh=mesh["dp"])
        return st.hessian(model, F.cross_entropy, sum(data(torch.float64)[:2], []))

    results["caught"]["fsdp_tp_root"] = caught(root_left_out)
    results["caught"]["fsdp_tp_data"] = caught(lambda: st.hessian(  # different data along the tensor-parallel axis
        fsdp_tp(parallelize_module(tp_model(torch.float64), mesh["tp"], plan), mesh), F.cross_entropy,
        data(torch.float64)[rank]))
    with open(os.path.join(out, f"mesh-rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
