"""The ``specops`` command line.

``specops analyze`` turns a model into a complete curvature report (docs/cli.md);
``specops study`` runs the PyHessian paper's experiment (:mod:`specops.cli.study`,
docs/study.md). The package shows the flow of a run:

- :mod:`specops.cli.common`: the usage error, number arguments, user callables, MPI
  detection, rank-0 printing: what every command shares;
- :mod:`specops.cli.analyze`: the ``analyze`` command: ``arguments`` (its options and their
  checks), ``run`` (the output folder, resuming, the order of the stages, the summary),
  and one module per stage (``eigen``, ``trace``, ``esd``, ``blocks``, ``landscape``);
- :mod:`specops.cli.sessions`: one module per framework (``torch``, ``jax``,
  ``tensorflow``), mirroring ``specops.backends``: each builds the model, the data and the
  loss from the arguments and makes the Hessian operator with its backend.

A command is a module listed in :data:`COMMANDS` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status); it raises
:class:`UsageError` for bad input. ``main`` imports only the modules it lists, so adding a
command is one new module and one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from specops.cli.common import MPI_SIZE_VARS, UsageError, detect_comm, launched_rank0, launched_size, load_callable
from specops.cli.sessions.torch import default_data, default_model

#: The subcommands: name -> module defining ``HELP``, ``add_arguments(parser)`` and ``run(args)``.
COMMANDS = {
    "analyze": "specops.cli.analyze",
    "study": "specops.cli.study",
}

__all__ = ["COMMANDS", "HelpFormatter", "MPI_SIZE_VARS", "UsageError", "build_parser", "default_data", "default_model",
           "detect_comm", "launched_size", "load_callable", "main"]


def _command(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help, unless the help already says ``default: ...``.

    Options without a value to show (``None``, flags) get nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default:" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``specops`` parser with one subparser per entry of :data:`COMMANDS`."""
    from specops import __version__

    parser = argparse.ArgumentParser(prog="specops", description="Spectra of neural-network loss Hessians.")
    parser.add_argument("--version", action="version", version=f"specops {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _command(name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
    return parser


def report_error(command: str, error: BaseException, debug: bool) -> None:
    """Print an error of ``specops COMMAND`` on stderr (rank 0 only).

    The message alone; with ``--debug``, first the traceback of what caused it.

    Args:
        command: the subcommand.
        error: the error.
        debug: whether ``--debug`` was given.
    """
    if not launched_rank0():
        return
    if debug:
        import traceback

        traceback.print_exception(error.__cause__ or error, file=sys.stderr)
    print(f"specops {command}: error: {error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``specops`` console script and ``python -m specops``.

    Args:
        argv: the arguments after ``specops`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad arguments and every other user error
        (model, data, loss; the message alone on stderr, rank 0 only, and the traceback with
        ``--debug``), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _command(args.command).run(args)
    except UsageError as e:
        report_error(args.command, e, getattr(args, "debug", False))
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
