"""Twice-differentiable formulas: ``tf.nn.moments`` without its ``stop_gradient``, while products are traced."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf


def _moments(x: Any, axes: Any, shift: Any = None, keepdims: bool = False, name: Any = None) -> tuple[Any, Any]:
    """``tf.nn.moments`` differentiable twice: the variance of ``x - mean``.

    TensorFlow's takes the variance around ``stop_gradient(mean)``: the gradient is the same
    (the variance's derivative in the mean is zero at the mean), the second derivative is not.
    """
    y = tf.cast(x, tf.float32) if x.dtype == tf.float16 else x
    mean = tf.reduce_mean(y, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(y, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    if x.dtype == tf.float16:
        mean, variance = tf.cast(mean, x.dtype), tf.cast(variance, x.dtype)
    return mean, variance


@contextlib.contextmanager
def _twice_differentiable() -> Iterator[None]:
    """``tf.nn.moments`` as :func:`_moments` (the Python body of a traced function runs only while tracing)."""
    original = tf.nn.moments
    tf.nn.moments = _moments
    try:
        yield
    finally:
        tf.nn.moments = original


def _second_order(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced under :func:`_twice_differentiable`."""
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with _twice_differentiable():
            return fn(*args, **kwargs)

    return traced
