"""Standard errors over data resampling, from the per-batch contributions the products compute.

A model-backed operator is ``H = sum_b w_b H_b`` over batches ``b`` (``w_b`` the batch's
share of the samples for a mean loss, 1 for a summed loss). Treating the batches as
independent draws of the data, the spread of a statistic over the batches says how much
it would move with another sample of the data of the same size (docs/algorithms.md,
"How much data?"):

- eigenvalues (:func:`eigenvalue_stderr`): the delete-a-batch jackknife of the eigenvalues
  of ``H`` restricted to the span of the returned eigenvectors, from the per-batch forms
  ``V^T H_b V`` (k x k) of one product. To first order this is the delta method on the
  per-batch Rayleigh quotients ``v^T H_b v``; the k x k eigenproblem also follows the mixing
  of close eigenvalues that first-order theory misses.
- the trace (:func:`trace_stderr`): a two-way analysis of variance of the probes' per-batch
  forms ``z_j^T H_b z_j`` (probes x batches), which separates the batches' spread from the
  probes' noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from specops.lanczos import wanted

#: Batches below which a data standard error needs the data split (a jackknife of fewer is meaningless).
MIN_BATCHES = 2
#: Sub-batches that data given as fewer than MIN_BATCHES batches is split into.
SUB_BATCHES = 8
#: Probes whose per-batch forms a trace records at least, on data split into sub-batches.
MIN_PROBES = 10


def model_operator(A: Any, caller: str) -> Any:
    """The model-backed operator ``A`` with enough batches for a data standard error.

    Data given as fewer than :data:`MIN_BATCHES` batches is split into :data:`SUB_BATCHES`
    sub-batches (:meth:`specops.model.ModelOperator.split_batches`: the same operator, the
    same products, in more terms) where the loss allows.

    Returns:
        ``A``, or the same operator over sub-batches.

    Raises:
        ValueError: ``A`` is not model-backed; its data is one sample; or it is one batch that
            cannot be split (the message says what to pass).
    """
    from specops.model import ModelOperator

    if not isinstance(A, ModelOperator):
        raise ValueError(f"{caller}(..., data_error=True) needs a model-backed operator (from a backend's "
                         f"hessian, ggn or fisher) whose products run over batches of data; got "
                         f"{type(A).__name__}. For any other operator pass data_error=False")
    batches = A.num_batches
    if batches >= MIN_BATCHES:
        return A
    if A.num_samples < MIN_BATCHES:
        raise ValueError(f"{caller}(..., data_error=True) measures how the result varies over the data's samples, "
                         "but the data is one sample, which cannot tell: pass more samples (e.g. 8 batches of them)")
    try:
        return A.split_batches(-(-SUB_BATCHES // max(batches, 1)))
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{caller}(..., data_error=True) needs the data as at least {MIN_BATCHES} batches to "
                         f"measure their spread; the data is {batches} batch of {A.num_samples} samples, and "
                         f"splitting it into sub-batches failed: {err}") from err


def _jackknife(t: np.ndarray) -> np.ndarray:
    """The delete-one jackknife standard error of the leave-one-out values ``t`` (B, ...)."""
    B = t.shape[0]
    return np.sqrt((B - 1) / B * np.sum((t - t.mean(axis=0)) ** 2, axis=0))


def eigenvalue_stderr(forms: np.ndarray, weights: np.ndarray, sizes: np.ndarray, which: str) -> np.ndarray:
    """Data standard errors of the eigenvalues of ``H`` in the span of ``k`` unit vectors.

    Args:
        forms: (B, k, k) per-batch ``V^T H_b V`` of the returned eigenvectors ``V``.
        weights: (B,) the batches' weights in ``H = sum_b w_b H_b``.
        sizes: (B,) the batches' sample counts.
        which: the order of the eigenvalues (as for :func:`~specops.eigsh`).

    Returns:
        (k,) standard errors, in the order of the eigenvalues.

    Without batch ``b``, ``H`` becomes ``N / (N - n_b) sum_{c != b} w_c H_c`` (the same number
    of samples' worth); its eigenvalues in ``span(V)`` are the leave-one-out values.
    """
    N = float(np.sum(sizes))
    total = np.einsum("b,bij->ij", weights, forms)
    t = []
    for b in range(len(weights)):
        M = (total - weights[b] * forms[b]) * N / (N - sizes[b])
        vals = np.linalg.eigvalsh((M + M.T) / 2)
        t.append(vals[wanted(vals, which, len(vals))])
    return _jackknife(np.array(t))


def _anova(X: np.ndarray) -> tuple[float, float]:
    """The column means' variance and the interaction's mean square of probe x batch forms (p, B)."""
    p, B = X.shape
    cols = X.mean(axis=0)
    between = float(np.var(cols, ddof=1)) if B > 1 else 0.0
    if p > 1 and B > 1:
        resid = X - X.mean(axis=1, keepdims=True) - cols[None, :] + X.mean()
        within = float(np.sum(resid ** 2) / ((p - 1) * (B - 1)))
    else:
        within = 0.0
    return between, within


def trace_stderr(diagonals: np.ndarray, weights: np.ndarray) -> float:
    """The data standard error of ``tr(H)`` from per-batch probe forms (probes x batches).

    With ``X[j, b] = z_j^T H_b z_j = mu + a_b + c_j + e_jb`` (batch effect ``a``, probe effect
    ``c``, interaction ``e``), the column means' variance is ``var(a) + var(e) / p``, and the
    interaction's mean square estimates ``var(e)``; so ``var(a)`` follows without the
    probes' noise, and ``tr(H) = sum_b w_b tr(H_b)`` has data variance ``var(a) sum_b w_b^2``.

    Args:
        diagonals: (p, B) forms of ``p`` random probes on every batch.
        weights: (B,) the batches' weights.

    Returns:
        The standard error (0 when the batches' spread is below the probes' noise).
    """
    X = np.asarray(diagonals, dtype=np.float64)
    between, within = _anova(X)
    var_a = max(0.0, between - within / X.shape[0])
    return float(np.sqrt(var_a * np.sum(np.asarray(weights) ** 2)))


def probes_pin_data_error(diagonals: np.ndarray) -> bool:
    """Whether the per-batch forms of these probes pin the data error: more probes would change it little.

    True from :data:`MIN_PROBES` probes on, once the probes' noise in the batches' means
    (``var(e) / p``) is at most a quarter of their spread; the data error's own precision is
    then set by the number of batches, not of probes. :func:`specops.trace` stops running
    probes over sub-batches here (each product over sub-batches costs more than over the
    whole batch).

    Args:
        diagonals: (p, B) forms of ``p`` random probes on every batch.
    """
    X = np.asarray(diagonals, dtype=np.float64)
    if X.shape[0] < MIN_PROBES:
        return False
    between, within = _anova(X)
    return within / X.shape[0] <= 0.25 * between


def samples_needed(stderr: float, value: float, samples: int, fraction: float) -> int:
    """Samples that would bring a data standard error under ``fraction * |value|`` (an estimate).

    A data standard error falls like ``1 / sqrt(samples)`` (batches as independent draws), so
    ``samples * (stderr / (fraction |value|))^2``, at least ``samples`` when already met.

    Args:
        stderr: the data standard error measured with ``samples`` samples.
        value: the estimate it belongs to (an eigenvalue, the trace).
        samples: the samples it was measured on.
        fraction: the wanted relative data error, e.g. ``0.05``.

    Returns:
        The number of samples (rounded up).
    """
    if fraction <= 0 or value == 0:
        raise ValueError(f"fraction must be > 0 and the value nonzero, got fraction={fraction}, value={value}")
    return max(int(samples), int(np.ceil(samples * (stderr / (fraction * abs(value))) ** 2)))
