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
