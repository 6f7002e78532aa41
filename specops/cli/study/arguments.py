"""The options of ``specops study`` and the :class:`Config` they build (checked before anything runs)."""

from __future__ import annotations

import argparse
import dataclasses

from collections.abc import Callable
from typing import Any

from specops.cli.common import UsageError

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
    """The parser of ``python -m specops.cli.study`` (the same options as ``specops study``)."""
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
    from specops.curvature import _LEGACY_NAMES as CURVATURES

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

