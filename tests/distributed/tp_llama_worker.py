"""Run under ``torchrun --nproc_per_node 2``: a Hugging Face Llama (random weights) with tensor parallelism.

Usage: ``tp_llama_worker.py OUT_DIR``. The attention and MLP projections are split with
``parallelize_module`` (column-wise q/k/v/gate/up, row-wise o/down: placements ``Shard(0)``,
``Shard(1)``, replicated embeddings, norms and head as plain tensors), every rank with the
same token batches; rank 0 also computes one process's numbers with the whole model, by
exact products and by finite differences (the same engine as the tensor-parallel one). The
model computes its RMS norm in float32: the products are float32-accurate.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

import specops as so
from specops.backends import torch as st
from specops.sharded import gather

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False)


def make():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).double().eval()


def loss_fn(model, batch):
    logits = model(input_ids=batch[0]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten())


def plan(layers):
    out = {}
    for i in range(layers):
        out.update({f"model.layers.{i}.self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")})
        out.update({f"model.layers.{i}.mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")})
        out.update({f"model.layers.{i}.self_attn.o_proj": RowwiseParallel(),
                    f"model.layers.{i}.mlp.down_proj": RowwiseParallel()})
    return out


def numbers(H):
    v = H.ops.random(H.shape[0], [0], 3, distribution="normal")[:, 0]
    top = so.eigsh(H, k=1, seed=0, tol=1e-6, max_matvecs=120)
    return dict(loss=H.loss_at(), gradient=gather(H.ops, H.gradient()).tolist(), product=gather(H.ops, H @ v).tolist(),
                eigenvalue=float(top.eigenvalues[0]), converged=bool(top.converged[0]), n=int(H.shape[0]), rows=int(v.shape[0]))


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(1))
    batches = [(ids[:2],), (ids[2:],)]
    model = parallelize_module(make(), mesh, plan(CONFIG["num_hidden_layers"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H = st.hessian(model, loss_fn, batches)
    t0 = time.perf_counter()
    results = {"tp": numbers(H), "warnings": [str(w.message) for w in caught], "engine": H.adapter.engine,
               "placements": sorted({str(getattr(p, "placements", "plain")) for p in model.parameters()})}
    results["seconds"] = time.perf_counter() - t0
    if rank == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results["one"] = numbers(st.hessian(make(), loss_fn, batches))
            results["one_fd"] = numbers(st.hessian(make(), loss_fn, batches, engine="finite_difference"))
    with open(os.path.join(out, f"llama-rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
