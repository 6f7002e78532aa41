"""Curvature tracked over training in a plain PyTorch loop.

ResNet-8 on scikit-learn's digits, trained with SGD; after every epoch a
:class:`specops.Tracker` records the top eigenvalues, the trace (with its standard
error), the spectral density and each stage's trace into ``curvature.jsonl``. Lanczos
starts from the previous epoch's eigenvectors; the products each epoch took are printed.
Run it again with ``--resume`` after stopping it: finished epochs are kept.

Run:  python examples/torch_tracker.py [--epochs 6] [--out curvature.jsonl] [--resume]
"""

import argparse

import torch
from torch import nn

import specops
from specops.backends import torch as st
from specops.zoo.data import digits
from specops.zoo.torch_resnet import resnet


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--out", default="curvature.jsonl")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    X, y = (torch.from_numpy(a) for a in digits())
    model = resnet(8, in_channels=1, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    hessian_data = (X[:256], y[:256])

    def make_operator():
        model.eval()  # the Hessian with batch norm's running statistics; the loop sets train() again
        return st.hessian(model, loss_fn, hessian_data)

    tracker = specops.Tracker(make_operator, args.out, k=2, seed=0, resume=args.resume,
                              blocks={f"stage{s}": f"stage{s}.*" for s in (1, 2, 3)}, block_metrics=("trace",),
                              eigsh_options=dict(tol=1e-3), trace_options=dict(max_matvecs=30),
                              density_options=dict(num_probes=2, num_steps=24), progress=True)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), 64):
            idx = perm[i : i + 64]
            loss = loss_fn(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if tracker.done(epoch):  # resumed: this epoch's curvature is in the log already
            continue
        r = tracker.update(epoch, info={"loss": float(loss)})
        print(f"epoch {epoch}: top eigenvalue {r['eigenvalues'][0]:.4g}, trace {r['trace']['estimate']:.4g} "
              f"+- {r['trace']['stderr']:.2g}, stage traces "
              + ", ".join(f"{r['blocks'][s]['trace']['estimate']:.3g}" for s in r["blocks"])
              + f"; eigenvalue products {r['products']['eigenvalues']} (warm start: {r['warm_start']['operator']})")
    specops.Tracker.load(args.out).plot(args.out.replace(".jsonl", "") + ".png")
    print(f"log {args.out}, figure {args.out.replace('.jsonl', '')}.png")


if __name__ == "__main__":
    main()
