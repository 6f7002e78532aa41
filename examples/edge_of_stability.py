"""The edge of stability, reproduced with specops' tracker on scikit-learn's digits.

Full-batch gradient descent on a small tanh network at three learning rates: the top
Hessian eigenvalue (the sharpness) rises during training (progressive sharpening) until it
reaches 2 / lr, then hovers there (Cohen et al. 2021). Full-batch Adam at two learning rates:
the top eigenvalue of the preconditioned Hessian P^-1 H, P = diag(sqrt(v_hat) + eps), settles
near (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr, while the raw sharpness does not follow any
such line (Cohen et al. 2022).

Every step is one ``Tracker.update``: the top eigenvalue of H (and of P^-1/2 H P^-1/2 for
Adam) by Lanczos to a relative residual of 1e-3, warm-started from the eigenvector of two
steps before (at the edge of stability the top eigenvector alternates from step to step), the threshold, the loss and
the gradient's alignment with the top eigenvector. Logs go to ``--out`` (JSON lines, one
per run), figures and a summary JSON beside them.

    python examples/edge_of_stability.py                      # the default: 5 runs, docs/dynamics.md
    python examples/edge_of_stability.py --steps 100 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import specops as so
from specops.backends import torch as st

GD_RATES = (0.4, 0.5, 0.7)
ADAM_RATES = (1e-2, 2e-2)


def digits(num_samples: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized digits (64 features) and one-hot targets, the first ``num_samples``."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:num_samples], y[:num_samples]
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    return torch.tensor(X, dtype=torch.float32), torch.nn.functional.one_hot(torch.tensor(y), 10).float()


def network(seed: int = 0, width: int = 32) -> torch.nn.Module:
    """A tanh network 64-width-width-10 (3.5 k parameters at width 32)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                               torch.nn.Tanh(), torch.nn.Linear(width, 10))


