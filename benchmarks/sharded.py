"""Sharded models: per-rank memory of the algorithms over 1, 2 and 4 FSDP2 processes, and product speed.

Run ``python benchmarks/sharded.py`` (CPU, gloo): for each P of ``--ranks`` (default
1,2,4) it launches ``torchrun --nproc_per_node P`` on an MLP of ``--width`` (default
n = 528,138 float32 parameters, sharded with ``fully_shard``) with ``--samples`` random
samples per rank, one thread per rank, and measures on every rank:

- the peak resident memory an algorithm adds above what the process held before it
  (``VmHWM`` after resetting it, Linux), for ``eigsh(k=5)``, ``trace(method="xtrace",
  max_matvecs=40)`` and ``spectral_density(num_probes=10, num_steps=64)``, with the
  bytes of its Krylov vectors predicted from n/P by docs/scale.md's memory model (at
  most 164 vectors for eigsh k=5 with its multiplicity check, 2.5 m + 2c = 120 for
  XTrace, 710 for SLQ 10 x 64 with all probes at once);
- the median time of a finite-difference product ``H @ v`` and of one FSDP2
  forward+backward of the same data (side by side, ``--reps`` each), and their ratio;
- the seconds the algorithms spend in their own collectives (all-reduces of scalars and
  small Gram blocks, allgathers of R factors) during ``eigsh``, against the seconds of
  its products.

It prints one line per P and writes everything with ``--json FILE``.

``--parallel tp``: the same MLP split by tensor parallelism instead (``parallelize_module``:
the first layer column-wise, the second row-wise, the last a plain tensor held by rank 0),
every rank with the same ``--samples``; "fwd+bwd" is then the tensor-parallel model's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def worker(out: str, width: int, samples: int, reps: int, parallel: str = "fsdp") -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from _common import peak_rss_kib, reset_peak_rss, timed_collectives
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import specops as so
    from specops.backends import torch as st

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (size,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.Tanh(), torch.nn.Linear(width, width // 4),
                                torch.nn.Tanh(), torch.nn.Linear(width // 4, 10))
    if parallel == "tp":
        model = parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    else:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(0 if parallel == "tp" else rank)  # tensor parallelism: one data set
    batch = (torch.randn(samples, 256, generator=g), torch.randint(0, 10, (samples,), generator=g))
    H = st.hessian(model, F.cross_entropy, batch)
    n, local = H.shape[0], H.ops.count
    comm = H.ops.comm
    spent = timed_collectives(comm)
    result = dict(ranks=size, rank=rank, n=n, local_rows=local, memory={})
    for name, fn, vectors in (
        ("eigsh(k=5)", lambda: so.eigsh(H, k=5, seed=0, tol=1e-3, max_matvecs=120), 164),
        ("trace(xtrace, 40)", lambda: so.trace(H, method="xtrace", max_matvecs=40, seed=0), 120),
        ("spectral_density(10x64)", lambda: so.spectral_density(H, num_probes=10, num_steps=64, seed=0), 710),
    ):
        import gc

        gc.collect()
        dist.barrier()
        before = reset_peak_rss()
        products0, product_seconds0 = H.num_matvecs, H.matvec_seconds
        spent.update(seconds=0.0, calls=0)
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        peak = peak_rss_kib()
        result["memory"][name] = dict(
            added_mib=None if before is None or peak is None else (peak - before) / 1024,
            krylov_mib=vectors * local * 4 / 2**20, seconds=seconds, products=H.num_matvecs - products0,
            product_seconds=H.matvec_seconds - product_seconds0, collective_seconds=spent["seconds"],
            collectives=spent["calls"])
    v = H.ops.random(n, [0], 1, distribution="normal")[:, 0]
    fd, fb = [], []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        H @ v
        fd.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        fb.append(time.perf_counter() - t0)
        for p in model.parameters():
            p.grad = None
    result.update(product_s=statistics.median(fd), forward_backward_s=statistics.median(fb),
                  ratio=statistics.median(fd) / statistics.median(fb))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--parallel", default="fsdp", choices=("fsdp", "tp"))
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.width, args.samples, args.reps, args.parallel)
        return
    runs = []
    print("ranks  n_local   algorithm                  added MiB  Krylov MiB  collectives/product-time  "
          "FD product / fwd+bwd")
    for p in map(int, args.ranks.split(",")):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p}", __file__,
                   "--worker", out, "--width", str(args.width), "--samples", str(args.samples), "--reps",
                   str(args.reps), "--parallel", args.parallel]
            env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
            subprocess.run(cmd, check=True, env=env)
            ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(p)]
        runs.append(ranks)
        r0 = ranks[0]
        for name, m in r0["memory"].items():
            worst = max(r["memory"][name]["added_mib"] or 0.0 for r in ranks)
            share = m["collective_seconds"] / max(m["product_seconds"], 1e-12)
            print(f"{p:5d}  {r0['local_rows']:8d}  {name:25s}  {worst:9.1f}  {m['krylov_mib']:10.1f}  "
                  f"{share:24.3%}  {r0['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
