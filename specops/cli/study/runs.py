"""The study's phases: training every run, the curvature of the kept runs, ``study.json``."""

from __future__ import annotations

import io
import json
import os
import time

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from specops.cli.common import UsageError
from specops.cli.report import check_writable, library_versions
from specops.cli.study.arguments import DIGITS_HELD_OUT, FORMAT, STAGES, Config
from specops.cli.study.figures import write_figures
from specops.cli.study.summary import summary_markdown
from specops.io import atomic_write, dumps, loads
from specops.progress import bar as progress_bar


# --- data and models ------------------------------------------------------------------------
def load_data(cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``(X_train, y_train, X_test, y_test, num_classes, channels)`` as NumPy arrays."""
    if cfg.data == "digits":
        from specops.zoo.data import digits

        X, y = digits(seed=cfg.seed)
        n = len(X) - DIGITS_HELD_OUT
        Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    else:
        from specops.zoo.data import cifar

        data_dir = cast(str, cfg.data_dir)  # config_from_args requires --data-dir for CIFAR
        Xtr, ytr = cifar(data_dir, cfg.data, train=True)
        Xte, yte = cifar(data_dir, cfg.data, train=False)
    if cfg.train_samples is not None:
        Xtr, ytr = Xtr[: cfg.train_samples], ytr[: cfg.train_samples]
    classes = 100 if cfg.data == "cifar100" else 10
    return Xtr, ytr, Xte, yte, classes, Xtr.shape[1]


def make_model(cfg: Config, variant: str, depth: int, classes: int, channels: int) -> Any:
    """The seeded model of one run (the same initialization for every learning rate)."""
    import torch

    from specops.zoo.torch_resnet import resnet

    torch.manual_seed(cfg.seed)
    return resnet(depth, num_classes=classes, in_channels=channels, width=cfg.width, variant=variant)


def run_name(variant: str, depth: int) -> str:
    """The folder name of a (variant, depth) under ``runs/``."""
    return f"{variant}_d{depth}"


def _lr_name(lr: float) -> str:
    return f"lr{lr:g}"


# --- phase 1: training ----------------------------------------------------------------------
def _save_torch(obj: Any, path: str) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def _checkpoint_path(folder: str, epoch: int) -> str:
    return os.path.join(folder, f"epoch{epoch:04d}.pt")


def _accuracies(model: Any, data: tuple, cfg: Config) -> dict:
    import torch

    from specops.zoo.train import accuracy

    Xtr, ytr, Xte, yte = data[:4]
    was = model.training
    model.eval()
    m = min(len(Xtr), 5000)
    out = dict(train_accuracy=accuracy(model, torch.from_numpy(Xtr[:m]), torch.from_numpy(ytr[:m])),
               test_accuracy=accuracy(model, torch.from_numpy(Xte), torch.from_numpy(yte)))
    model.train(was)
    return out


def train_run(cfg: Config, variant: str, depth: int, lr: float, data: tuple, folder: str) -> dict:
    """Train one (variant, depth, learning rate), saving every checkpoint; resumes from the last one.

    Returns:
        ``train.json``'s contents: the settings, the last loss and accuracies, per checkpoint.
    """
    import torch

    from specops.zoo.train import fit

    done = os.path.join(folder, "train.json")
    if os.path.exists(done):
        with open(done) as fh:
            return loads(fh.read())
    os.makedirs(folder, exist_ok=True)
    model = make_model(cfg, variant, depth, data[4], data[5])
    state, history = None, {}
    saved = [e for e in cfg.checkpoints if os.path.exists(_checkpoint_path(folder, e))]
    if saved:  # a killed run: continue from its last checkpoint
        state = torch.load(_checkpoint_path(folder, saved[-1]), map_location="cpu", weights_only=False)
        history = dict(state.get("history", {}))
    elif 0 in cfg.checkpoints:
        info = _accuracies(model, data, cfg) | dict(epoch=0, lr=lr, loss=None)
        history["0"] = info
        _save_torch({**info, "model": model.state_dict(), "optimizer": None, "history": history},
                    _checkpoint_path(folder, 0))
    if state is not None and state.get("optimizer") is None:
        model.load_state_dict(state["model"])
        state = None

    def on_epoch(epoch: int, st: dict) -> None:
        if epoch in cfg.checkpoints:
            info = _accuracies(model, data, cfg) | dict(epoch=epoch, lr=st["lr"], loss=st["loss"])
            history[str(epoch)] = info
            _save_torch({**st, **info, "history": history}, _checkpoint_path(folder, epoch))

    if state is None or state["epoch"] < cfg.epochs:
        fit(model, data[0], data[1], epochs=cfg.epochs, lr=lr, batch_size=cfg.batch_size, seed=cfg.seed,
            state=state, on_epoch=on_epoch)
    final = history[str(cfg.epochs)]
    out = dict(variant=variant, depth=depth, lr=lr, test_accuracy=final["test_accuracy"],
               train_accuracy=final["train_accuracy"], final_loss=final.get("loss"), checkpoints=history)
    atomic_write(done, dumps(out, indent=1))
    return out


# --- phase 2: curvature ---------------------------------------------------------------------
def curvature_run(cfg: Config, variant: str, depth: int, lr: float, data: tuple, folder: str,
                  progress: bool, comm: Any = None) -> dict:
    """The tracker log over the checkpoints of the kept run, and the landscape at the last one.

    With ``comm``, every rank of it calls this together: each takes its share of the Hessian
    samples (:func:`specops.distributed.shard_range`), the operators sum over the ranks, and
    rank 0 writes the files.
    """
    import torch
    from torch import nn

    import specops
    from specops.backends import torch as st
    from specops.distributed import shard_range

    model = make_model(cfg, variant, depth, data[4], data[5])
    m = min(cfg.hessian_samples, len(data[0]))
    mine = shard_range(m, comm)
    X, y = torch.from_numpy(data[0][mine.start : mine.stop]), torch.from_numpy(data[1][mine.start : mine.stop])
    chunk = min(256, -(-m // 8))  # 8 batches or more: the data errors' jackknife (the same on every rank count)
    batches = [(X[i : i + chunk], y[i : i + chunk]) for i in range(0, len(mine), chunk)]
    loss_fn = nn.CrossEntropyLoss()

    def make_operator() -> Any:
        return st.hessian(model, loss_fn, batches[0] if len(batches) == 1 else batches, comm=comm)

    tracker = specops.Tracker(
        make_operator, path=os.path.join(folder, "curvature.jsonl"), k=cfg.k, seed=cfg.seed,
        blocks={s: f"{s}.*" for s in STAGES}, block_metrics=("trace",), resume=True,
        block_options={"trace": dict(max_matvecs=cfg.stage_trace_matvecs)},
        eigsh_options=dict(tol=cfg.eig_tol, data_error=cfg.data_error),
        trace_options=dict(max_matvecs=cfg.trace_matvecs, data_error=cfg.data_error),
        density_options=dict(num_probes=cfg.esd_probes, num_steps=cfg.esd_steps), progress=progress,
        curvatures=cfg.curvatures, comm=comm)
    lr_folder = os.path.join(folder, _lr_name(lr))
    for epoch in cfg.checkpoints:
        if tracker.done(epoch):
            continue
        ckpt = torch.load(_checkpoint_path(lr_folder, epoch), map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        model.eval()  # the Hessian of the trained network: batch norm with its running statistics
        tracker.update(epoch, info=dict(lr=lr, loss=ckpt.get("loss"), train_accuracy=ckpt["train_accuracy"],
                                        test_accuracy=ckpt["test_accuracy"]))
    path = os.path.join(folder, "landscape.json")
    if os.path.exists(path):
        with open(path) as fh:
            ls = json.load(fh)
    else:
        H = make_operator()
        V = tracker.eigenvectors(H)
        if V is None:  # pragma: no cover - the tracker keeps them (in <log>.vectors.npz on resume)
            V = specops.eigsh(H, k=cfg.k, tol=cfg.eig_tol, seed=cfg.seed).eigenvectors
        land = specops.landscape(H, [V[:, 0], V[:, 1]], span=cfg.landscape_span, steps=cfg.landscape_steps,
                                 name="eigen")
        ls = land.to_dict()
        if comm is None or comm.rank == 0:
            atomic_write(path, dumps(ls))
    return dict(records=tracker.records, landscape=ls)


# --- the study ------------------------------------------------------------------------------
def run_study(cfg: Config, out: str, *, resume: bool = False, comm: Any = None, progress: bool = True,
        log: Callable[[str], Any] = print, split: str = "runs") -> dict:
    """Run (or continue) a study into ``out``; returns ``study.json``'s contents (on every rank).

    Training spreads the runs over the ranks; so does the curvature with ``split="runs"``,
    while ``split="data"`` has all ranks compute every run's curvature together, each on its
    share of the Hessian samples (the same numbers up to rounding). Ranks share ``out``.

    Raises:
        UsageError: ``out`` holds a study with other settings, or one and ``resume`` is False.
    """
    from specops.distributed import as_comm

    comm = as_comm(comm)
    t0 = time.perf_counter()
    settings_path = os.path.join(out, "settings.json")
    error = None
    if comm.rank == 0:
        try:
            check_writable(out)
        except OSError as e:
            error = str(e)
        if error is None and os.path.exists(settings_path):
            with open(settings_path) as fh:
                # studies from before --curvature and the data errors
                old = {"curvatures": ["hessian"], "data_error": False, **json.load(fh)}
            if not resume:
                error = (f"--out {out!r} already holds a study; pass --resume to continue it or choose another "
                         "--out")
            elif old != cfg.to_dict():
                diff = sorted(k for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k))
                error = (f"--resume: the study in {out!r} was started with other settings ({', '.join(diff)}); "
                         "rerun with the same arguments or choose another --out")
        if error is None:
            atomic_write(settings_path, dumps(cfg.to_dict(), indent=1))
    error = comm.bcast(error)
    if error:
        raise UsageError(error)
    data = load_data(cfg)
    runs_dir = os.path.join(out, "runs")
    train_tasks = [(v, d, lr) for d in cfg.depths for v in cfg.variants for lr in cfg.lrs]
    bar = progress_bar(progress, len(train_tasks), "train", unit="runs", comm=comm)
    mine: dict[tuple, dict] = {}
    for i, (v, d, lr) in enumerate(train_tasks):
        if i % comm.size == comm.rank:
            mine[(v, d, lr)] = train_run(cfg, v, d, lr, data, os.path.join(runs_dir, run_name(v, d), _lr_name(lr)))
        bar.to(i + 1)
    bar.close()
    trained = {}
    for part in comm.allgather(mine):
        trained.update(part)
    t_train = time.perf_counter() - t0
    best = {}
    for d in cfg.depths:
        for v in cfg.variants:
            results = [trained[(v, d, lr)] for lr in cfg.lrs]
            best[(v, d)] = max(results, key=lambda r: (r["test_accuracy"], -r["lr"]))["lr"]
    curv_tasks = [(v, d) for d in cfg.depths for v in cfg.variants]
    bar = progress_bar(progress, len(curv_tasks), "curvature", unit="runs", comm=comm)
    mine = {}
    together = split == "data" and comm.size > 1
    for i, (v, d) in enumerate(curv_tasks):
        if together or i % comm.size == comm.rank:
            mine[(v, d)] = curvature_run(cfg, v, d, best[(v, d)], data, os.path.join(runs_dir, run_name(v, d)),
                                         progress=False, comm=comm if together else None)
        bar.to(i + 1)
    bar.close()
    curvature: dict[tuple, dict] = {}
    for part in [mine] if together else comm.allgather(mine):
        curvature.update(part)
    study = _study_json(cfg, trained, best, curvature, comm.size)
    study["seconds"] = dict(train=t_train, total=time.perf_counter() - t0)
    study["split"] = "data" if together else "runs"
    if comm.rank == 0:
        atomic_write(os.path.join(out, "study.json"), dumps(study, indent=1))
        images = write_figures(study, out)
        atomic_write(os.path.join(out, "summary.md"), summary_markdown(study, images))
        log(f"specops study: {len(curv_tasks)} runs in {study['seconds']['total']:.0f} s; "
            f"{os.path.join(out, 'summary.md')}")
    comm.barrier()
    return study


def _study_json(cfg: Config, trained: dict, best: dict, curvature: dict, ranks: int) -> dict:
    from specops.zoo.variants import VARIANTS

    runs = {}
    for d in cfg.depths:
        for v in cfg.variants:
            lr = best[(v, d)]
            kept = trained[(v, d, lr)]
            c = curvature[(v, d)]
            runs[run_name(v, d)] = dict(
                variant=v, label=VARIANTS[v][0], depth=d, best_lr=lr, test_accuracy=kept["test_accuracy"],
                train_accuracy=kept["train_accuracy"],
                sweep={f"{lr2:g}": dict(test_accuracy=trained[(v, d, lr2)]["test_accuracy"],
                                        train_accuracy=trained[(v, d, lr2)]["train_accuracy"])
                       for lr2 in cfg.lrs},
                checkpoints=c["records"], landscape=c["landscape"])
    return dict(format=FORMAT, settings=cfg.to_dict(), ranks=ranks, versions=library_versions(), runs=runs)
