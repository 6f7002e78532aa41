"""The ``blocks`` stage: the top eigenvalue and the trace of each block's Hessian.

The blocks are ``--blocks``; the stage also draws ``blocks.png``. Each finished block is
recorded at once (``blocks_partial``), so a resumed run continues with the next block.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from specops.cli import report as rp
from specops.cli.common import UsageError

if TYPE_CHECKING:
    from specops.cli.analyze.stage import Context

NAME = "blocks"


def resolve_blocks(spec: str, names: list[str]) -> dict:
    """``--blocks`` -> block name -> list of patterns, checked against the parameter names.

    Raises:
        UsageError: a block that matches no parameter, ``stages`` for a model that is not a
            zoo ResNet, or an empty list.
    """
    from specops.model import select_names

    spec = spec.strip()
    if spec == "none":
        return {}
    tops = list(dict.fromkeys(n.split(".")[0] for n in names))
    if spec in ("auto", "stages"):
        if spec == "stages" and not {"stage1", "stage2", "stage3"} <= set(tops):
            raise UsageError("--blocks stages needs a ResNet from specops.zoo.torch_resnet (modules stem, stage1, "
                             f"stage2, stage3, head); this model's top-level modules are: {', '.join(tops)}")
        return {t: [t] for t in tops} if len(tops) > 1 else {}
    blocks = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            select_names(names, item)
        except ValueError:
            raise UsageError(f"unknown block {item!r}: no parameter name starts with it or matches it; the "
                             f"model's top-level modules are: {', '.join(tops)}") from None
        blocks[item] = [item]
    if not blocks:
        raise UsageError("--blocks is empty; pass 'none' to skip the per-block analysis")
    return blocks


def run(ctx: Context) -> None:
    """Run the stage (or skip it when it finished earlier) and draw ``blocks.png``.

    Args:
        ctx: the run's context.
    """
    import specops as so

    a = ctx.args
    if not ctx.blocks:
        ctx.printer("  blocks: none (a single top-level module; name blocks with --blocks)")
        return
    settings = dict(blocks=ctx.blocks, k=1, tol=a.eig_tol, max_matvecs=a.eig_matvecs,
                    trace_method="auto", trace_matvecs=a.block_trace_matvecs, rtol=a.trace_rtol, seed=a.seed)
    if not ctx.skip(NAME, settings):
        partial = ctx.state.data["stages"].get("blocks_partial")
        done = partial["result"] if partial and partial.get("settings") == rp._to_jsonable(settings) else {}
        t0 = time.perf_counter()
        total = 0
        for name, patterns in ctx.blocks.items():
            if name in done:
                ctx.printer(f"  block {name}: finished earlier, skipped")
                total += done[name]["num_matvecs"]
                continue
            tb = time.perf_counter()
            Hb = ctx.H.restrict(patterns)
            e = so.eigsh(Hb, k=1, tol=a.eig_tol, max_matvecs=a.eig_matvecs, seed=a.seed,
                         progress=ctx.printer.bar(f"block {name}: top"))
            te = time.perf_counter()
            t = so.trace(Hb, method="auto", max_matvecs=min(a.block_trace_matvecs, 3 * Hb.shape[0]),
                         rtol=a.trace_rtol, seed=a.seed, progress=ctx.printer.bar(f"block {name}: trace"))
            products = e.num_matvecs + t.num_matvecs
            done[name] = dict(num_params=int(Hb.shape[0]), eigen=e.to_dict(), trace=t.to_dict(),
                              trace_target=rp.rtol_target(t.to_dict(), a.trace_rtol),
                              num_matvecs=products, seconds=time.perf_counter() - tb,
                              eigen_seconds=te - tb, trace_seconds=time.perf_counter() - te)
            total += products
            ctx.state.finish("blocks_partial", settings, done, total, time.perf_counter() - t0)
        seconds = sum(b["seconds"] for b in done.values())
        ctx.state.finish(NAME, settings, done, total, seconds)
        ctx.state.data["stages"].pop("blocks_partial", None)
        ctx.state.save()
    if ctx.state.write:
        rp.plot_blocks(ctx.state.data["stages"][NAME]["result"], os.path.join(ctx.out, "blocks.png"))
