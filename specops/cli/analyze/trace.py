"""The ``trace`` stage: the trace of the Hessian (method "auto") with its standard error."""

from __future__ import annotations

import time

from specops import report as rp

NAME = "trace"


def run(ctx):
    import specops as so

    a = ctx.args
    settings = dict(method="auto", num_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed)
    if ctx.skip(NAME, settings):
        return
    bar = ctx.printer.bar("trace", a.trace_matvecs)
    t0 = time.perf_counter()
    A = rp.ProgressOperator(ctx.H, bar)
    r = so.trace(A, method="auto", num_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed)
    bar.close(f" {r.estimate:.5g} +- {r.stderr:.2g}")
    ctx.state.finish(NAME, settings, r.to_dict(), A.num_matvecs, time.perf_counter() - t0)
