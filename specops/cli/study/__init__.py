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
import os
import sys

from specops.cli.common import UsageError, detect_comm, launched_rank0
from specops.cli.study.arguments import (DESCRIPTION, HELP, Config, add_arguments, build_parser, checkpoint_epochs,
                                         config_from_args, parse_curvatures)
from specops.cli.study.runs import curvature_run, load_data, make_model, run_name, run_study, train_run
from specops.cli.study.summary import summary_markdown

__all__ = ["DESCRIPTION", "HELP", "Config", "add_arguments", "build_parser", "checkpoint_epochs", "config_from_args",
           "curvature_run", "load_data", "main", "make_model", "parse_curvatures", "run", "run_command", "run_name",
           "run_study", "summary_markdown", "train_run"]


def run(args: argparse.Namespace) -> int:
    """``specops study``: run the study for parsed arguments (bad arguments: exit status 2).

    Args:
        args: the parsed arguments of ``specops study``.

    Returns:
        The exit status.
    """
    return run_command(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m specops.cli.study [options]``, the same as ``specops study [options]``; returns the exit status."""
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
        run_study(cfg, args.out, resume=args.resume, comm=comm, progress=not args.no_progress, split=args.split)
    except UsageError as e:
        if comm.rank == 0:
            print(f"specops study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nspecops study: interrupted; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    return 0
