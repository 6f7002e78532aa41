"""Argument checks and the counted, checked product shared by every algorithm."""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any, Literal, TypeVar, overload

from specops.operator import LinearOperator, NonFiniteError, OperatorLike, aslinearoperator
from specops.ops import Array

T = TypeVar("T")


def symmetric_operator(A: OperatorLike, caller: str) -> LinearOperator:
    """``A`` as an operator, refusing one marked non-symmetric (``caller`` names the algorithm)."""
    A = aslinearoperator(A)
    if not A.symmetric:
        raise ValueError(
            f"{caller} needs a symmetric operator, and this one is marked non-symmetric; "
            "symmetrize it, e.g. (A + A.T) / 2 for a matrix"
        )
    return A


def choice(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@overload
def positive_float(name: str, value: Any, allow_none: Literal[False] = False) -> float: ...
@overload
def positive_float(name: str, value: Any, allow_none: bool) -> float | None: ...
def positive_float(name: str, value: Any, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is a positive number (or None if allowed), else a ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:  # type: ignore[operator]  # Integral has no __lt__ in typeshed
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class Products:
    """``A @ V`` that counts products and refuses non-finite results.

    With ``forms`` (the :class:`~specops.model.BatchForms` of a model operator recording
    per-batch forms for ``data_error``), each product is labelled with its ``tag`` (``tag``
    of the call, else the default given here), which says whether its forms are wanted.
    """

    def __init__(self, A: LinearOperator, forms: Any = None, tag: str = "") -> None:
        self.A = A
        self.count = 0
        self.forms, self.tag = forms, tag

    def __call__(self, V: Array, tag: str | None = None) -> Array:
        if self.forms is not None:
            self.forms.tag = self.tag if tag is None else tag
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
