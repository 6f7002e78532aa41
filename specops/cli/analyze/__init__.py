"""``specops analyze``: one command from a model to a complete curvature report.

With no arguments it trains a small ResNet (batch norm, residual connections;
:mod:`specops.zoo.torch_resnet`) on scikit-learn's digits for a few seconds and
analyses its loss Hessian: the top eigenvalues, the trace, the eigenvalue spectral
density, the same per block (ResNet stage), and the loss landscape along the top
eigenvectors. ``docs/cli.md`` documents every argument and the callable contracts;
``specops analyze --help`` lists them.

Every stage's result goes to ``--out/results.json`` (atomically) as soon as it is
done; ``--resume`` skips the finished stages of an interrupted run. Under
``mpiexec -n N`` the data is sharded over the ranks, every rank computes, and rank 0
alone writes and prints.

The flow: :mod:`.arguments` (the options and their checks) -> :mod:`.run` (the output
folder, resuming, the framework session of :mod:`specops.cli.sessions`, the stages in
order, the summary) -> one module per stage: :mod:`.eigen`, :mod:`.trace`, :mod:`.esd`,
:mod:`.blocks`, :mod:`.landscape` (the training stage of the default model lives in its
session, :mod:`specops.cli.sessions.torch`).
"""

from specops.cli.analyze.arguments import DESCRIPTION, HELP, add_arguments
from specops.cli.analyze.run import run

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]
