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

__all__ = ["COMMANDS", "MPI_SIZE_VARS", "UsageError", "build_parser", "default_data", "default_model",
           "detect_comm", "launched_size", "load_callable", "main"]


def _command(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    """The ``specops`` parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="specops", description="Spectra of neural-network loss Hessians.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _command(name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``specops`` console script and ``python -m specops``.

    Args:
        argv: the arguments after ``specops`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad arguments (the message on stderr, rank 0
        only), 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _command(args.command).run(args)
    except UsageError as e:
        if launched_rank0():
            print(f"specops {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
