"""Short, seeded PyTorch trainers for the zoo models (SGD with momentum).

- :func:`train`: a cosine schedule, for the quick runs of ``specops analyze``.
- :func:`fit`: the PyHessian paper's protocol (Yao et al. 2020, appendix): the learning rate
  times 0.1 at 4/9 and 2/3 of the epochs (80 and 120 of 180), resumable from a saved
  state, with a callback after every epoch (e.g. a :class:`specops.Tracker` update).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from specops._checks import positive_int


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in the model's current mode, without gradients.

    Args:
        model: the classifier.
        X: images.
        y: integer labels.
        batch_size: images per forward pass.

    Returns:
        The share of images whose largest logit is their label (0 for no images).
    """
    correct = 0
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            correct += int((model(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(X), 1)


def train(model: nn.Module, X: Any, y: Any, *, epochs: int = 8, batch_size: int = 64, lr: float = 0.05,
          momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
          log: Callable[[int, float, float], object] | None = None) -> dict:
    """Train a classifier with cross-entropy in place, and leave it in eval mode.

    Args:
        model: the network (trained in place).
        X: training images (a NumPy array or tensor).
        y: integer labels.
        epochs: passes over the data.
        batch_size: samples per SGD step.
        lr: initial learning rate; it follows a cosine schedule to 0.
        momentum: SGD momentum.
        weight_decay: L2 penalty of SGD.
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
    model.train()
    running = float("nan")
    for epoch in range(epochs):
        running = _epoch(model, opt, X, y, torch.randperm(len(X), generator=gen), batch_size, sched)
        if log is not None:
            model.eval()
            log(epoch + 1, running, accuracy(model, X, y))
            model.train()
    model.eval()
    return dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                seed=seed, final_loss=running, train_accuracy=accuracy(model, X, y))


def _epoch(model: nn.Module, opt: Any, X: Any, y: Any, perm: Any, batch_size: int, sched: Any = None) -> float:
    """One pass of SGD over ``X[perm]`` in batches; returns the mean training loss."""
    loss_fn = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    for i in range(0, len(X), batch_size):
        idx = perm[i : i + batch_size]
        loss = loss_fn(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def step_lr(lr: float, epoch: int, epochs: int, milestones: Sequence[float] = (4 / 9, 2 / 3),
            factor: float = 0.1) -> float:
    """The learning rate of ``epoch`` (0-based): ``lr`` times ``factor`` per milestone passed.

    Args:
        lr: the initial learning rate.
        epoch: the epoch, counted from 0.
        epochs: total epochs.
        milestones: fractions of ``epochs``: ``(4/9, 2/3)`` of 180 epochs are epochs 80 and 120.
        factor: the rate's factor at each milestone.

    Returns:
        The learning rate.
    """
    passed = sum(epoch >= round(m * epochs) for m in milestones)
    return lr * factor ** passed


def fit(model: nn.Module, X: Any, y: Any, *, epochs: int, lr: float, batch_size: int = 128, momentum: float = 0.9,
        weight_decay: float = 5e-4, milestones: Sequence[float] = (4 / 9, 2 / 3), seed: int = 0,
        state: dict | None = None, on_epoch: Callable[[int, dict], object] | None = None) -> dict:
    """Train a classifier in place with SGD and a step schedule; resumable.

    Each epoch's shuffle comes from ``(seed, epoch)``, so a run resumed from the state
    after epoch ``e`` continues exactly as the uninterrupted run would.

    Args:
        model: the network (trained in place, left in train mode).
        X: training images (a NumPy array or tensor).
        y: integer labels.
        epochs: total epochs.
        lr: initial learning rate; times 0.1 at each milestone (fractions of ``epochs``).
        batch_size: samples per SGD step.
        momentum: SGD momentum.
        weight_decay: L2 penalty of SGD.
        milestones: fractions of ``epochs`` where the rate drops.
        seed: seed of the shuffles (the model's initialization is the caller's).
        state: a dict from an earlier call's ``on_epoch`` (``"epoch"``, ``"model"``,
            ``"optimizer"``) to continue from.
        on_epoch: ``on_epoch(epoch, state)`` after every epoch (1-based ``epoch``), where
            ``state`` holds ``epoch``, ``loss``, ``lr`` and the model's and optimizer's state
            dicts (which reference the live tensors: save or copy them in the callback).

    Returns:
        ``{"epochs", "lr", "final_loss", ...}`` settings and the last training loss.

    Raises:
        ValueError: ``epochs < 1``.
    """
    epochs = positive_int("epochs", epochs)
    X, y = torch.as_tensor(np.asarray(X)), torch.as_tensor(np.asarray(y))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    start, running = 0, float("nan")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, running = int(state["epoch"]), float(state.get("loss", float("nan")))
    model.train()
    for epoch in range(start, epochs):
        rate = step_lr(lr, epoch, epochs, milestones)
        for group in opt.param_groups:
            group["lr"] = rate
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        running = _epoch(model, opt, X, y, torch.randperm(len(X), generator=gen), batch_size)
        if on_epoch is not None:
            on_epoch(epoch + 1, dict(epoch=epoch + 1, loss=running, lr=rate, model=model.state_dict(),
                                     optimizer=opt.state_dict()))
            model.train()
    return dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                milestones=list(milestones), seed=seed, final_loss=running)
