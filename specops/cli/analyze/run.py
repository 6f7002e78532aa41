"""The run of ``specops analyze``, from the arguments to the summary.

Check the arguments and ``--out``, make the framework's session and operator, run the
stages in order, write ``summary.md`` and ``report.html``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from specops.cli import report as rp
from specops.cli import sessions
from specops.cli.analyze import blocks, curvature, eigen, esd, landscape, trace
from specops.cli.analyze.arguments import IDENTITY, check_args, check_data_error, check_size, settings
from specops.cli.analyze.stage import Context
from specops.cli.common import Printer, UsageError, detect_comm

if TYPE_CHECKING:
    from specops.distributed import Comm

#: The analysis stages in the order they run (training, where it applies, comes first: the session's).
STAGES = (eigen, trace, esd, curvature, blocks, landscape)


@dataclasses.dataclass
class Attempt:
    """What a run has put in ``--out`` so far, so that a failed run can take it back.

    Attributes:
        out: the output folder.
        created_folder: the run created ``out`` (it did not exist before).
        state: the run's state, once ``--out`` was checked.
    """

    out: str
    created_folder: bool = False
    state: rp.ReportState | None = None

    def clean_up(self) -> str:
        """After a failure: remove what would block a rerun; returns a note on what was kept.

        A ``results.json`` without a finished stage is removed (a rerun would be refused
        for it and it holds nothing to resume), and so is the folder if this run created
        it and it is empty. Finished stages are kept for ``--resume``.
        """
        state = self.state
        if state is None or not state.write:
            return ""
        if any(name != "blocks_partial" for name in state.data["stages"]):
            return (f"; the finished stages are kept in {state.path}: rerun with --resume to continue "
                    "them (or --overwrite to start over)")
        if state.saved and os.path.isfile(state.path):
            os.unlink(state.path)
        if self.created_folder and os.path.isdir(self.out) and not os.listdir(self.out):
            os.rmdir(self.out)
        return ""


def prepare_out(args: argparse.Namespace, comm: Comm, printer: Printer) -> rp.ReportState:
    """Check --out, and load an earlier run's state on --resume (rank 0 reads, every rank gets it).

    Args:
        args: the parsed arguments.
        comm: the communicator.
        printer: the rank-0 printer.

    Returns:
        The run's state: new, or the earlier run's on ``--resume``.

    Raises:
        UsageError: an ``--out`` that cannot be written, holds another run, or holds a run
            without ``--resume`` or ``--overwrite`` (raised on every rank).
    """
    error, data = None, None
    if comm.rank == 0:
        try:
            rp.check_writable(args.out)
            path = os.path.join(args.out, rp.RESULTS)
            if os.path.exists(path):
                if args.resume:
                    state = rp.ReportState(args.out)
                    state.load()
                    old = state.data["settings"]
                    diff = [k for k in IDENTITY if old.get(k) != getattr(args, k)]
                    if diff:
                        shown = ", ".join(f"--{k.replace('_', '-')} was {old.get(k)!r}, now {getattr(args, k)!r}"
                                          for k in diff)
                        raise UsageError(f"cannot resume the run in {args.out}: it analysed another model or data "
                                         f"({shown}); use the same arguments or another --out")
                    data = state.data
                elif not args.overwrite:
                    raise UsageError(f"--out {args.out} already holds a run ({path}); pass --resume to continue it "
                                     "or --overwrite to start over")
        except (UsageError, OSError, ValueError) as e:
            error = str(e)
    error, data = comm.bcast((error, data))
    if error:
        raise UsageError(error)
    state = rp.ReportState(args.out, write=comm.rank == 0)
    if data is not None:
        state.data = data
        printer(f"resuming the run in {args.out}: finished stages "
                f"{', '.join(s for s in state.data['stages'] if s != 'blocks_partial') or 'none'}")
    return state


def user_step(what: str, step: Callable[[], Any]) -> Any:
    """``step()``, with an error of the user's model, data or loss turned into a :class:`UsageError`.

    The frameworks and the backends raise ``TypeError``, ``ValueError``,
    :class:`~specops.NonFiniteError` ... with messages that say what to change; the
    command line prints the message alone (and the traceback with ``--debug``).

    Args:
        what: what the step does, for the message.
        step: the step.

    Returns:
        What ``step()`` returns.

    Raises:
        UsageError: ``step()`` raised (the original error is its ``__cause__``).
    """
    from specops.model import NonDeterministicError
    from specops.operator import NonFiniteError

    try:
        return step()
    except UsageError:
        raise
    except (NonFiniteError, NonDeterministicError) as e:
        raise UsageError(str(e)) from e
    except Exception as e:
        raise UsageError(f"{what} failed: {type(e).__name__}: {e}") from e


def analyze(args: argparse.Namespace, attempt: Attempt | None = None) -> int:
    """Run ``specops analyze`` with parsed arguments; returns the exit status.

    Args:
        args: the parsed arguments.
        attempt: where the run records what it wrote (for :func:`run` to clean up a failure).

    Returns:
        The exit status (0).

    Raises:
        UsageError: bad arguments, an ``--out`` that cannot be used, a model, data or loss
            that cannot be analysed (all before any product of the analysis), or an error of
            the model found during it (non-finite or non-deterministic products).
    """
    t_start = time.perf_counter()
    attempt = Attempt(args.out) if attempt is None else attempt
    check_args(args)
    if args.data is None:   # the default data's batches are known before training
        check_data_error(args, -(-args.samples // (args.batch_size or args.samples)), args.samples)
    comm = detect_comm(getattr(args, "comm", "auto"))
    printer = Printer(comm.rank, not args.no_progress)
    attempt.created_folder = comm.rank == 0 and not os.path.isdir(args.out)
    state = attempt.state = prepare_out(args, comm, printer)
    session = user_step("loading the model and data", lambda: sessions.session(args.backend, args, comm))
    block_patterns = blocks.resolve_blocks(args.blocks, session.names) if session.names is not None else None
    stages = args.stages.split(",")

    state.data["settings"] = settings(args)
    state.data["versions"] = rp.library_versions()
    if session.needs_training:
        session.train(state, args.out, printer)
    setup = user_step("building the Hessian of the model, data and loss", session.operator)
    H = setup.H
    check_size(args, int(H.shape[0]))
    check_data_error(args, H.num_batches, int(H.num_samples), H)
    if block_patterns is None:   # backends whose parameter names are known only from the operator
        block_patterns = blocks.resolve_blocks(args.blocks, session.names)
    loss = user_step("evaluating the loss", H.loss_at)
    model_info = dict(description=setup.description, num_params=int(H.shape[0]), num_samples=int(H.num_samples),
                      loss=loss, dtype=setup.dtype, engine=H.engine, ranks=comm.size,
                      blocks={name: int(s.stop - s.start) for name, s in H.param_blocks.items()})
    old = state.data.get("model") or {}
    if old.get("num_params") not in (None, model_info["num_params"]) or (
            old.get("loss") is not None and not math.isclose(old["loss"], loss, rel_tol=1e-5, abs_tol=1e-8)):
        raise UsageError(f"cannot resume the run in {args.out}: the model or data changed (it had "
                         f"{old.get('num_params')} parameters and loss {old.get('loss')}, now "
                         f"{model_info['num_params']} and {loss}); use another --out or --overwrite")
    state.data["model"] = model_info
    state.data["versions"] = rp.library_versions()
    state.save()
    printer(f"specops analyze: {rp.describe_model(state.data)}; {comm.size} rank(s); output in {args.out}")

    ctx = Context(args, H, state, printer, block_patterns)
    for stage in STAGES:
        if stage.NAME in stages:
            stage.run(ctx)
    state.data["total_seconds"] = time.perf_counter() - t_start
    state.save()
    write_summary(ctx)
    printer()
    printer(rp.summary_table(state.data))
    notes = rp.reading(state.data)
    if notes:
        printer("\n" + "\n".join(f"- {n}" for n in notes))
    printer(f"\nreport: {os.path.join(args.out, 'report.html')} and summary.md "
            f"({time.perf_counter() - t_start:.1f} s)")
    return 0


def write_summary(ctx: Context) -> None:
    """``summary.md`` and the self-contained ``report.html`` with the pictures that exist (rank 0).

    Args:
        ctx: the run's context.
    """
    if not ctx.state.write:
        return
    images = [f for f in ("esd.png", "curvature.png", "landscape.png", "blocks.png") if os.path.exists(os.path.join(ctx.out, f))]
    rp.atomic_write(os.path.join(ctx.out, "summary.md"), rp.summary_markdown(ctx.state.data, images))
    pngs = {}
    for name in images:
        with open(os.path.join(ctx.out, name), "rb") as fh:
            pngs[name] = fh.read()
    rp.atomic_write(os.path.join(ctx.out, "report.html"), rp.summary_html(ctx.state.data, pngs))


def run(args: argparse.Namespace) -> int:
    """The command's entry: :func:`analyze`, and an interrupted run says how to continue it.

    Args:
        args: the parsed arguments.

    Returns:
        The exit status: that of :func:`analyze`, 130 when interrupted.
    """
    from specops.model import NonDeterministicError
    from specops.operator import NonFiniteError

    attempt = Attempt(args.out)
    try:
        try:
            return analyze(args, attempt)
        except (NonFiniteError, NonDeterministicError) as e:   # found in a product of a stage
            raise UsageError(str(e)) from e
    except KeyboardInterrupt:
        print(f"\nspecops analyze: interrupted; finished stages are in {args.out}/{rp.RESULTS}; continue with "
              "--resume", file=sys.stderr)
        return 130
    except UsageError as e:
        note = attempt.clean_up()
        raise UsageError(f"{e}{note}") from e.__cause__
    except BaseException:
        attempt.clean_up()
        raise
