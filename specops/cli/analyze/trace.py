"""The ``trace`` stage: the trace of the Hessian (method "auto") with its standard error.

With ``--data-error`` it also reports the standard error over data resampling beside the
probes' (:func:`specops.cli.report.data_target`). The stage records whether the estimate reached ``--trace-rtol`` (:func:`specops.cli.report.rtol_target`);
the table, ``summary.md`` and ``report.html`` flag it when the product budget ran out first.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from specops.cli import report as rp

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
    settings = dict(method="auto", max_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed)
    if a.data_error is not None:
        settings["data_error"] = True
    if ctx.skip(NAME, settings):
        return
    t0 = time.perf_counter()
    r = so.trace(ctx.H, method="auto", max_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed,
                 progress=ctx.printer.bar("trace"), data_error=a.data_error is not None)
    target = rp.rtol_target(r.to_dict(), a.trace_rtol)
    if not target["met"]:
        ctx.printer(f"  trace: stopped at its budget of {a.trace_matvecs} products with stderr/|trace| = "
                    f"{target['reached_rtol']:.2g}, short of --trace-rtol {a.trace_rtol:g} (raise --trace-matvecs)")
    extra = {} if a.data_error is None else dict(data_target=rp.data_target(
        [r.estimate], [r.data_stderr], int(ctx.H.num_samples), a.data_error))
    ctx.state.finish(NAME, settings, r.to_dict(), r.num_matvecs, time.perf_counter() - t0, target=target, **extra)
