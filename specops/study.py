"""``specops study``: the PyHessian paper's experiment (Yao et al. 2020) as one command.

CIFAR ResNets (depth ``6 n + 2``) with and without batch norm and residual connections,
for the whole network and per stage (:data:`specops.zoo.variants.VARIANTS`), are
trained as in the paper's appendix (SGD, momentum 0.9, the learning rate times 0.1 at
4/9 and 2/3 of the epochs, a sweep of initial rates of which the run with the best
held-out accuracy is kept, seeded). At every checkpoint of the kept run a
:class:`specops.Tracker` records the top eigenvalues, the trace with its standard error,
the spectral density and each stage's trace; at the end the loss landscape along the top
two eigenvectors is taken.

Phases (each resumable with ``--resume``, each spread over MPI ranks):

1. train every (variant, depth, learning rate); every checkpoint epoch saves the model and
   optimizer (``runs/<variant>_d<depth>/lr<lr>/epoch<e>.pt``), from which a killed run
   continues;
2. curvature of the best run of every (variant, depth) at its checkpoints
   (``curvature.jsonl``, one record per checkpoint) and its landscape (``landscape.json``);
3. rank 0 writes ``study.json``, the figures and ``summary.md``.

The embedded default runs on scikit-learn's digits with reduced depths, epochs and
checkpoints; ``--data cifar10|cifar100 --data-dir DIR`` reads the CIFAR python batches;
``--full`` is the paper's protocol (docs/study.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from specops.cli.common import UsageError, detect_comm, launched_rank0
from specops.progress import bar as progress_bar
from specops.report import atomic_savefig, atomic_write, check_writable, library_versions

FORMAT = "specops-study/1"
DATASETS = ("digits", "cifar10", "cifar100")
#: The embedded default: digits, reduced depths, epochs and checkpoints (about 6 minutes on 2 idle cores).
EMBEDDED = dict(depths=(8, 14), epochs=10, lrs=(0.1, 0.02), checkpoints=3, width=8, batch_size=64,
                hessian_samples=256, train_samples=None)
#: The paper's protocol: ResNet-20/32/38/56, 180 epochs, checkpoints every 10 epochs.
FULL = dict(depths=(20, 32, 38, 56), epochs=180, lrs=(0.1, 0.05, 0.02), checkpoints=18, width=16,
            batch_size=128, hessian_samples=5000, train_samples=None)
STAGES = ("stage1", "stage2", "stage3")
DIGITS_HELD_OUT = 297


@dataclasses.dataclass
class Config:
    """The settings of a study (what ``--resume`` checks against)."""

    data: str
    data_dir: str | None
    depths: tuple
    variants: tuple
    epochs: int
    lrs: tuple
    checkpoints: tuple
    width: int
    batch_size: int
    hessian_samples: int
    train_samples: int | None
    seed: int
    k: int
    trace_matvecs: int
    stage_trace_matvecs: int
    esd_probes: int
    esd_steps: int
    eig_tol: float
    landscape_steps: int
    landscape_span: float
    curvatures: tuple = ("hessian",)

    def to_dict(self) -> dict:
        """The settings as JSON types (tuples as lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --- arguments ------------------------------------------------------------------------------
def _list(text: str, kind: Callable[[str], Any], what: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise UsageError(f"{what} takes comma-separated {kind.__name__} values, got {text!r}") from e
    if not values:
        raise UsageError(f"{what} is empty")
    return values


HELP = "the PyHessian study: curvature of ResNets with/without batch norm and residual connections over training"
DESCRIPTION = ("The PyHessian study: Hessian spectra of CIFAR ResNets with and without batch norm and residual "
               "connections (whole network or one stage), tracked over training. Without arguments: a reduced "
               "grid on scikit-learn's digits (docs/study.md).")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m specops.study`` (the same options as ``specops study``)."""
    p = argparse.ArgumentParser(prog="specops study", description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``specops study``."""
    from specops.zoo.variants import VARIANTS

    p.add_argument("--data", default="digits", help=f"data set: {', '.join(DATASETS)} (default digits)")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py / cifar-100-python (python pickles)")
    p.add_argument("--depths", help="comma-separated depths 6n+2 (default 8,14; --full 20,32,38,56)")
    p.add_argument("--variants", help="comma-separated variants (default all but no-bn-no-res): "
                                      + ", ".join(VARIANTS))
    p.add_argument("--epochs", type=int, help="training epochs (default 10; --full 180)")
    p.add_argument("--lrs", help="comma-separated initial learning rates swept (default 0.1,0.02)")
    p.add_argument("--checkpoints", help="number of evenly spaced checkpoint epochs (ending at the last), or a "
                                         "comma-separated list of epochs (0 = at initialization); default 3")
    p.add_argument("--full", action="store_true", help="the paper's protocol (depths 20,32,38,56, 180 epochs, "
                                                       "checkpoints every 10 epochs, width 16)")
    p.add_argument("--resume", action="store_true", help="continue a killed study in --out")
    p.add_argument("--out", default="specops-study", help="output folder (default ./specops-study)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, shuffles and probes")
    p.add_argument("--width", type=int, help="channels of the first stage (default 8; --full 16)")
    p.add_argument("--batch-size", type=int, help="SGD batch size (default 64; --full 128)")
    p.add_argument("--hessian-samples", type=int, help="training images the Hessian is taken over "
                                                       "(default 256; --full 5000)")
    p.add_argument("--train-samples", type=int, help="use only the first N training images")
    p.add_argument("--k", type=int, default=2, help="top eigenvalues per checkpoint (>= 2 for the landscape)")
    p.add_argument("--trace-matvecs", type=int, default=30, help="products per trace estimate")
    p.add_argument("--stage-trace-matvecs", type=int, default=16, help="products per stage's trace estimate")
    p.add_argument("--esd-probes", type=int, default=2, help="SLQ probes per density")
    p.add_argument("--esd-steps", type=int, default=24, help="Lanczos steps per SLQ probe")
    p.add_argument("--eig-tol", type=float, default=1e-3, help="relative residual tolerance of the eigenvalues")
    p.add_argument("--landscape-steps", type=int, default=11, help="grid points per axis of the landscape")
    p.add_argument("--landscape-span", type=float, default=0.5, help="half-width of the landscape grid")
    p.add_argument("--curvature", default="hessian",
                   help="comma-separated curvatures tracked at every checkpoint: hessian (always), ggn, fisher "
                        "(empirical), mc-fisher; with ggn the trace of H - G too (default hessian)")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--split", choices=("runs", "data"), default="runs",
                   help="how ranks share the curvature: runs (each rank takes whole runs; default) or data "
                        "(every rank takes part in every run, the Hessian samples split over the ranks: "
                        "for many --hessian-samples and few runs); training is always spread by runs")
    p.add_argument("--comm", choices=("auto", "torch", "mpi", "none"), default="auto",
                   help="how processes share the runs: torch (under torchrun), mpi (mpiexec), none; "
                        "auto: whichever launched the process")


def config_from_args(args: argparse.Namespace) -> Config:
    """Check every argument and build the :class:`Config`; nothing is trained before this passes.

    Raises:
        UsageError: an unknown data set or variant, a depth that is not ``6 n + 2``, a missing
            CIFAR folder (naming the files expected), bad numbers.
    """
    from specops.zoo.variants import VARIANTS

    base: dict[str, Any] = FULL if args.full else EMBEDDED
    if args.data not in DATASETS:
        raise UsageError(f"--data {args.data!r}: choose one of {', '.join(DATASETS)}")
    if args.data == "digits" and args.data_dir:
        raise UsageError("--data-dir is for --data cifar10|cifar100; digits ship with scikit-learn")
    if args.data != "digits":
        if not args.data_dir:
            raise UsageError(f"--data {args.data} needs --data-dir DIR, the folder holding the python batches")
        from specops.zoo.data import cifar_files

        try:
            cifar_files(args.data_dir, args.data, train=None)
        except FileNotFoundError as e:
            raise UsageError(f"--data-dir {args.data_dir!r}: {e}") from e
    depths = _list(args.depths, int, "--depths") if args.depths else base["depths"]
    bad = [d for d in depths if d < 8 or (d - 2) % 6]
    if bad:
        raise UsageError(f"--depths {','.join(map(str, bad))}: a CIFAR ResNet has depth 6n+2 with n >= 1 "
                         "(8, 14, 20, 26, 32, 38, 44, 56, ...)")
    default_variants = tuple(v for v in VARIANTS if v != "no-bn-no-res")
    variants = _list(args.variants, str, "--variants") if args.variants else default_variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UsageError(f"--variants: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    epochs = base["epochs"] if args.epochs is None else args.epochs
    if epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {epochs}")
    lrs = _list(args.lrs, float, "--lrs") if args.lrs else base["lrs"]
    if any(not lr > 0 for lr in lrs):
        raise UsageError(f"--lrs must be positive, got {args.lrs}")
    checkpoints = checkpoint_epochs(args.checkpoints if args.checkpoints else str(base["checkpoints"]), epochs)
    positive = dict(width=args.width, batch_size=args.batch_size, hessian_samples=args.hessian_samples,
                    train_samples=args.train_samples, k=args.k, trace_matvecs=args.trace_matvecs,
                    esd_probes=args.esd_probes, esd_steps=args.esd_steps, landscape_steps=args.landscape_steps)
    for name, value in positive.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.k < 2:
        raise UsageError(f"--k {args.k}: the landscape needs the top two eigenvectors; use --k 2 or more")
    for name in ("trace_matvecs", "stage_trace_matvecs"):
        if getattr(args, name) < 4:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 4, got {getattr(args, name)}")
    if not args.eig_tol > 0 or not args.landscape_span > 0:
        raise UsageError("--eig-tol and --landscape-span must be positive")
    curvatures = parse_curvatures(args.curvature)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    pick = {k: (getattr(args, k) if getattr(args, k) is not None else base[k])
            for k in ("width", "batch_size", "hessian_samples", "train_samples")}
    return Config(data=args.data, data_dir=args.data_dir, depths=depths, variants=variants, epochs=epochs,
                  lrs=lrs, checkpoints=checkpoints, seed=args.seed, k=args.k, trace_matvecs=args.trace_matvecs,
                  stage_trace_matvecs=args.stage_trace_matvecs,
                  esd_probes=args.esd_probes, esd_steps=args.esd_steps, eig_tol=args.eig_tol,
                  landscape_steps=args.landscape_steps, landscape_span=args.landscape_span,
                  curvatures=curvatures, **pick)


def parse_curvatures(text: str) -> tuple:
    """``--curvature``: the Hessian first (its landscape and figures are the paper's), then the others.

    Raises:
        UsageError: an unknown name (naming the known ones).
    """
    from specops.curvature import CURVATURES

    names = [c.strip() for c in str(text).split(",") if c.strip()]
    unknown = [c for c in names if c not in CURVATURES]
    if unknown or not names:
        raise UsageError(f"--curvature: unknown curvature {unknown[0] if unknown else text!r}; choose from "
                         f"{', '.join(CURVATURES)} (comma-separated, e.g. hessian,ggn)")
    return tuple(dict.fromkeys(["hessian", *names]))


def checkpoint_epochs(text: str, epochs: int) -> tuple:
    """``"3"`` -> three evenly spaced epochs ending at ``epochs``; ``"0,5,10"`` -> those epochs.

    The last epoch is always a checkpoint (the trained model's curvature and landscape).

    Raises:
        UsageError: a count below 1 or above ``epochs``, epochs outside ``0..epochs``.
    """
    text = str(text)
    if "," not in text:
        try:
            count = int(text)
        except ValueError as e:
            raise UsageError(f"--checkpoints takes a count or comma-separated epochs, got {text!r}") from e
        if not 1 <= count <= epochs:
            raise UsageError(f"--checkpoints {count}: choose 1..{epochs} (the number of epochs)")
        return tuple(sorted({max(1, round(epochs * i / count)) for i in range(1, count + 1)}))
    values = tuple(sorted(set(_list(text, int, "--checkpoints"))))
    if values[0] < 0 or values[-1] > epochs:
        raise UsageError(f"--checkpoints epochs must lie in 0..{epochs}, got {text}")
    return tuple(sorted(set(values) | {epochs}))


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
            return json.load(fh)
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
    atomic_write(done, json.dumps(out, indent=1))
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
    chunk = 256
    batches = [(X[i : i + chunk], y[i : i + chunk]) for i in range(0, len(mine), chunk)]
    loss_fn = nn.CrossEntropyLoss()

    def make_operator() -> Any:
        return st.hessian(model, loss_fn, batches[0] if len(batches) == 1 else batches, comm=comm)

    tracker = specops.Tracker(
        make_operator, path=os.path.join(folder, "curvature.jsonl"), k=cfg.k, seed=cfg.seed,
        blocks={s: f"{s}.*" for s in STAGES}, block_metrics=("trace",), resume=True,
        block_options={"trace": dict(num_matvecs=cfg.stage_trace_matvecs)},
        eigsh_options=dict(tol=cfg.eig_tol), trace_options=dict(num_matvecs=cfg.trace_matvecs),
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
                                 kind="eigen")
        ls = land.to_dict()
        if comm is None or comm.rank == 0:
            atomic_write(path, json.dumps(ls))
    return dict(records=tracker.records, landscape=ls)


# --- the study ------------------------------------------------------------------------------
def run(cfg: Config, out: str, *, resume: bool = False, comm: Any = None, progress: bool = True,
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
                old = {"curvatures": ["hessian"], **json.load(fh)}  # studies from before --curvature
            if not resume:
                error = (f"--out {out!r} already holds a study; pass --resume to continue it or choose another "
                         "--out")
            elif old != cfg.to_dict():
                diff = sorted(k for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k))
                error = (f"--resume: the study in {out!r} was started with other settings ({', '.join(diff)}); "
                         "rerun with the same arguments or choose another --out")
        if error is None:
            atomic_write(settings_path, json.dumps(cfg.to_dict(), indent=1))
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
        atomic_write(os.path.join(out, "study.json"), json.dumps(study, indent=1))
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


# --- figures and summary --------------------------------------------------------------------
def _runs_by_depth(study: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in study["runs"].values():
        out.setdefault(r["depth"], []).append(r)
    return out


def _series(run: dict, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = np.array([c["step"] for c in run["checkpoints"]])
    if key == "trace":
        return (steps, np.array([c["trace"]["estimate"] for c in run["checkpoints"]]),
                np.array([c["trace"]["stderr"] or 0.0 for c in run["checkpoints"]]))
    return (steps, np.array([c["eigenvalues"][0] for c in run["checkpoints"]]),
            np.array([c["residuals"][0] for c in run["checkpoints"]]))


def write_figures(study: dict, out: str) -> list[str]:
    """The figures in the paper's layout; returns their file names."""
    from specops.landscape import Landscape
    from specops.report import _pyplot
    from specops.tracker import TrackerLog

    plt = _pyplot()
    images = []
    by_depth = _runs_by_depth(study)
    depths = sorted(by_depth)
    for key, name, ylabel in (("trace", "trace.png", "trace of the Hessian"),
                              ("eig", "top_eigenvalue.png", "top eigenvalue of the Hessian")):
        fig, axes = plt.subplots(1, len(depths), figsize=(4.8 * len(depths), 3.8), squeeze=False)
        for ax, d in zip(axes[0], depths):
            for r in by_depth[d]:
                s, v, e = _series(r, key)
                ax.errorbar(s, v, yerr=e, marker="o", ms=3, capsize=3, label=r["label"])
            ax.set_title(f"ResNet-{d}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            if all(np.all(_series(r, key)[1] > 0) for r in by_depth[d]):
                ax.set_yscale("log")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        atomic_savefig(fig, os.path.join(out, name))
        plt.close(fig)
        images.append(name)
    for d in depths:
        runs = by_depth[d]
        cols = max(len(r["checkpoints"]) for r in runs)
        fig, axes = plt.subplots(len(runs), cols, figsize=(2.6 * cols, 1.9 * len(runs)), squeeze=False)

        for i, r in enumerate(runs):
            dens = TrackerLog(r["checkpoints"]).densities()
            for j in range(cols):
                ax = axes[i][j]
                if j >= len(dens):
                    ax.axis("off")
                    continue
                step, dn = dens[j]
                grid = dn.default_grid()
                values = dn.evaluate(grid)
                ax.semilogy(grid, np.maximum(values, values.max() * 1e-8), lw=0.8)
                ax.tick_params(labelsize=6)
                if i == 0:
                    ax.set_title(f"epoch {step}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(r["label"], fontsize=7)
        fig.suptitle(f"ResNet-{d}: eigenvalue spectral density over training (SLQ)", fontsize=9)
        fig.tight_layout()
        name = f"esd_d{d}.png"
        atomic_savefig(fig, os.path.join(out, name))
        plt.close(fig)
        images.append(name)
    fig, axes = plt.subplots(len(depths), 1, figsize=(max(5.0, 0.9 * len(by_depth[depths[0]]) + 2),
                                                       3.4 * len(depths)), squeeze=False)
    for ax, d in zip(axes[:, 0], depths):
        runs = by_depth[d]
        x = np.arange(len(runs))
        for s, stage in enumerate(STAGES):  # type: ignore[assignment]  # s: the steps above, a stage index here
            vals = [r["checkpoints"][-1]["blocks"][stage]["trace"]["estimate"] for r in runs]
            errs = [r["checkpoints"][-1]["blocks"][stage]["trace"]["stderr"] or 0.0 for r in runs]
            ax.bar(x + (s - 1) * 0.27, vals, 0.27, yerr=errs, capsize=2, label=stage)
        ax.set_xticks(x)
        ax.set_xticklabels([r["label"] for r in runs], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"ResNet-{d}: trace per stage (last checkpoint)", fontsize=9)
        ax.axhline(0, color="0.5", lw=0.6)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out, "stage_trace.png"))
    plt.close(fig)
    images.append("stage_trace.png")
    if len(study["settings"].get("curvatures", ["hessian"])) > 1:
        images.append(_curvature_figure(study, out, plt))
    for d in depths:
        runs = by_depth[d]
        cols = min(len(runs), 3)
        rows = (len(runs) + cols - 1) // cols
        fig = plt.figure(figsize=(3.6 * cols, 3.2 * rows))
        for i, r in enumerate(runs):
            ls = Landscape.from_dict(r["landscape"])
            A, B = np.meshgrid(ls.alphas, ls.betas, indexing="ij")
            ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
            ax.plot_surface(A, B, ls.losses, cmap="viridis", linewidth=0, antialiased=True)
            ax.set_title(r["label"], fontsize=8)
            ax.set_xlabel("eigvec 1", fontsize=6)
            ax.set_ylabel("eigvec 2", fontsize=6)
            ax.tick_params(labelsize=5)
        fig.suptitle(f"ResNet-{d}: loss along the top two eigenvectors (last checkpoint)", fontsize=9)
        name = f"landscape_d{d}.png"
        atomic_savefig(fig, os.path.join(out, name))
        plt.close(fig)
        images.append(name)
    return images


def _curvature_figure(study: dict, out: str, plt: Any) -> str:
    """``curvature.png``: top eigenvalue and trace of each curvature against the epoch, per depth.

    One colour per variant; the Hessian solid, the GGN dashed, the Fishers dotted, the residual
    term ``H - G`` (trace panel) dash-dotted.
    """
    from specops.tracker import RESIDUAL, TrackerLog

    names = study["settings"]["curvatures"]
    styles = {"hessian": ("-", "o"), "ggn": ("--", "s"), "fisher": (":", "^"), "mc-fisher": (":", "v"),
              RESIDUAL: ("-.", "x")}
    by_depth = _runs_by_depth(study)
    depths = sorted(by_depth)
    fig, axes = plt.subplots(len(depths), 2, figsize=(11, 3.6 * len(depths)), squeeze=False)
    for row, d in zip(axes, depths):
        for i, r in enumerate(by_depth[d]):
            log, color = TrackerLog(r["checkpoints"]), f"C{i}"
            for c in names:
                ls, m = styles[c]
                steps, vals, _ = log.top_eigenvalues(curvature=c)
                row[0].plot(steps, vals[:, 0], ls=ls, marker=m, ms=3, color=color, label=f"{r['label']}, {c}")
            for c in [*names, RESIDUAL]:
                ls, m = styles[c]
                steps, est, err = log.traces(curvature=c)
                if steps.size:
                    row[1].errorbar(steps, est, yerr=err, ls=ls, marker=m, ms=3, capsize=2, color=color,
                                    label=f"{r['label']}, {'H - G' if c == RESIDUAL else c}")
        row[0].set_title(f"ResNet-{d}: top eigenvalue", fontsize=9)
        row[1].set_title(f"ResNet-{d}: trace", fontsize=9)
        row[1].axhline(0, color="0.5", lw=0.6)
        for ax in row:
            ax.set_xlabel("epoch")
        row[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out, "curvature.png"))
    plt.close(fig)
    return "curvature.png"


def _curvature_rows(study: dict) -> list[str]:
    """The table of every curvature's top eigenvalue and trace at the last checkpoint."""
    from specops.tracker import RESIDUAL, TrackerLog

    names = study["settings"].get("curvatures", ["hessian"])
    if len(names) < 2:
        return []
    res = "ggn" in names
    lines = ["", "## Curvatures at the last checkpoint", "",
             "| depth | variant | " + " | ".join(f"{c} top eigenvalue | {c} trace" for c in names)
             + (" | trace of H - G +- stderr |" if res else " |"),
             "|---|---|" + "---|---|" * len(names) + ("---|" if res else "")]
    for d, runs in sorted(_runs_by_depth(study).items()):
        for r in runs:
            log = TrackerLog(r["checkpoints"][-1:])
            cells = []
            for c in names:
                ev, tr = log.top_eigenvalues(curvature=c)[1], log.traces(curvature=c)[1]
                cells += [_f(ev[0, 0] if ev.size else None), _f(tr[0] if tr.size else None)]
            if res:
                _, est, err = log.traces(curvature=RESIDUAL)
                cells.append(f"{_f(est[0])} +- {_f(err[0], 2)}" if est.size else "-")
            lines.append(f"| {d} | {r['label']} | " + " | ".join(cells) + " |")
    return lines


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def summary_markdown(study: dict, images: list[str]) -> str:
    """``summary.md``: the accuracy and curvature tables, and the figures."""
    s = study["settings"]
    lines = ["# specops study", "",
             (f"Data **{s['data']}**; depths {', '.join(map(str, s['depths']))}; {s['epochs']} epochs (SGD, "
              f"momentum 0.9, lr x0.1 at 4/9 and 2/3); learning rates swept {', '.join(f'{x:g}' for x in s['lrs'])}"
              f" (best held-out accuracy kept); checkpoints at epochs {', '.join(map(str, s['checkpoints']))}; "
              f"Hessian over {s['hessian_samples']} training images; seed {s['seed']}; {study['ranks']} rank(s); "
              f"{study['seconds']['total']:.0f} s."), ""]
    by_depth = _runs_by_depth(study)
    variants = list(dict.fromkeys(r["label"] for r in study["runs"].values()))
    lines += ["## Held-out accuracy (best learning rate)", "",
              "| depth | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for d in sorted(by_depth):
        cells = {r["label"]: f"{100 * r['test_accuracy']:.1f}" for r in by_depth[d]}
        lines.append(f"| ResNet-{d} | " + " | ".join(cells.get(v, "-") for v in variants) + " |")
    lines += ["", "## Curvature at the last checkpoint", "",
              "| depth | variant | lr | train acc | test acc | top eigenvalue | trace +- stderr | "
              "stage 1 trace | stage 2 trace | stage 3 trace |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in sorted(by_depth):
        for r in by_depth[d]:
            c = r["checkpoints"][-1]
            st = [c["blocks"][x]["trace"] for x in STAGES]
            lines.append(f"| {d} | {r['label']} | {r['best_lr']:g} | {100 * r['train_accuracy']:.1f} | "
                         f"{100 * r['test_accuracy']:.1f} | {_f(c['eigenvalues'][0])} | "
                         f"{_f(c['trace']['estimate'])} +- {_f(c['trace']['stderr'], 2)} | "
                         + " | ".join(f"{_f(t['estimate'])}" for t in st) + " |")
    lines += _curvature_rows(study)
    lines += ["", "## Learning-rate sweep (held-out accuracy)", "",
              "| depth | variant | " + " | ".join(f"lr {x:g}" for x in s["lrs"]) + " |",
              "|---|---|" + "---|" * len(s["lrs"])]
    for d in sorted(by_depth):
        for r in by_depth[d]:
            lines.append(f"| {d} | {r['label']} | "
                         + " | ".join(f"{100 * r['sweep'][f'{x:g}']['test_accuracy']:.1f}" for x in s["lrs"]) + " |")
    captions = {"trace.png": "Trace vs. epoch", "top_eigenvalue.png": "Top eigenvalue vs. epoch",
                "stage_trace.png": "Stage-wise trace",
                "curvature.png": "Hessian vs. " + ", ".join(s.get("curvatures", ["hessian"])[1:]) + " over training"}
    for img in images:
        cap = captions.get(img) or (f"ESD evolution, ResNet-{img[5:-4]}" if img.startswith("esd_d")
                                    else f"Loss landscape, ResNet-{img[11:-4]}")
        lines += ["", f"## {cap}", "", f"![{img}]({img})"]
    lines += ["", "Every number with its settings: `study.json`; per run: `runs/<variant>_d<depth>/curvature.jsonl` "
              "(one record per checkpoint) and `landscape.json`."]
    return "\n".join(lines) + "\n"


# --- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m specops.study [options]``, the same as ``specops study [options]``; returns the exit status."""
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run the study for parsed arguments.

    Returns:
        0 on success, 2 for bad arguments (the message on stderr, rank 0), 130 when interrupted.
    """
    try:
        comm = detect_comm(args.comm)
    except UsageError as e:
        if launched_rank0():
            print(f"specops study: error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
        import torch

        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // comm.size))
        run(cfg, args.out, resume=args.resume, comm=comm, progress=not args.no_progress, split=args.split)
    except UsageError as e:
        if comm.rank == 0:
            print(f"specops study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nspecops study: interrupted; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
