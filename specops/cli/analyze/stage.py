"""What the stage modules of ``specops analyze`` share: the run's context, skipping finished stages."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Context:
    """One run of ``specops analyze`` as the stages see it.

    Attributes:
        args: the parsed arguments.
        H: the Hessian operator (a :class:`~specops.model.ModelOperator`).
        state: the :class:`~specops.report.ReportState` (``results.json``).
        printer: the rank-0 :class:`~specops.cli.common.Printer`.
        blocks: block name -> parameter patterns (``--blocks``, resolved).
        eig: the eigen stage's :class:`~specops.EigResult` when it ran in this process
            (a resumed run reloads the eigenvectors from ``eigenvectors.npy``).
    """

    args: object
    H: object
    state: object
    printer: object
    blocks: dict
    eig: object = None

    @property
    def out(self) -> str:
        """The output folder (``--out``)."""
        return self.args.out

    def skip(self, name: str, settings: dict) -> bool:
        """True (and says so) when stage ``name`` finished earlier with the same settings."""
        if self.state.done(name, settings):
            self.printer(f"  {name}: finished earlier, skipped")
            return True
        return False
