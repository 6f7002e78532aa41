"""Curvature as an optimizer sees it: diagonal preconditioners and stability thresholds.

An adaptive optimizer steps ``theta -= lr * m / P`` with a diagonal ``P`` read from its
state (Adam: ``P = sqrt(v_hat) + eps``). On a quadratic with Hessian ``H`` and ``P`` held
fixed, the iteration is stable while the top eigenvalue of ``P^{-1} H`` stays below a
threshold set by the learning rate and the momentum (Cohen et al. 2021, "Gradient descent
on neural networks typically occurs at the edge of stability", ICLR; Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability", arXiv:2207.14484).

:func:`preconditioned` is ``P^{-1/2} H P^{-1/2}``: it has the eigenvalues of ``P^{-1} H``
and is symmetric, so every algorithm of specops applies to it; its eigenvectors ``u`` map
back to eigenvectors ``P^{-1/2} u`` of ``P^{-1} H``
(:meth:`PreconditionedOperator.map_back`). :func:`stability_threshold` is the
threshold's closed form for the linear recurrences of gradient descent with heavy-ball,
Nesterov or exponential-moving-average (Adam) momentum. The backends read ``P`` and the
hyperparameters from an optimizer's state (``specops.backends.torch.preconditioner``,
``...jax.preconditioner`` for optax, ``...tensorflow.preconditioner`` for Keras 3).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from specops.layout import ParamLayout
from specops.operator import LinearOperator, OperatorLike, aslinearoperator
from specops.ops import Array, VectorOps

KNOWN = {
    "torch": "torch.optim.Adam, AdamW, RMSprop, Adagrad, SGD",
    "optax": "optax adam, adamw, amsgrad, rmsprop, adagrad, sgd states",
    "keras": "keras.optimizers.Adam, AdamW, RMSprop, Adagrad, SGD",
}


def unknown_optimizer(name: str, framework: str) -> TypeError:
    """The error for an optimizer specops cannot read: which ones it reads, and the way by hand."""
    return TypeError(
        f"specops does not know how to read a preconditioner from {name}; it reads {KNOWN[framework]}. "
        "For another optimizer build its diagonal P (one positive entry per parameter, in the Hessian's "
        "parameter order, H.flatten({name: tensor})) and pass it by hand: specops.preconditioned(H, P)"
    )


class DiagonalPreconditioner(LinearOperator):
    """A diagonal preconditioner ``P = diag(d)`` on a model's parameter layout.

    Attributes:
        diagonal: the native (n,) array ``d`` (positive), in the layout's order.
        layout: the :class:`~specops.layout.ParamLayout` of ``d`` (None when given as a bare array).
        optimizer: which optimizer ``d`` was read from (``"Adam"``, ...; ``"array"`` by hand).
        settings: the formula and every hyperparameter and step count used.
    """

    positive_semidefinite = True  # a positive diagonal

    def __init__(self, diagonal: Array, ops: VectorOps, *, layout: ParamLayout | None = None,
                 optimizer: str = "array", settings: dict | None = None) -> None:
        d = ops.asarray(diagonal)
        if len(d.shape) != 1:
            raise ValueError(f"a diagonal preconditioner is a flat vector (n,), got shape {tuple(d.shape)}")
        super().__init__((int(d.shape[0]), int(d.shape[0])), ops)
        host = ops.to_numpy(d)
        if not np.all(np.isfinite(host)) or not np.all(host > 0):
            bad = int(np.sum(~(np.isfinite(host) & (host > 0))))
            raise ValueError(f"the preconditioner's diagonal must be positive and finite; {bad} of {host.size} "
                             f"entries are not (smallest {np.nanmin(host):.3g}); for Adam-like optimizers "
                             "P = sqrt(v_hat) + eps is positive when eps > 0")
        if layout is not None and layout.num_params != d.shape[0]:
            raise ValueError(f"diagonal of {d.shape[0]} entries for a layout of {layout.num_params}")
        self.diagonal, self.layout = d, layout
        self.optimizer, self.settings = optimizer, dict(settings or {})

    def _matmat(self, V: Array) -> Array:
        return self.diagonal[:, None] * V

    def restrict(self, index: Any) -> LinearOperator:
        """The preconditioner of a subset of parameters (names / glob patterns) or of coordinates."""
        if self.layout is not None and _names(index):
            names = self.layout.select(index)
            d = self.ops.concat([self.diagonal[self.layout.blocks[n]] for n in names], axis=0)
            return DiagonalPreconditioner(d, self.ops, layout=self.layout.subset(names), optimizer=self.optimizer,
                                  settings=self.settings)
        return super().restrict(index)

    def __repr__(self) -> str:
        return f"<DiagonalPreconditioner {self.optimizer} n={self.shape[0]} {self.ops}>"


def _names(index: Any) -> bool:
    return isinstance(index, str) or (isinstance(index, (list, tuple)) and bool(index)
                                      and all(isinstance(s, str) for s in index))


def _as_preconditioner(P: Any, H: LinearOperator) -> DiagonalPreconditioner:
    if isinstance(P, DiagonalPreconditioner):
        if P.ops != H.ops:
            P = DiagonalPreconditioner(H.ops.asarray(P.ops.to_numpy(P.diagonal)), H.ops, layout=P.layout,
                               optimizer=P.optimizer, settings=P.settings)
        return P
    if isinstance(P, LinearOperator):
        raise TypeError("P must be a diagonal preconditioner (a backend's preconditioner(...) or a flat array of "
                        f"the diagonal), got the operator {P!r}")
    d = P if H.ops.is_native(P) else np.asarray(P, dtype=np.float64)
    if len(getattr(d, "shape", ())) != 1:
        raise ValueError(f"P must be the preconditioner's diagonal, a flat array ({H.shape[0]},); got shape "
                         f"{tuple(getattr(d, 'shape', ()))}")
    return DiagonalPreconditioner(H.ops.asarray(d), H.ops)


class PreconditionedOperator(LinearOperator):
    """``P^{-1/2} H P^{-1/2}`` for a symmetric ``H`` and a positive diagonal ``P``.

    Its eigenvalues are those of ``P^{-1} H``. Made by :func:`preconditioned`.

    Attributes:
        H: the operator.
        P: the :class:`DiagonalPreconditioner`.
        scale: the native (n,) array ``P^{-1/2}``.
    """

    def __init__(self, H: LinearOperator, P: DiagonalPreconditioner) -> None:
        super().__init__(H.shape, H.ops)
        self.H, self.P = H, P
        self.A = H  # decide() asks the operator it is made of
        self.scale = 1 / P.diagonal ** 0.5
        self.symmetric = H.symmetric
        self.positive_semidefinite = H.positive_semidefinite  # a congruence keeps the inertia (Sylvester)

    def _matmat(self, V: Array) -> Array:
        s = self.scale[:, None]
        return s * self.H.matmat(s * V)

    def map_back(self, U: Array) -> Array:
        """Eigenvectors ``u`` of this operator as eigenvectors of ``P^{-1} H``: ``P^{-1/2} u``, unit columns.

        Args:
            U: native (n,) or (n, k), e.g. ``eigsh(preconditioned(H, P)).eigenvectors``.

        Returns:
            ``P^{-1/2} U`` with each column scaled to unit norm (``P^{-1} H`` is not
            symmetric: its eigenvectors are not orthogonal in general).
        """
        U = self.ops.asarray(U)
        if len(U.shape) == 1:
            w = self.scale * U
            return w / self.ops.norm(w)
        W = self.scale[:, None] * U
        return self.ops.scale_columns(W, 1 / self.ops.column_norms(W))

    def restrict(self, index: Any) -> LinearOperator:
        """``P^{-1/2} H P^{-1/2}`` of a block: names / glob patterns restrict ``H`` and ``P`` alike."""
        if _names(index) and self.P.layout is not None and hasattr(self.H, "layout"):
            return PreconditionedOperator(self.H.restrict(index), self.P.restrict(index))  # type: ignore[arg-type]  # restrict by names returns a DiagonalPreconditioner
        return super().restrict(index)

    def __repr__(self) -> str:
        return f"<PreconditionedOperator P^-1/2 H P^-1/2, P from {self.P.optimizer}, n={self.shape[0]}>"


def preconditioned(H: OperatorLike, P: Any) -> PreconditionedOperator:
    """The preconditioned operator ``P^{-1/2} H P^{-1/2}``: the eigenvalues of ``P^{-1} H``, symmetric.

    Args:
        H: a symmetric operator (a model's Hessian, or anything :func:`~specops.aslinearoperator` takes).
        P: a :class:`DiagonalPreconditioner` (from a backend's ``preconditioner(optimizer, H)``), or the
            diagonal itself as a flat array (NumPy or the operator's framework) of positive entries in
            ``H``'s parameter order.

    Returns:
        A :class:`PreconditionedOperator`; ``map_back`` turns its eigenvectors into those of ``P^{-1} H``.

    Raises:
        ValueError: ``P`` not a positive finite diagonal of ``H``'s size, or read for another
            parameter layout than ``H``'s.

    Examples:
        >>> import numpy as np
        >>> import specops as so
        >>> H = np.array([[2.0, 1.0], [1.0, 3.0]])
        >>> d = np.array([1.0, 4.0])
        >>> A = so.preconditioned(H, d)
        >>> np.allclose(np.sort(np.linalg.eigvalsh(A.to_dense())),
        ...             np.sort(np.linalg.eigvals(np.diag(1 / d) @ H).real))
        True
    """
    H = aslinearoperator(H)
    Pd = _as_preconditioner(P, H)
    if Pd.shape != H.shape:
        raise ValueError(f"the preconditioner has {Pd.shape[0]} entries but the operator acts on {H.shape[0]}; "
                         "read it for the same parameters (the same wrt=) as the operator")
    layout = getattr(H, "layout", None)
    if Pd.layout is not None and isinstance(layout, ParamLayout) and Pd.layout != layout:
        raise ValueError(f"the preconditioner was read for the layout {Pd.layout} but the operator has {layout}; "
                         "read it with the operator: preconditioner(optimizer, H)")
    return PreconditionedOperator(H, Pd)


def stability_threshold(lr: float, *, momentum: float = 0.0, dampening: float = 0.0,
                        nesterov: bool = False) -> float:
    """The largest stable curvature of (preconditioned) gradient descent with momentum on a quadratic.

    The update ``b <- momentum * b + (1 - dampening) * g``, ``theta <- theta - lr * d`` with
    ``d = b`` (heavy ball) or ``d = g + momentum * b`` (Nesterov, as torch.optim.SGD,
    optax.trace and Keras' SGD apply it), on ``f(theta) = lambda theta^2 / 2``, is a linear
    recurrence; it is stable (all roots of its characteristic polynomial inside the unit
    circle) exactly while ``lambda`` is below:

    * no momentum: ``2 / lr`` (Cohen et al. 2021);
    * heavy ball: ``(2 + 2 momentum) / ((1 - dampening) lr)``, from the recurrence
      ``theta' = theta - (1 - dampening) lr lambda theta + momentum (theta - theta_prev)``
      (Goh 2017, "Why momentum really works"; Cohen et al. 2021, appendix);
    * Adam's exponential moving average (``dampening = momentum = beta1``):
      ``(2 + 2 beta1) / ((1 - beta1) lr)``, 38 / lr for beta1 = 0.9 (Cohen et al. 2022);
    * Nesterov (dampening 0): ``(2 + 2 momentum) / ((1 + 2 momentum) lr)``. Derivation: with
      ``a = lr lambda`` and ``c = lr b``, ``(theta, c)`` evolves by ``[[1 - a(1 + m), -m^2], [a, m]]``,
      whose characteristic polynomial ``z^2 - (1 + m - a(1 + m)) z + m(1 - a)`` has both roots
      in the unit circle iff ``a > 0``, ``m |1 - a| < 1`` and ``2 + 2m - a(1 + 2m) > 0``
      (Jury's conditions); the last binds: ``a < (2 + 2m)/(1 + 2m)``.

    For an adaptive method ``lambda`` is an eigenvalue of ``P^{-1} H`` with ``P`` held fixed.

    Args:
        lr: the learning rate (positive).
        momentum: the momentum coefficient in [0, 1).
        dampening: the gradient's dampening in [0, 1) (torch.optim.SGD's ``dampening``; Adam's beta1).
        nesterov: Nesterov momentum (needs ``dampening=0``).

    Returns:
        The threshold (a float).

    Raises:
        ValueError: values out of range, or Nesterov with dampening.

    Examples:
        >>> stability_threshold(0.01), stability_threshold(0.01, momentum=0.9)
        (200.0, 380.0)
        >>> round(stability_threshold(1e-3, momentum=0.9, dampening=0.9))  # Adam, beta1 = 0.9
        38000
    """
    lr, m, tau = float(lr), float(momentum), float(dampening)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the learning rate must be positive, got {lr!r}")
    if not 0 <= m < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {m!r}: at 1 or above no step size is stable")
    if not 0 <= tau < 1:
        raise ValueError(f"dampening must lie in [0, 1), got {tau!r}")
    if nesterov:
        if tau != 0:
            raise ValueError("Nesterov momentum with dampening has no threshold here (torch.optim.SGD refuses "
                             "it too); use dampening=0")
        return (2 + 2 * m) / ((1 + 2 * m) * lr)
    return (2 + 2 * m) / ((1 - tau) * lr)


def one_setting(groups: list[dict], keys: tuple[str, ...], what: str, fix: str) -> dict:
    """The hyperparameters ``keys`` shared by every parameter group, or an error saying why they must be.

    Args:
        groups: one dict per parameter group.
        keys: the hyperparameters the threshold depends on.
        what: the optimizer's name, for the message.
        fix: how to ask for one group's threshold.

    Raises:
        ValueError: the groups differ in one of ``keys``.
    """
    first = {k: groups[0].get(k) for k in keys}
    for i, g in enumerate(groups[1:], 1):
        diff = [k for k in keys if g.get(k) != first[k]]
        if diff:
            raise ValueError(
                f"{what}'s parameter groups 0 and {i} differ in {', '.join(diff)} ({[first[k] for k in diff]} vs "
                f"{[g.get(k) for k in diff]}): the stability threshold is one number only when they agree, since "
                f"each group's curvature is then measured against its own step. {fix}"
            )
    return first

