"""The ``landscape`` stage: the loss on a line or a plane through the trained weights.

The directions are the top eigenvectors or random ones; the stage also draws ``landscape.png``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from specops.cli import report as rp
from specops.cli.analyze import eigen
from specops.cli.common import UsageError

if TYPE_CHECKING:
    from specops.cli.analyze.stage import Context

NAME = "landscape"


def auto_span(ctx: Context, directions: str) -> float:
    """The span of ``--landscape-span auto``.

    1 for filter-normalized directions (or without the eigen stage), else
    ``sqrt(4 / top eigenvalue)``, where the quadratic model rises by 2.

    Args:
        ctx: the run's context.
        directions: the directions' name (``--landscape-directions``).

    Returns:
        The span.
    """
    if directions == "filter" or "eigen" not in ctx.state.data["stages"]:
        return 1.0
    top = float(ctx.state.result("eigen")["eigenvalues"][0])
    return float(f"{math.sqrt(4.0 / top):.3g}") if top > 0 else 1.0


def run(ctx: Context) -> None:
    """Run the stage (or skip it when it finished earlier) and draw ``landscape.png``.

    Args:
        ctx: the run's context.

    Raises:
        UsageError: an eigenvector landscape without the eigen stage.
    """
    import specops as so
    from specops.landscape import Landscape, make_directions

    a = ctx.args
    if a.landscape == "none":
        return
    count = 1 if a.landscape == "1d" else 2
    directions = a.landscape_directions
    settings = dict(ndim=count, directions=directions, span=a.landscape_span, steps=a.landscape_steps, seed=a.seed,
                    bias="zero")
    if directions == "eigen":
        settings["eigen"] = eigen.settings(a)
    if settings["span"] == "auto":
        settings["span"] = auto_span(ctx, directions)
    if not ctx.skip(NAME, settings):
        if directions == "eigen":
            if not ctx.state.done("eigen", eigen.settings(a)):
                raise UsageError("the eigen landscape needs the eigen stage: add 'eigen' to --stages")
            dirs = eigen.eigenvectors(ctx)[:count]
        else:
            dirs = make_directions(ctx.H, directions, count, seed=a.seed)
            if directions == "random":   # unit directions, so the span is in parameter norm like eigenvectors
                dirs = [d * (1.0 / ctx.H.ops.norm(d)) for d in dirs]
        ls = so.landscape(ctx.H, dirs, span=settings["span"], steps=a.landscape_steps, seed=a.seed,
                          name=directions, progress=ctx.printer.bar(f"landscape {a.landscape}"))
        ctx.state.finish(NAME, settings, ls.to_dict(), 0, ls.seconds)
    ls = Landscape.from_dict(ctx.state.data["stages"][NAME]["result"])
    if ctx.state.write:
        eigenvalues = ctx.state.result("eigen")["eigenvalues"] if directions == "eigen" else None
        rp.plot_landscape(ls, os.path.join(ctx.out, "landscape.png"), eigenvalues=eigenvalues)
