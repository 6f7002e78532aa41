"""specops: spectra of huge implicit symmetric operators, above all neural-network loss Hessians.

Top eigenpairs (:func:`eigsh`), trace (:func:`trace`), diagonal (:func:`diagonal`), the
eigenvalue spectral density (:func:`spectral_density`) and loss landscapes
(:func:`landscape`) of any :class:`LinearOperator`: NumPy/SciPy matrices, or the
Hessians built by ``specops.backends.torch``, ``.jax`` and ``.tensorflow``.
"""

from specops.operator import (
    LinearOperator,
    NonFiniteError,
    aslinearoperator,
    check_symmetric,
)
from specops.model import ModelOperator, NonDeterministicError
from specops.eigsh import EigResult, eigsh
from specops.trace import TraceResult, trace
from specops.diagonal import DiagonalResult, diagonal
from specops.density import SpectralDensity, SpectralFraction, UnresolvedQueryWarning, spectral_density
from specops.landscape import Landscape, landscape
from specops.tracker import Tracker, TrackerLog
from specops.solve import IndefiniteError, Preconditioner, SolveResult, solve
from specops.matrix_functions import FunmResult, TraceFunctionResult, funm, logdet, trace_function
from specops.preconditioner import DiagonalPreconditioner, preconditioned, stability_threshold

__version__ = "0.1.0"

__all__ = [
    "DiagonalResult",
    "EigResult",
    "Landscape",
    "SpectralDensity",
    "TraceResult",
    "Tracker",
    "TrackerLog",
    "DiagonalPreconditioner",
    "preconditioned",
    "stability_threshold",
    "diagonal",
    "eigsh",
    "landscape",
    "spectral_density",
    "trace",
    "LinearOperator",
    "ModelOperator",
    "NonDeterministicError",
    "NonFiniteError",
    "aslinearoperator",
    "check_symmetric",
    "IndefiniteError",
    "Preconditioner",
    "SolveResult",
    "solve",
    "FunmResult",
    "TraceFunctionResult",
    "funm",
    "logdet",
    "trace_function",
    "SpectralFraction",
    "UnresolvedQueryWarning",
]
