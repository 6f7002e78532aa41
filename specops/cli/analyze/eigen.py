"""The ``eigen`` stage: the top ``--top-k`` eigenvalues of the Hessian, and ``eigenvectors.npy``."""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from specops.cli import report as rp

if TYPE_CHECKING:
    from specops.cli.analyze.stage import Context

NAME = "eigen"


def settings(args: argparse.Namespace) -> dict:
    """The stage's settings (also what the eigenvector landscape depends on).

    Args:
        args: the parsed arguments.

    Returns:
        The settings.
    """
    out = dict(k=args.top_k, which="LA", tol=args.eig_tol, max_matvecs=args.eig_matvecs, seed=args.seed)
    return {**out, "data_error": True} if args.data_error is not None else out


def run(ctx: Context) -> None:
    """Run the stage (or skip it when it finished earlier), record it and write ``eigenvectors.npy``.

    Args:
        ctx: the run's context.
    """
    import specops as so

    a = ctx.args
    if ctx.skip(NAME, settings(a)):
        return
    t0 = time.perf_counter()
    ctx.eig = so.eigsh(ctx.H, k=a.top_k, tol=a.eig_tol, max_matvecs=a.eig_matvecs, seed=a.seed,
                       progress=ctx.printer.bar("top eigenvalues"), data_error=a.data_error is not None)
    if ctx.state.write:
        rp.atomic_save_npy(os.path.join(ctx.out, "eigenvectors.npy"), ctx.H.ops.to_numpy(ctx.eig.eigenvectors))
    extra = {} if a.data_error is None else dict(data_target=rp.data_target(
        ctx.eig.eigenvalues, ctx.eig.data_stderr, int(ctx.H.num_samples), a.data_error))
    ctx.state.finish(NAME, settings(a), ctx.eig.to_dict(), ctx.eig.num_matvecs, time.perf_counter() - t0, **extra)


def eigenvectors(ctx: Context) -> list:
    """The top eigenvectors as backend vectors: from this run, or from ``eigenvectors.npy``.

    Args:
        ctx: the run's context.

    Returns:
        The eigenvectors, one backend vector each.
    """
    if ctx.eig is not None:
        V = ctx.eig.eigenvectors
    else:
        path = os.path.join(ctx.out, "eigenvectors.npy")
        V = ctx.H.ops.from_numpy(ctx.H.comm.bcast(np.load(path) if ctx.state.write else None))
    return [V[:, j] for j in range(V.shape[1])]
