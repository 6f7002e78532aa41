"""The options of ``specops analyze`` and the checks made before any computation."""

from __future__ import annotations

import argparse
from typing import Any

from specops.cli import report as rp
from specops.cli.common import UsageError, number
from specops.cli.sessions import BACKENDS

HELP = "one command from model to a complete curvature report"
DESCRIPTION = ("Top eigenvalues, trace, spectral density, per-block curvature and the loss landscape of a model's "
               "loss Hessian, written to --out (results.json, esd.png, landscape.png, blocks.png, summary.md). "
               "Without --model: a small ResNet trained on digits.")
DEFAULT_OUT = "specops-report"
LOSSES = ("cross_entropy", "mse")
LANDSCAPES = ("none", "1d", "2d")
#: ``--data-error`` without a value: the fraction of the estimate the report's sample count aims at.
DATA_ERROR_FRACTION = 0.05
#: Settings that identify the model and data; a resumed run must share them.
IDENTITY = ("model", "data", "loss", "checkpoint", "backend", "dtype", "samples", "batch_size", "epochs", "seed")


def span(text: str) -> Any:
    """``--landscape-span``: ``auto`` or a positive number.

    Args:
        text: the argument.

    Returns:
        ``"auto"`` or the number.
    """
    return "auto" if text == "auto" else number(float, 0, exclusive=True)(text)


def add_arguments(a: argparse.ArgumentParser) -> None:
    """Add the options of ``specops analyze`` to its subparser ``a``.

    Args:
        a: the subparser.
    """
    g = a.add_argument_group("model and data")
    g.add_argument("--model", metavar="MODULE:CALLABLE",
                   help="callable returning the model (torch: an nn.Module; jax: (apply_fn, params); tensorflow: "
                        "a keras Model); default: a ResNet-8 trained on digits")
    g.add_argument("--data", metavar="MODULE:CALLABLE",
                   help="callable returning the data: one batch (inputs, targets) or a list of batches; "
                        "default: digits (with the default model)")
    g.add_argument("--loss", default="cross_entropy",
                   help=f"{' or '.join(LOSSES)}, or MODULE:CALLABLE returning the batch mean: loss(outputs, "
                        "targets) for torch and jax, loss(targets, outputs) (Keras order) for tensorflow")
    g.add_argument("--checkpoint", metavar="PATH", help="torch state_dict to load into the model")
    g.add_argument("--backend", choices=tuple(BACKENDS), default="torch",
                   help="the framework of --model, --data and --loss (docs/cli.md gives each one's callables)")
    g.add_argument("--device", default="auto", help="torch device (cpu, cuda, cuda:1); auto: cuda if available")
    g.add_argument("--comm", choices=("auto", "torch", "mpi", "none"), default="auto",
                   help="how processes combine their shards: torch (torch.distributed, under torchrun), mpi "
                        "(mpiexec), none; auto: whichever launched this process")
    g.add_argument("--dtype", choices=("model", "float32", "float64"), default="model",
                   help="floating dtype of the analysis (model: the model's own)")
    g.add_argument("--samples", type=number(int, 1), default=512,
                   help="default data: training images the Hessian is taken over")
    g.add_argument("--batch-size", type=number(int, 1), default=None,
                   help="default data: split the samples into batches of this size")
    g.add_argument("--epochs", type=number(int, 0), default=8, help="default model: training epochs")
    g.add_argument("--threads", type=number(int, 1), default=None,
                   help="torch CPU threads per process (default: 1 for the default model, whose 8x8 "
                        "convolutions gain nothing from more; torch's own choice otherwise, divided by the "
                        "number of MPI ranks)")
    g = a.add_argument_group("analysis")
    g.add_argument("--blocks", default="auto",
                   help="per-block analysis: 'auto' (top-level modules), 'stages' (ResNet stem, stage1..3, "
                        "head), 'none', or comma-separated module prefixes / glob patterns")
    g.add_argument("--top-k", type=number(int, 1), default=3, help="top eigenvalues of the full Hessian")
    g.add_argument("--eig-tol", type=number(float, 0, exclusive=True), default=1e-3,
                   help="relative residual tolerance of the eigenvalues")
    g.add_argument("--eig-matvecs", type=number(int, 1), default=500, help="product budget of each eigsh")
    g.add_argument("--trace-rtol", type=number(float, 0, exclusive=True), default=0.02,
                   help="stop the trace estimate once stderr <= rtol * |trace|")
    g.add_argument("--trace-matvecs", type=number(int, 3), default=200, help="product budget of the trace")
    g.add_argument("--block-trace-matvecs", type=number(int, 3), default=60,
                   help="product budget of each block's trace")
    g.add_argument("--curvature", default="hessian",
                   help="operators to analyse side by side: hessian, ggn (Gauss-Newton), empirical_fisher, "
                        "mc_fisher (Monte-Carlo), comma-separated, e.g. hessian,ggn: top eigenvalues and "
                        "densities of each, the trace of H - G, curvature.png")
    g.add_argument("--fisher-datum", choices=("sample", "term"), default="sample",
                   help="what one datum of the empirical Fisher (--curvature empirical_fisher) is: a sample, or a loss "
                        "term "
                        "(each position of outputs with extra axes; the per-term scaling of curvlinops' "
                        "EFLinearOperator); see docs/curvature.md")
    g.add_argument("--esd-probes", type=number(int, 1), default=5, help="SLQ probe vectors")
    g.add_argument("--esd-steps", type=number(int, 2), default=64, help="Lanczos steps per SLQ probe")
    g.add_argument("--landscape", choices=LANDSCAPES, default="2d", help="loss landscape: none, a line or a plane")
    g.add_argument("--landscape-directions", choices=("eigen", "filter", "random"), default="eigen",
                   help="top eigenvectors, filter-normalized random (Li et al. 2018), or unit random")
    g.add_argument("--landscape-span", type=span, default="auto",
                   help="half-width of the landscape grid in units of the directions; auto: 1 for filter-"
                        "normalized directions (Li et al.), else sqrt(4 / top eigenvalue), where the quadratic "
                        "model rises by 2")
    g.add_argument("--landscape-steps", type=number(int, 2, maximum=201), default=21, help="grid points per axis")
    g.add_argument("--learning-rate", type=number(float, 0, exclusive=True), default=None,
                   help="the learning rate the model was trained with: the report compares the top eigenvalue "
                        "with 2 (1 + momentum) / learning rate (the default model's is known)")
    g.add_argument("--momentum", type=number(float, 0), default=0.0,
                   help="the momentum of that training (heavy ball), for the same comparison")
    g.add_argument("--seed", type=number(int, 0), default=0, help="seed of every random choice")
    g.add_argument("--data-error", type=number(float, 0, exclusive=True, maximum=1), nargs="?",
                   const=DATA_ERROR_FRACTION, default=None, metavar="FRACTION",
                   help="also the eigenvalues' and the trace's standard errors over data resampling (the data "
                        "as several batches), and the samples that would bring them under FRACTION of the "
                        f"estimate (default {DATA_ERROR_FRACTION:g}; an estimate, assuming 1/sqrt(samples))")
    g = a.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out, skipping finished stages")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run")
    g.add_argument("--stages", default=",".join(rp.STAGES[1:]),
                   help="comma-separated stages to run (others are skipped)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    g.add_argument("--debug", action="store_true",
                   help="on an error, print the traceback of its cause before the message")


