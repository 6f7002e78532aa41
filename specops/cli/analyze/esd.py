"""The ``esd`` stage: the eigenvalue spectral density (SLQ), and ``esd.png``."""

from __future__ import annotations

import os
import time

from specops import report as rp

NAME = "esd"


def run(ctx):
    import specops as so
    from specops.density import SpectralDensity

    a = ctx.args
    settings = dict(num_probes=a.esd_probes, num_steps=a.esd_steps, seed=a.seed)
    if not ctx.skip(NAME, settings):
        bar = ctx.printer.bar("spectral density", a.esd_probes * min(a.esd_steps, ctx.H.shape[0]))
        t0 = time.perf_counter()
        A = rp.ProgressOperator(ctx.H, bar)
        d = so.spectral_density(A, num_probes=a.esd_probes, num_steps=a.esd_steps, seed=a.seed)
        bar.close()
        ctx.state.finish(NAME, settings, d.to_dict(), A.num_matvecs, time.perf_counter() - t0)
    d = SpectralDensity.from_dict(ctx.state.data["stages"][NAME]["result"])
    tops = ctx.state.result("eigen")["eigenvalues"] if "eigen" in ctx.state.data["stages"] else []
    if ctx.state.write:
        rp.plot_esd(d, list(tops), os.path.join(ctx.out, "esd.png"))
