"""The ``esd`` stage: the eigenvalue spectral density (SLQ), and ``esd.png``."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from specops.cli import report as rp

if TYPE_CHECKING:
    from specops.cli.analyze.stage import Context

NAME = "esd"


def run(ctx: Context) -> None:
    """Run the stage (or skip it when it finished earlier) and draw ``esd.png``.

    Args:
        ctx: the run's context.
    """
    import specops as so
    from specops.density import SpectralDensity

    a = ctx.args
    settings = dict(num_probes=a.esd_probes, num_steps=a.esd_steps, seed=a.seed)
    if not ctx.skip(NAME, settings):
        t0 = time.perf_counter()
        d = so.spectral_density(ctx.H, num_probes=a.esd_probes, num_steps=a.esd_steps, seed=a.seed,
                                progress=ctx.printer.bar("spectral density"))
        ctx.state.finish(NAME, settings, d.to_dict(), d.num_matvecs, time.perf_counter() - t0)
    d = SpectralDensity.from_dict(ctx.state.data["stages"][NAME]["result"])
    tops = ctx.state.result("eigen")["eigenvalues"] if "eigen" in ctx.state.data["stages"] else []
    if ctx.state.write:
        rp.plot_esd(d, list(tops), os.path.join(ctx.out, "esd.png"))