def check_args(args: argparse.Namespace) -> None:
    """Checks across options, before any computation; normalizes ``args.stages``.

    Args:
        args: the parsed arguments.

    Raises:
        UsageError: an unknown stage, a 2-D eigenvector landscape with one eigenvector, or
            ``--resume`` with ``--overwrite``.
    """
    from specops.cli.analyze import curvature

    curvature.check(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in rp.STAGES]
    if unknown:
        raise UsageError(f"--stages: unknown stage {unknown[0]!r}; stages are {', '.join(rp.STAGES[1:])}")
    # stages that cannot run with these options are not recorded among the settings as if they ran
    ran = [s for s in stages if not ((s == "curvature" and not curvature.wanted(args))
                                     or (s == "landscape" and args.landscape == "none")
                                     or (s == "blocks" and args.blocks.strip() == "none"))]
    args.stages = ",".join(ran)
    if args.landscape == "2d" and args.landscape_directions == "eigen" and args.top_k < 2 and "landscape" in stages:
        raise UsageError("--landscape 2d along eigenvectors needs --top-k >= 2 (or --landscape-directions filter)")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")


def check_size(args: argparse.Namespace, n: int) -> None:
    """Checks that need the number of parameters ``n``, made as soon as the operator exists.

    Args:
        args: the parsed arguments.
        n: the operator's size (parameters analysed).

    Raises:
        UsageError: ``--top-k`` larger than ``n``.
    """
    if args.top_k > n:
        raise UsageError(f"--top-k {args.top_k}: the model has only {n} parameters; pass --top-k {n} or less")


def check_data_error(args: argparse.Namespace, batches: int, samples: int, H: Any = None) -> None:
    """``--data-error`` needs the data as two batches or more, or one batch it can split.

    Checked before training for the default data (its batches follow from ``--samples`` and
    ``--batch-size``), and once the operator ``H`` exists: data as one batch is split into
    sub-batches (:func:`specops.data_error.model_operator`), which is tried here, before any
    product of the analysis.

    Args:
        args: the parsed arguments.
        batches: the data's batches (over every rank).
        samples: the data's samples.
        H: the model operator, once built.

    Raises:
        UsageError: ``--data-error`` with the data as one sample, or as one batch that cannot
            be split, saying what to pass.
    """
    from specops.data_error import MIN_BATCHES, model_operator

    if args.data_error is None or batches >= MIN_BATCHES:
        return
    if args.data is None:
        fix = f"pass a smaller --batch-size (e.g. --batch-size {max(1, samples // 8)} for 8 batches)"
    else:
        fix = "let --data return a list of batches (e.g. 8), or a DataLoader"
    if samples < MIN_BATCHES:
        fix = "pass more samples (--samples), in batches" if args.data is None else "let --data return more samples"
        raise UsageError(f"--data-error measures the spread of the results over the data's samples and needs at "
                         f"least {MIN_BATCHES}; the data is {batches} batch of {samples} sample(s): {fix}")
    if H is not None:
        try:
            model_operator(H, "analyze")
        except ValueError as err:
            raise UsageError(f"--data-error with the data as {batches} batch of {samples} sample(s): {err}; here: "
                             f"{fix}") from err


def settings(args: argparse.Namespace) -> dict:
    """The settings recorded in results.json: every option but those about the output.

    Args:
        args: the parsed arguments.

    Returns:
        Option name -> value.
    """
    keys = [k for k in vars(args) if k not in ("command", "resume", "overwrite", "no_progress", "out", "debug")]
    return {k: getattr(args, k) for k in keys}
