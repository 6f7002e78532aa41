"""How many products the tracker's warm start saves on a real training run.

ResNet-8 (batch norm, residual connections, width 8) is trained on scikit-learn's digits
for 10 epochs with the paper's schedule (lr 0.1, times 0.1 at epochs 4 and 7). Training
then goes on at the last learning rate, and a checkpoint is taken every ``gap`` SGD steps
(24 steps are one epoch). Two trackers record the top-k eigenvalues at those checkpoints,
one warm-started from the previous checkpoint's eigenvectors, one cold (seeded random
start); the products each took are printed, with how far apart their eigenvalues are.

Run:  python examples/tracker_warm_start.py [--k 3] [--tols 1e-3,1e-4] [--gaps 1,24]
"""

import argparse
import copy

import numpy as np
import torch
from torch import nn

import specops
from specops.backends import torch as st
from specops.zoo.data import digits
from specops.zoo.torch_resnet import resnet
from specops.zoo.train import fit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--tols", default="1e-3,1e-4")
    ap.add_argument("--gaps", default="1,24", help="SGD steps between checkpoints")
    ap.add_argument("--checkpoints", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    X, y = digits()
    Xtr, ytr = torch.from_numpy(X[:1500]), torch.from_numpy(y[:1500])
    model = resnet(8, in_channels=1, width=8)
    fit(model, Xtr, ytr, epochs=10, lr=0.1, batch_size=64)
    trained = copy.deepcopy(model.state_dict())
    data = (torch.from_numpy(X[:256]), torch.from_numpy(y[:256]))
    loss_fn = nn.CrossEntropyLoss()

    def make_operator():
        model.eval()
        return st.hessian(model, loss_fn, data)

    for gap in (int(g) for g in args.gaps.split(",")):
        model.load_state_dict(trained)
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(gap)
        states = []
        for _ in range(args.checkpoints):
            states.append(copy.deepcopy(model.state_dict()))
            model.train()
            for _ in range(gap):
                idx = torch.randint(0, len(Xtr), (64,), generator=gen)
                loss = loss_fn(model(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        for tol in (float(t) for t in args.tols.split(",")):
            opts = dict(k=args.k, metrics=("eigenvalues",), eigsh_options=dict(tol=tol))
            warm = specops.Tracker(make_operator, **opts)
            cold = specops.Tracker(make_operator, warm_start=False, **opts)
            totals, gaps = [0, 0], []
            for step, weights in enumerate(states):
                model.load_state_dict(weights)
                w, c = warm.update(step), cold.update(step)
                if not (all(w["converged"]) and all(c["converged"])):
                    print(f"  checkpoint {step}: not converged (warm {w['converged']}, cold {c['converged']}); "
                          "float32 products cannot reach this tolerance")
                if step > 0:
                    totals[0] += w["num_matvecs"]
                    totals[1] += c["num_matvecs"]
                gaps.append(np.max(np.abs(np.subtract(w["eigenvalues"], c["eigenvalues"])) / np.abs(c["eigenvalues"])))
            print(f"gap {gap:3d} SGD steps, tol {tol:g}, top-{args.k}: warm-started checkpoints {totals[0]} products, "
                  f"cold {totals[1]} ({100 * (1 - totals[0] / totals[1]):.0f}% fewer); eigenvalues "
                  f"{np.round(w['eigenvalues'], 4)}, warm vs cold within {max(gaps):.1e} (relative)", flush=True)


if __name__ == "__main__":
    main()
