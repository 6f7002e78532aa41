"""The ``trace`` stage: the trace of the Hessian (method "auto") with its standard error."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specops.cli.analyze.stage import Context

NAME = "trace"


def run(ctx: Context) -> None:
    """Run the stage (or skip it when it finished earlier) and record its result.

    Args:
        ctx: the run's context.
    """
    import specops as so

    a = ctx.args
    settings = dict(method="auto", num_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed)
    if ctx.skip(NAME, settings):
        return
    t0 = time.perf_counter()
    r = so.trace(ctx.H, method="auto", num_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed,
                 progress=ctx.printer.bar("trace"))
    ctx.state.finish(NAME, settings, r.to_dict(), r.num_matvecs, time.perf_counter() - t0)
