"""The Hessian spectrum of a small PyTorch network, with the data sharded over MPI ranks or torchrun processes.

Run with any number of ranks (or none)::

    mpiexec -n 2 python examples/mpi_hessian.py
    torchrun --nproc_per_node 2 examples/mpi_hessian.py
    python examples/mpi_hessian.py

Every rank holds the whole model and its own share of scikit-learn's digits; a
Hessian-vector product is the sample-weighted sum of the ranks' products (one Allreduce).
The algorithms run on every rank from the same seed, so all ranks hold the same results;
rank 0 prints them. With GPUs, each rank takes the GPU of its local rank.
"""

import time

import torch
from sklearn.datasets import load_digits

import specops
from specops.backends.torch import hessian
from specops.distributed import gpu_index, shard, world

comm = world()  # TorchComm under torchrun, MPIComm under mpiexec/srun, the single-process Comm otherwise
torch.set_num_threads(1)
device = torch.device("cuda", gpu_index(torch.cuda.device_count(), comm)) if torch.cuda.is_available() else "cpu"

# The same model on every rank: same seed, same initial weights (or load a checkpoint).
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
model = model.double().to(device)

X, y = load_digits(return_X_y=True)
dataset = torch.utils.data.TensorDataset(torch.tensor(X / 16.0), torch.tensor(y))
loader = torch.utils.data.DataLoader(shard(dataset, comm), batch_size=100)  # this rank's samples

t0 = time.perf_counter()
H = hessian(model, torch.nn.CrossEntropyLoss(), loader, comm=comm)
top = specops.eigsh(H, k=5, seed=0)
tr = specops.trace(H, max_matvecs=60, seed=0)
density = specops.spectral_density(H, num_probes=4, num_steps=40, seed=0)
seconds = time.perf_counter() - t0

if comm.rank == 0:
    print(f"{comm.size} rank(s), {H.num_samples} samples ({len(loader.dataset)} on rank 0), "
          f"{H.shape[0]} parameters, transport: {comm.transport(H.params_vector())}")
    print("top eigenvalues:", " ".join(f"{v:.6f}" for v in top.eigenvalues))
    print(f"trace ({tr.settings.get('estimator', tr.settings['method'])}): {tr.estimate:.4f} +- {tr.stderr:.4f}")
    lo, hi = float(density.nodes.min()), float(density.nodes.max())
    print(f"spectral density: nodes in [{lo:.4f}, {hi:.4f}]")
    print(f"{H.num_matvecs} Hessian-vector products in {seconds:.1f} s")
