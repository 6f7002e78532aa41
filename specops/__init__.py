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

__version__ = "0.1.0"

__all__ = [
    "LinearOperator",
    "ModelOperator",
    "NonDeterministicError",
    "NonFiniteError",
    "aslinearoperator",
    "check_symmetric",
]
