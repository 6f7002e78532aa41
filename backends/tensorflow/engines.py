"""The Hessian-vector product engines of :class:`~specops.backends.tensorflow.TFAdapter`, traced once.

Reverse-over-reverse (``"double_backward"``), forward-over-reverse and finite differences,
and :class:`Traced`: a ``tf.function`` traced once for every batch size and column count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from specops.checks import finite_difference_products, machine_epsilon
from specops.layout import ParamLayout
from specops.model import ModelAdapter

from .formulas import _second_order
from .ops import TFOps

ENGINES = ("auto", "double_backward", "forward_over_reverse", "finite_difference")


def _batch_spec(batch: Any, relaxed: bool) -> Any:
    """``batch`` with every tensor replaced by its spec, the leading dimension unknown if ``relaxed``."""
    def spec(x):
        if not isinstance(x, tf.Tensor):
            return x
        shape = x.shape.as_list()
        return tf.TensorSpec([None] + shape[1:] if relaxed and shape else shape, x.dtype)

    return tf.nest.map_structure(spec, batch)


class Traced:
    """``fn(batch, *vectors)`` as a ``tf.function``, traced once for every batch size and column count.

    The first call traces with the leading (batch) dimension and the column count left
    unknown, so later batches and blocks of any size reuse that trace (``tf.function``
    dispatches to the more general one). A function that cannot be traced so (a model or
    loss that needs a static batch size) is traced once per batch shape instead
    (:attr:`static`; the column count still unknown).

    Args:
        fn: the Python function.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.python_function = fn
        self.function = tf.function(fn, reduce_retracing=True)
        self.static = False
        self._traced: set[str] = set()  # batch specs traced

    def experimental_get_tracing_count(self) -> int:
        """Traces of the current ``tf.function``."""
        return int(self.function.experimental_get_tracing_count())

    def __call__(self, batch: Any, *vectors: Any) -> Any:
        spec = _batch_spec(batch, relaxed=not self.static)
        if repr(spec) not in self._traced:
            self._traced.add(repr(spec))
            vector_specs = [tf.TensorSpec([int(v.shape[0])] + [None] * (len(v.shape) - 1), v.dtype)
                            for v in vectors]
            try:
                self.function.get_concrete_function(spec, *vector_specs)
            except (TypeError, ValueError):
                if self.static:
                    raise
                self.static = True
                self.function = tf.function(self.python_function)
                return self(batch, *vectors)
        return self.function(batch, *vectors)


class _Engines(ModelAdapter):
    """The product engines of :class:`~specops.backends.tensorflow.TFAdapter` (its base class).

    The adapter supplies ``_vars``, ``_gradients``, ``_prepare``, ``_fix_randomness``,
    ``gradient_at``, ``layout``, ``ops`` and ``chunk_size``; :meth:`_init_engines` traces nothing yet.
    """

    ops: TFOps
    layout: ParamLayout
    chunk_size: int
    engine: str
    num_traces: int
    _vars: list

    if TYPE_CHECKING:
        def _gradients(self, batch: Any) -> Any: ...

        def _prepare(self, batch: Any) -> Any: ...

        def _fix_randomness(self) -> None: ...

    def _init_engines(self) -> None:
        forward = self.engine == "forward_over_reverse"
        self._hvp = Traced(self._hvp_vectorized if forward else self._hvp_loop)
        self._hvp1 = Traced(self._hvp_single if forward else self._hvp_single_backward)

    def _flatten(self, tensors: Any) -> Any:
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    def _unflatten(self, v: Any) -> list:
        return [tf.reshape(t, self.layout.shapes[n]) for t, n in zip(tf.split(v, self.layout.sizes), self.layout.names)]

    @_second_order
    def _hvp_single(self, batch: Any, v: Any) -> Any:
        """Forward-over-reverse ``H v`` for one vector (n,)."""
        self.num_traces += 1
        with tf.autodiff.ForwardAccumulator(self._vars, self._unflatten(v)) as acc:
            grads = self._gradients(batch)
        return self._flatten(acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO))

    @_second_order
    def _hvp_vectorized(self, batch: Any, V: Any) -> Any:
        """Forward-over-reverse ``H V``, the columns of V (n, k) vectorized."""
        self.num_traces += 1

        def column(v):
            with tf.autodiff.ForwardAccumulator(self._vars, self._unflatten(v)) as acc:
                grads = self._gradients(batch)
            return self._flatten(acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO))

        return tf.transpose(tf.vectorized_map(column, tf.transpose(V)))

    @_second_order
    def _hvp_single_backward(self, batch: Any, v: Any) -> Any:
        """Reverse-over-reverse ``H v``: the gradient of ``<g, v>``."""
        self.num_traces += 1
        with tf.GradientTape() as outer:
            g = self._flatten(self._gradients(batch))
            gv = tf.tensordot(g, v, 1)
        return self._flatten(outer.gradient(gv, self._vars, unconnected_gradients=tf.UnconnectedGradients.ZERO))

    @_second_order
    def _hvp_loop(self, batch: Any, V: Any) -> Any:
        """Reverse-over-reverse ``H V``: one gradient pass, then the columns in a loop."""
        self.num_traces += 1
        with tf.GradientTape(persistent=True) as outer:
            g = self._flatten(self._gradients(batch))

        def column(v):
            return self._flatten(outer.gradient(g, self._vars, output_gradients=v,
                                                unconnected_gradients=tf.UnconnectedGradients.ZERO))

        columns = tf.map_fn(column, tf.transpose(V), parallel_iterations=1,
                            fn_output_signature=tf.TensorSpec([self.layout.num_params], self.ops.tf_dtype))
        return tf.transpose(columns)

    def _finite_difference(self, batch: Any, V: Any) -> Any:
        theta = self.ops.to_numpy(self.params_vector())
        scale = max(1.0, float(np.sqrt(np.mean(theta ** 2))))
        return finite_difference_products(lambda d: self.gradient_at(batch, d), V, self.ops,
                                          eps=machine_epsilon(self.ops.dtype), scale=scale)[0]

    def use_finite_differences(self) -> None:
        self.engine = "finite_difference"

    def check_product(self, batch: Any, V: Any) -> Any:
        return self.hvp(0, batch, V)

    def hvp_vector(self, index: int, batch: Any, v: Any) -> Any:
        if self.engine == "finite_difference":
            return self._finite_difference(batch, v[:, None])[:, 0]
        self._fix_randomness()
        return self._hvp1(self._prepare(batch), v)

    def hvp(self, index: int, batch: Any, V: Any) -> Any:
        if self.engine == "finite_difference":
            return self._finite_difference(batch, V)
        if V.shape[1] == 1:
            return self.hvp_vector(index, batch, V[:, 0])[:, None]
        batch = self._prepare(batch)
        c = V.shape[1] if self.engine == "double_backward" else self.chunk_size
        blocks = []
        for j in range(0, V.shape[1], c):
            self._fix_randomness()  # the same random mask for every chunk
            blocks.append(self._hvp(batch, V[:, j : j + c]))
        return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=1)
