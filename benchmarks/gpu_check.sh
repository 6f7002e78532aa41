#!/usr/bin/env bash
# GPU checks, one script for a machine with a CUDA GPU (and PyTorch/JAX installed):
#   bash benchmarks/gpu_check.sh [OUTDIR]
# Runs the GPU tests, the PyTorch HVP/eigenvalue benchmark on CUDA (against PyHessian if
# importable), the JAX benchmark, and an MPI smoke test with GPU ranks where mpi4py and
# mpiexec exist. Uses the source tree directly (no install): the package is copied with
# backends/ mapped to specops/backends, as the wheel lays it out.
set -u
OUT=${1:-${OUT:-/tmp/specops-gpu}}
mkdir -p "$OUT" /tmp/specops-src
rm -rf /tmp/specops-src/specops && cp -r specops /tmp/specops-src/ && cp -r backends /tmp/specops-src/specops/backends
export PYTHONPATH=/tmp/specops-src${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi -L
python3 -c "import torch, jax; print('torch', torch.__version__, torch.cuda.is_available(), '| jax', jax.__version__, jax.devices())"
echo "== GPU tests"
timeout 240 python3 -P -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_ops.py tests/backends/test_torch.py \
    2>&1 | tee "$OUT/tests.log" | tail -15
echo "== PyTorch on CUDA: HVP engines and top eigenvalues"
timeout 400 python3 benchmarks/torch_hvp.py --device cuda --repeats 5 --pyhessian-tols 1e-3 1e-5 --pyhessian-maxiter 200 2>&1 | tee "$OUT/torch_hvp_cuda.md" | tail -40
echo "== JAX on the GPU"
timeout 120 python3 benchmarks/frameworks_hvp.py --frameworks jax,torch --repeats 20 2>&1 | tee "$OUT/frameworks_gpu.md" | tail -20
if command -v mpiexec >/dev/null && python3 -c "import mpi4py" 2>/dev/null; then
  echo "== MPI: 2 ranks sharing the GPU"
  timeout 120 mpiexec -n 2 python3 examples/mpi_hessian.py 2>&1 | tail -12
fi
echo "== torch.distributed with CUDA tensors: every split against one CPU process (1e-10)"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then  # one process per GPU over NCCL, tensors reduced on the devices
  timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/torch_worker.py cuda "$OUT" 2>&1 | tail -8
else  # NCCL refuses two ranks on one GPU: a NCCL group of one, then two ranks over gloo's CUDA path
  SPECOPS_TEST_TORCH_BACKEND=nccl timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
      tests/distributed/torch_worker.py cuda "$OUT" 2>&1 | tail -4
  SPECOPS_TEST_TORCH_BACKEND=cpu:gloo,cuda:gloo timeout 240 python3 -m torch.distributed.run --standalone \
      --nproc_per_node 2 tests/distributed/torch_worker.py cuda "$OUT" 2>&1 | tail -4
fi
echo "== CPU speed-up on dedicated cores: torchrun (gloo) and JAX host devices, 1/2/4, ResNet-20 over 1,024 samples"
timeout 480 python3 benchmarks/mpi_speedup.py --launcher torchrun --ranks 1,2,4 --reps 3 --json "$OUT/torch_speedup.json" 2>&1 | tail -6
timeout 420 python3 benchmarks/jax_devices_speedup.py --devices 1,2,4 --reps 3 --json "$OUT/jax_speedup.json" 2>&1 | tail -6
echo "== Sharded models: FSDP2 over NCCL (one process per GPU, a 1-D and an HSDP mesh), tensor parallelism over NCCL, and JAX parameters sharded over the GPUs"
if [ "$NGPU" -ge 2 ]; then
  # the test worker with NCCL: each rank its GPU; the sharded spectra against one process (written per rank)
  timeout 400 python3 - "$NGPU" "$OUT" <<'PY' 2>&1 | tail -14
import json, os, subprocess, sys
ngpu, out = int(sys.argv[1]), sys.argv[2]
script = r'''
import os, time, torch, torch.distributed as dist, torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import specops as so
from specops.backends import torch as st
import json, sys
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
kind = sys.argv[1]  # "1d": a mesh of every GPU; "hsdp": (2, size/2) (replicate, shard); "tp": tensor parallel
dist.init_process_group("nccl"); rank, size = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(rank)
mesh = init_device_mesh("cuda", (size,)) if kind in ("1d", "tp") else \
    init_device_mesh("cuda", (2, size // 2), mesh_dim_names=("replicate", "shard"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096), torch.nn.GELU(),
                            torch.nn.Linear(4096, 10)).cuda()
def draw(r):
    g = torch.Generator(device="cuda").manual_seed(r)
    return torch.randn(512, 1024, device="cuda", generator=g), torch.randint(0, 10, (512,), device="cuda", generator=g)
if kind == "tp":  # every rank all the ranks' data: the Hessian of the FSDP2 runs
    model = parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    batch = tuple(torch.cat(t) for t in zip(*[draw(r) for r in range(size)]))
else:
    for m in model:
        if isinstance(m, torch.nn.Linear): fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch = draw(rank)
H = st.hessian(model, F.cross_entropy, batch)
v = H.ops.random(H.shape[0], [0], 0)[:, 0]
def med(fn, reps=10):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2]
def fb():
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    for p in model.parameters(): p.grad = None
t_fd, t_fb = med(lambda: H @ v), med(fb)
torch.cuda.reset_peak_memory_stats()
top = so.eigsh(H, k=5, seed=0, tol=1e-4)
peak = torch.cuda.max_memory_allocated() / 2**30
same = all(x == top.eigenvalues.tolist() for x in H.ops.comm.allgather(top.eigenvalues.tolist()))
if rank == 0:
    print(f"{'TP' if kind == 'tp' else 'FSDP2'}/NCCL {kind} x{size} {tuple(mesh.shape)}: n={H.shape[0]:,} local rows {H.ops.count:,}; FD product "
          f"{t_fd*1e3:.1f} ms = {t_fd/t_fb:.2f} x forward+backward ({t_fb*1e3:.1f} ms); eigsh(k=5) "
          f"{top.eigenvalues.round(4)} converged {top.all_converged}, the same on every rank {same}, "
          f"peak {peak:.2f} GiB per GPU")
    json.dump(top.eigenvalues.tolist(), open(os.path.join(os.path.dirname(__file__), f"fsdp_nccl_{kind}.json"), "w"))
dist.destroy_process_group()
'''
path = os.path.join(out, "fsdp_nccl.py"); open(path, "w").write(script)
nproc = 4 if ngpu >= 4 else 2
for kind in ("1d", "hsdp", "tp"):  # HSDP: (2, 2) on 4 GPUs, (2, 1) (replicas only) on 2
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path,
                    kind])
one, two, tp = (json.load(open(os.path.join(out, f"fsdp_nccl_{k}.json"))) for k in ("1d", "hsdp", "tp"))
for name, other in (("HSDP", two), ("tensor parallel", tp)):
    print(f"{name} against the 1-D mesh (float32 finite differences, expect < 1e-3):",
          max(abs(a - b) for a, b in zip(one, other)) / max(abs(a) for a in one))
PY
else
  echo "   (FSDP2 over NCCL needs 2 or more GPUs; one GPU: skipped)"
fi
# JAX: the tests' worker on the GPUs instead of host devices (parameters sharded over every GPU of a mesh)
if [ "$NGPU" -ge 4 ]; then
  timeout 300 python3 tests/backends/jax_sharded_worker.py "$OUT/jax_sharded_gpu.json" 2>&1 | tail -4
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: (v['sharded']['eigenvalues'], v['eigvec_devices']) for k, v in r.items() if k != 'docs_example'})" "$OUT/jax_sharded_gpu.json"
else
  echo "   (the JAX mesh check uses 4 devices: $NGPU GPU(s) here, run on host devices instead)"
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu timeout 300 python3 tests/backends/jax_sharded_worker.py "$OUT/jax_sharded_cpu.json" 2>&1 | tail -2
fi
