"""Argument checks and the counted, checked product shared by every algorithm."""

from __future__ import annotations

import numbers

from specops.operator import LinearOperator, NonFiniteError, aslinearoperator


def symmetric_operator(A, caller: str) -> LinearOperator:
    A = aslinearoperator(A)
    if not A.symmetric:
        raise ValueError(
            f"{caller} needs a symmetric operator, and this one is marked non-symmetric; "
            "symmetrize it, e.g. (A + A.T) / 2 for a matrix"
        )
    return A


def choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_float(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class Products:
    """``A @ V`` that counts products and refuses non-finite results."""

    def __init__(self, A: LinearOperator):
        self.A = A
        self.count = 0

    def __call__(self, V):
        Y = self.A.matmat(V)
        first = self.count + 1
        self.count += int(V.shape[1])
        if not self.A.ops.all_finite(Y):
            which = f"product {first}" if first == self.count else f"products {first}-{self.count}"
            raise NonFiniteError(
                f"{which} of the operator returned NaN or infinite values; check the operator "
                "(for a model: the loss and its second derivatives at these parameters)"
            )
        return Y
