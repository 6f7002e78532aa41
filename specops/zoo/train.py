"""A short, seeded PyTorch trainer for the zoo models (SGD with momentum, cosine schedule)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in the model's current mode, without gradients."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            correct += int((model(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(X), 1)


def train(model: nn.Module, X, y, *, epochs: int = 8, batch_size: int = 64, lr: float = 0.05,
          momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, log=None) -> dict:
    """Train a classifier with cross-entropy in place, and leave it in eval mode.

    Args:
        model: the network (trained in place).
        X, y: training images and integer labels (NumPy arrays or tensors).
        epochs, batch_size, lr, momentum, weight_decay: the SGD settings; the learning
            rate follows a cosine schedule to 0.
        seed: seed of the initial shuffle order (the model's initialization is the caller's).
        log: optional ``log(epoch, loss, accuracy)`` after each epoch.

    Returns:
        ``{"epochs", "final_loss", "train_accuracy", ...}`` for the report.
    """
    X, y = torch.as_tensor(np.asarray(X)), torch.as_tensor(np.asarray(y))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * ((len(X) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    running = float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            loss = loss_fn(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        running = total / count
        if log is not None:
            model.eval()
            log(epoch + 1, running, accuracy(model, X, y))
            model.train()
    model.eval()
    return dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                seed=seed, final_loss=running, train_accuracy=accuracy(model, X, y))
