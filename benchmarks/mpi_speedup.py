"""Speed-up of Hessian-vector products over MPI ranks or torchrun processes: ResNet-20 (PyTorch) on 1,024 samples.

Run ``python benchmarks/mpi_speedup.py``: it launches ``mpiexec -n P`` (or, with
``--launcher torchrun``, ``torchrun --nproc_per_node P`` on a gloo process group) for each
P of ``--ranks`` (default 1 and 2) with one thread per rank (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``), times ``--reps`` products ``H @ v`` over the same 1,024
samples sharded across the ranks, and prints the medians:

    ranks  median s/HVP  allreduce ms  speed-up  efficiency

A product's time is the slowest rank's (a barrier before each product); "CPU s/HVP" is
the slowest rank's processor time for it, which other load on the machine does not
inflate (the "CPU speed-up" is what dedicated cores would give); "allreduce ms"
is the median of one Allreduce of the n = 272,474 float32 numbers alone, the
communication part of every product. Samples are random CIFAR-shaped images (the
speed of a product does not depend on the pixel values); the model is in eval mode, so
batch norm uses running statistics and the Hessian does not depend on how the samples
are split. Goal: a speed-up of at least 1.7 on 2 ranks.

Options: ``--samples``, ``--batch-size``, ``--reps``, ``--hvp`` (PyTorch engine),
``--ranks 1,2,4``, ``--launcher mpi|torchrun``, ``--mpiexec PATH``, ``--json FILE`` (all timings).
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--hvp", default="double_backward", help="PyTorch HVP engine")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts to launch")
    p.add_argument("--launcher", default="mpi", choices=("mpi", "torchrun"),
                   help="mpiexec with MPIComm, or torchrun with TorchComm (gloo)")
    p.add_argument("--mpiexec", default=None, help="launcher (default: beside python, else PATH)")
    p.add_argument("--json", default=None, help="write all timings here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON output of one launch
    return p.parse_args(argv)


def worker(args):
    """One rank: build the sharded Hessian, time products and one bare Allreduce."""
    import torch

    from specops.backends.torch import hessian
    from specops.distributed import as_comm, shard
    from specops.zoo.torch_resnet import resnet

    torch.set_num_threads(1)
    comm = as_comm("torch" if args.launcher == "torchrun" else "mpi")
    torch.manual_seed(0)
    model = resnet(20).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.samples, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (args.samples,), generator=g)
    mine = shard(range(args.samples), comm)
    X, y = images[mine.start:mine.stop], labels[mine.start:mine.stop]
    batches = [(X[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(X), args.batch_size)]
    H = hessian(model, torch.nn.CrossEntropyLoss(), batches, comm=comm, engine=args.hvp, check_deterministic=False)
    v = H.ops.random(H.shape[0], [0], seed=0, distribution="normal")[:, 0]
    H @ v  # warm-up: allocator, kernels, cached graphs
    hvp, cpu, allreduce = [], [], []
    for _ in range(args.reps):
        comm.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        H @ v
        hvp.append(max(comm.allgather(time.perf_counter() - t0)))
        cpu.append(max(comm.allgather(time.process_time() - c0)))
    for _ in range(max(args.reps, 5)):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce(v, H.ops)
        allreduce.append(max(comm.allgather(time.perf_counter() - t0)))
    if comm.rank == 0:
        with open(args.worker, "w") as f:
            json.dump({"ranks": comm.size, "n": int(H.shape[0]), "samples_per_rank": len(X),
                       "engine": H.engine, "hvp_s": hvp, "cpu_s": cpu, "allreduce_s": allreduce,
                       "transport": comm.transport(v), "threads": torch.get_num_threads(),
                       "comm": repr(comm), "load_average": os.getloadavg()}, f)


def launch(args, ranks: int, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if args.launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU
    else:
        mpiexec = args.mpiexec or os.path.join(os.path.dirname(sys.executable), "mpiexec")
        if not os.access(mpiexec, os.X_OK):
            mpiexec = "mpiexec"
        start = [mpiexec, "-n", str(ranks), sys.executable]
    cmd = [*start, os.path.abspath(__file__), "--worker", out, "--launcher", args.launcher,
           "--samples", str(args.samples), "--batch-size", str(args.batch_size), "--reps", str(args.reps),
           "--hvp", args.hvp]
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in [int(r) for r in args.ranks.split(",")]:
            results.append(launch(args, p, os.path.join(tmp, f"ranks{p}.json")))
    base = statistics.median(results[0]["hvp_s"]) * results[0]["ranks"]
    base_cpu = statistics.median(results[0]["cpu_s"]) * results[0]["ranks"]
    print(f"{args.launcher}: {results[-1]['comm']}")
    print(f"ResNet-20, n = {results[0]['n']:,} parameters, {args.samples} samples in batches of "
          f"{args.batch_size}, engine {results[0]['engine']}, 1 thread per rank, {args.reps} products")
    print(f"{'ranks':>5}  {'median s/HVP':>12}  {'allreduce ms':>12}  {'speed-up':>8}  {'efficiency':>10}"
          f"  {'CPU s/HVP':>9}  {'CPU speed-up':>12}")
    for r in results:
        t, c = statistics.median(r["hvp_s"]), statistics.median(r["cpu_s"])
        speedup = base / t
        print(f"{r['ranks']:>5}  {t:>12.3f}  {1e3 * statistics.median(r['allreduce_s']):>12.2f}  "
              f"{speedup:>8.2f}  {speedup / r['ranks']:>10.0%}  {c:>9.3f}  {base_cpu / c:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
