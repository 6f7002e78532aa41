"""Loss landscapes of a small ResNet on digits: along the top Hessian eigenvectors and along
filter-normalized random directions (Li et al. 2018), saved as landscape_example.png.

Run: python examples/landscape.py   (about half a minute on two CPU cores)
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from specops.backends import torch as st

import specops as so
from specops.zoo.data import digits
from specops.zoo.torch_resnet import resnet
from specops.zoo.train import train

torch.set_num_threads(1)
torch.manual_seed(0)
X, y = digits()
model = resnet(8, in_channels=1, width=8, num_classes=10)
train(model, X[:1500], y[:1500], epochs=4)                      # leaves the model in eval mode
data = (torch.from_numpy(X[:256]), torch.from_numpy(y[:256]))
H = st.hessian(model, torch.nn.CrossEntropyLoss(), data)

top = so.eigsh(H, k=2, tol=1e-3)
print("top eigenvalues:", top.eigenvalues)
line = so.landscape(H, top, span=0.5, steps=21)                  # 1-D along the top eigenvector
plane = so.landscape(H, "filter-2d", span=1.0, steps=15, seed=0)  # 2-D, filter-normalized

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
line.plot(ax=axes[0])
plane.plot(ax=axes[1])
fig.tight_layout()
fig.savefig("landscape_example.png", dpi=110)
print("loss at the weights:", line.center_loss, "; saved landscape_example.png")
