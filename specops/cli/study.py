"""``specops study``: the PyHessian paper's experiment (:mod:`specops.study`, docs/study.md)."""

from specops.study import DESCRIPTION, HELP, add_arguments, run_command

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]


def run(args) -> int:
    """Run the study; bad arguments are reported by :func:`specops.study.run_command` (exit status 2)."""
    return run_command(args)
