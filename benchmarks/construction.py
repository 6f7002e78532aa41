"""What building a Hessian operator costs, in products: a first build and a rebuild for the same model.

The setting of issue 25: a CIFAR ResNet-20 (batch norm in eval mode), float32, 64 random
3x32x32 inputs with random labels in one batch; a tracker rebuilds the operator at every
step. Reported, as medians of ``--repeats`` interleaved runs in one process:

- one product ``H @ v`` (after the build; the cached graph exists);
- a first build (no verdict of an earlier build: ``specops.checks.VERDICTS`` cleared),
  with the time of each construction check;
- a rebuild for the same model and data (the verdicts carried over; only the loss check
  runs), and one after a parameter update (a tracker's step).

Run: ``python benchmarks/construction.py --threads 2`` (prints a Markdown table).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from specops import checks
from specops.backends import torch as st
from specops.model import ModelOperator
from specops.zoo.torch_resnet import resnet


def _timed_checks() -> dict[str, list[float]]:
    """Wrap the construction checks to record their times (seconds per call)."""
    times: dict[str, list[float]] = {}

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times.setdefault(label, []).append(time.perf_counter() - t0)

        setattr(owner, name, timed)

    wrap(ModelOperator, "_check_losses", "loss of every batch")
    wrap(st.TorchAdapter, "check_random_forward", "random forward (within the loss check's pass)")
    wrap(st.TorchAdapter, "cross_check", "two exact engines compared")
    wrap(ModelOperator, "_check_deterministic", "two identical products")
    wrap(checks, "check_engine", "symmetry + finite-difference referee")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet(20).eval()
    X, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    data, loss = (X, y), nn.CrossEntropyLoss()
    times = _timed_checks()
    st.hessian(model, loss, data)  # warm-up: allocator, first-call costs
    product, first, rebuild, stepped = [], [], [], []
    steps: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        checks.VERDICTS.clear()
        times.clear()
        t0 = time.perf_counter()
        H = st.hessian(model, loss, data)
        first.append(time.perf_counter() - t0)
        for k, v in times.items():
            steps.setdefault(k, []).append(sum(v))
        v = torch.randn(H.shape[0])
        t0 = time.perf_counter()
        H @ v
        product.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        st.hessian(model, loss, data)
        rebuild.append(time.perf_counter() - t0)
        with torch.no_grad():  # a tracker's step: new parameter values, same model
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        t0 = time.perf_counter()
        st.hessian(model, loss, data)
        stepped.append(time.perf_counter() - t0)
    p = float(np.median(product))
    print(f"ResNet-20, {args.batch} images, float32, {args.threads} threads, medians of {args.repeats}\n")
    print("| what | seconds | products |\n| --- | --- | --- |")
    print(f"| one product H @ v | {p:.3f} | 1 |")
    for label, values in [("first build", first), ("rebuild, same parameters", rebuild),
                          ("rebuild after a parameter step", stepped)]:
        m = float(np.median(values))
        print(f"| {label} | {m:.3f} | {m / p:.2f} |")
    for label, values in steps.items():
        m = float(np.median(values))
        print(f"| first build: {label} | {m:.3f} | {m / p:.2f} |")


if __name__ == "__main__":
    main()
