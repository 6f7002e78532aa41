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
