"""What the stage modules of ``specops analyze`` share: the run's context, skipping finished stages."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from specops.cli.common import Printer
    from specops.model import ModelOperator
    from specops.cli.report import ReportState


@dataclasses.dataclass
class Context:
    """One run of ``specops analyze`` as the stages see it.

    Attributes:
        args: the parsed arguments.
        H: the Hessian operator (a :class:`~specops.model.ModelOperator`).
        state: the :class:`~specops.cli.report.ReportState` (``results.json``).
        printer: the rank-0 :class:`~specops.cli.common.Printer`.
        blocks: block name -> parameter patterns (``--blocks``, resolved).
        eig: the eigen stage's :class:`~specops.EigResult` when it ran in this process
            (a resumed run reloads the eigenvectors from ``eigenvectors.npy``).
    """

    args: argparse.Namespace
    H: ModelOperator
    state: ReportState
    printer: Printer
    blocks: dict
    eig: Any = None

    @property
    def out(self) -> str:
        """The output folder (``--out``)."""
        return self.args.out

    def skip(self, name: str, settings: dict) -> bool:
        """True (and says so) when stage ``name`` finished earlier with the same settings.

        Args:
            name: the stage.
            settings: the stage's settings in this run.

        Returns:
            Whether to skip the stage.
        """
        if self.state.done(name, settings):
            self.printer(f"  {name}: finished earlier, skipped")
            return True
        return False
