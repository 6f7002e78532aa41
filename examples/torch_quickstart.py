"""specops with PyTorch in one minute: the Hessian spectrum of a small digits classifier.

Trains a two-layer network on scikit-learn's digits (shipped with scikit-learn, no
download) for a few seconds, then reports the top Hessian eigenvalues, the trace, a summary
of the eigenvalue spectral density, and the top eigenvalue of one layer's Hessian block.

Run: ``python examples/torch_quickstart.py``
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import specops
from specops.backends import torch as st

torch.set_num_threads(2)
torch.manual_seed(0)

# --- a model and data -----------------------------------------------------------------
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float64)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
for step in range(200):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(X), y)
    loss.backward()
    optimizer.step()
model.eval()  # specops never switches modes for you
batches = [(X[i:i + 500], y[i:i + 500]) for i in range(0, len(y), 500)]  # 4 batches, the last one smaller
print(f"trained: loss {loss.item():.4f}, {sum(p.numel() for p in model.parameters())} parameters")

# --- the Hessian of the loss over all batches, as an operator -------------------------------
H = st.hessian(model, nn.CrossEntropyLoss(), batches)
print(f"operator: {H.shape[0]} x {H.shape[1]}, engine {H.engine}, {H.num_samples} samples")

top = specops.eigsh(H, k=3, tol=1e-6)
print("top eigenvalues:", np.array2string(top.eigenvalues, precision=5), "converged:", top.converged.all())
print("eigenvectors are tensors:", type(top.eigenvectors).__name__, tuple(top.eigenvectors.shape))

tr = specops.trace(H, max_matvecs=150, seed=0)
print(f"trace: {tr.estimate:.4f} +- {tr.stderr:.4f} ({tr.num_matvecs} products)")

density = specops.spectral_density(H, num_probes=4, num_steps=40, seed=0)
grid = density.default_grid()
values = density.evaluate(grid)
negative = density.negative_fraction()  # an estimate: ± its stderr over probes, [its quadrature bracket]
print(f"spectral density: support [{density.nodes.min():.4g}, {density.nodes.max():.4g}], "
      f"peak at {grid[np.argmax(values)]:.3g}, fraction of eigenvalues <= 0: {negative}")

# --- one layer's block, and the loss along the top eigenvector -------------------------------
first = H.restrict("0.*")
print("top eigenvalue of the first layer's block:", specops.eigsh(first, k=1).eigenvalues[0].round(5))
v = top.eigenvectors[:, 0]
for t in (-0.5, 0.0, 0.5):
    print(f"loss at theta {t:+.1f} v_top: {H.loss_at(t * v):.5f}")
