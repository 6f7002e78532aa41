"""``specops study``: the PyHessian paper's experiment (:mod:`specops.study`, docs/study.md)."""

import argparse

from specops.study import DESCRIPTION, HELP, add_arguments, run_command

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    """Run the study; bad arguments are reported by :func:`specops.study.run_command` (exit status 2).

    Args:
        args: the parsed arguments of ``specops study``.

    Returns:
        The exit status.
    """
    return run_command(args)