def square_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Half the squared error, summed over classes, averaged over samples (Cohen et al.'s MSE)."""
    return 0.5 * ((outputs - targets) ** 2).sum(1).mean()


def run(optimizer: str, lr: float, steps: int, path: str, *, seed: int = 0, tol: float = 1e-3,
        num_samples: int = 1000, warm_lag: int | str = "auto", compare: bool = False) -> dict:
    """Train with full-batch ``optimizer`` (``"gd"`` or ``"adam"``) and track every step.

    Args:
        optimizer: ``"gd"`` (torch.optim.SGD without momentum) or ``"adam"``.
        lr: the learning rate.
        steps: number of steps.
        path: the tracker log (JSON lines; replaced).
        seed: the network's and the tracker's seed.
        tol: Lanczos' relative residual.
        num_samples: training samples.
        warm_lag: the tracker's warm start (``"auto"``, the tracker's default, or a number of steps back).
        compare: also run, at every step, eigsh warm-started from the previous step's eigenvector
            and a cold eigsh, to count their products and compare their eigenvalues.

    Returns:
        A summary: products per step (the tracker's; the comparisons' when asked), seconds, the last loss.
    """
    X, Y = digits(num_samples)
    model = network(seed)
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "gd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    if os.path.exists(path):
        os.remove(path)
    extra = {} if optimizer == "gd" else {"preconditioner": lambda H: st.preconditioner(opt, H)}
    tracker = so.Tracker(lambda: st.hessian(model, square_loss, (X, Y)), path, metrics="eigenvalues", k=1,
                         seed=seed, eigsh_options={"tol": tol}, warm_lag=warm_lag,
                         threshold=lambda: st.stability_threshold(opt), dynamics=True, **extra)
    cold, lag1, previous, t0 = [], [], None, time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        square_loss(model(X), Y).backward()
        opt.step()
        record = tracker.update(step)
        if compare:
            H = st.hessian(model, square_loss, (X, Y))
            res = so.eigsh(H, k=1, tol=tol, seed=seed)
            cold.append((res.num_matvecs, float(res.eigenvalues[0])))
            res = so.eigsh(H, k=1, tol=tol, seed=seed, v0=previous)
            previous = res.eigenvectors
            lag1.append((res.num_matvecs, float(res.eigenvalues[0])))
        if not np.isfinite(record["loss"]) or record["loss"] > 1e6:
            break
    warm = [r["products"]["eigenvalues"] for r in tracker.records]
    found = np.array([r["eigenvalues"][0] for r in tracker.records])
    # a Ritz value never exceeds lambda_1: the largest of the three starts is the best estimate
    best = np.maximum(found, np.maximum([c[1] for c in cold], [c[1] for c in lag1])) if cold else found
    compared = {} if not cold else {
        "cold_products_per_step": float(np.mean([c[0] for c in cold])),
        "previous_step_start_products_per_step": float(np.mean([c[0] for c in lag1])),
        # steps where a start found a pair below the best by more than 2 tol (another eigenvalue)
        "steps_below_best": {name: int(np.sum(v < best * (1 - 2 * tol))) for name, v in
                             (("tracker", found), ("cold", np.array([c[1] for c in cold])),
                              ("previous_step", np.array([c[1] for c in lag1])))},
        "largest_shortfall": {name: float(np.max(1 - v / best)) for name, v in
                              (("tracker", found), ("cold", np.array([c[1] for c in cold])),
                               ("previous_step", np.array([c[1] for c in lag1])))},
    }
    return {**compared, "optimizer": optimizer, "lr": lr, "steps": len(tracker.records), "path": path,
            "products_per_step": float(np.mean(warm)), "products_first_step": warm[0],
            "products_after_first": float(np.mean(warm[1:])) if len(warm) > 1 else None,
            "all_converged": all(all(r["converged"]) for r in tracker.records),
            "seconds": time.perf_counter() - t0, "final_loss": tracker.records[-1]["loss"]}


def analyze(path: str, optimizer: str, lr: float, tail: int = 200) -> dict:
    """The numbers docs/dynamics.md quotes, read from a run's log.

    ``sharpness`` is lambda_1(H) for GD and lambda_1(P^-1 H) for Adam, ``threshold`` the
    run's (2/lr, 38/lr). Returns the first and largest sharpness, its lowest value in the first
    100 steps (Adam's starts far above its threshold, v being tiny after one step) and the first
    step after that where it is within 5 % of the threshold, its median / threshold (and the
    10-90 % range) over the last ``tail`` steps, the raw lambda_1(H) at the start and end, the loss at the start and end,
    the fraction of steps after the first crossing where the loss went up, and the median
    gradient alignment with the top eigenvector before and after the crossing.
    """
    data = so.TrackerLog.read(path).sharpness()
    sharp = data["sharpness"] if optimizer == "gd" else data["preconditioned"]
    thr = data["threshold"]
    low = int(np.nanargmin(sharp[:100]))
    near = np.nonzero(sharp[low:] >= 0.95 * thr[low:])[0]
    first = low + int(near[0]) if near.size else None
    ratio = sharp[-tail:] / thr[-tail:]
    loss, align = data["loss"], data["alignment"]
    after = slice(first, None) if first is not None else slice(len(loss), None)
    return {
        "optimizer": optimizer, "lr": lr, "threshold": float(thr[-1]), "sharpness_first": float(sharp[0]),
        "sharpness_max": float(np.nanmax(sharp)),
        "sharpness_low": [low, float(sharp[low])], "step_within_5pct": first,
        "tail_median_over_threshold": float(np.median(ratio)),
        "tail_p10_p90_over_threshold": [float(np.percentile(ratio, 10)), float(np.percentile(ratio, 90))],
        "raw_sharpness_first_last": [float(data["sharpness"][0]), float(data["sharpness"][-1])],
        "loss_first_last": [float(loss[0]), float(loss[-1])],
        "loss_up_fraction_after": float(np.mean(np.diff(loss[after]) > 0)) if first is not None else None,
        "alignment_median_before_after": [float(np.median(align[:first])) if first else None,
                                          float(np.median(align[after])) if first is not None else None],
    }


def figure(summaries: list[dict], path: str) -> None:
    """Sharpness against the step with each run's threshold; GD left, Adam right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for s in summaries:
        log = so.TrackerLog.read(s["path"])
        data = log.sharpness()
        if s["optimizer"] == "gd":
            line = axes[0].plot(data["step"], data["sharpness"], label=f"GD lr={s['lr']}")[0]
            axes[0].axhline(2 / s["lr"], color=line.get_color(), ls="--", lw=0.8)
        else:
            line = axes[1].semilogy(data["step"], data["preconditioned"], label=f"Adam lr={s['lr']}: P^-1 H")[0]
            axes[1].axhline(38 / s["lr"], color=line.get_color(), ls="--", lw=0.8)
            axes[2].plot(data["step"], data["sharpness"], color=line.get_color(), label=f"Adam lr={s['lr']}: H")
    axes[0].set_title("GD: lambda_1(H), dashed 2/lr")
    axes[1].set_title("Adam: lambda_1(P^-1 H), dashed 38/lr")
    axes[2].set_title("Adam: raw lambda_1(H)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run the five trainings (or the ones asked for), write logs, figure and summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--adam-steps", type=int, default=None, help="default: --steps")
    parser.add_argument("--out", default="eos_runs")
    parser.add_argument("--quick", action="store_true", help="one GD and one Adam run")
    parser.add_argument("--compare", action="store_true",
                        help="count the products of a cold start and of a previous-step start at each step")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    gd, adam = (GD_RATES[1:2], ADAM_RATES[:1]) if args.quick else (GD_RATES, ADAM_RATES)
    summaries = []
    for name, rates, steps in (("gd", gd, args.steps), ("adam", adam, args.adam_steps or args.steps)):
        for lr in rates:
            s = run(name, lr, steps, os.path.join(args.out, f"{name}_lr{lr}.jsonl"), compare=args.compare)
            print(json.dumps(s))
            summaries.append(s)
    figure(summaries, os.path.join(args.out, "edge_of_stability.png"))
    analyses = [analyze(s["path"], s["optimizer"], s["lr"]) for s in summaries]
    for a in analyses:
        print(json.dumps(a))
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump({"runs": summaries, "analysis": analyses}, fh, indent=1)


if __name__ == "__main__":
    main()
