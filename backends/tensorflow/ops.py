"""Vector operations on TensorFlow tensors (:class:`TFOps`) and dense TensorFlow matrices."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from specops.operator import MatrixOperator, check_dense_symmetric
from specops.ops import VectorOps


def _device_name(device: str) -> str:
    spec = tf.DeviceSpec.from_string(device or "/device:CPU:0")
    return f"{spec.device_type or 'CPU'}:{spec.device_index or 0}"


class TFOps(VectorOps):
    """Vector operations on TensorFlow tensors of one dtype on one device.

    Args:
        dtype: float32 or float64 (a ``tf.DType`` or NumPy dtype).
        device: a TensorFlow device name (``"CPU:0"``, ``"GPU:1"``).
    """

    name = "tensorflow"

    def __init__(self, dtype: Any = np.float64, device: str = "CPU:0") -> None:
        super().__init__(tf.as_dtype(dtype).as_numpy_dtype, _device_name(device))
        self.tf_dtype = tf.as_dtype(self.dtype)

    def is_native(self, x: Any) -> bool:
        return isinstance(x, tf.Tensor)

    def asarray(self, x: Any) -> Any:
        with tf.device(self.device):
            if isinstance(x, (tf.Tensor, tf.Variable)):
                return tf.identity(tf.cast(x, self.tf_dtype))
            return tf.convert_to_tensor(np.asarray(x, dtype=self.dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(x, dtype=np.float64)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        with tf.device(self.device):
            return tf.zeros(shape, dtype=self.tf_dtype)

    def concat(self, arrays: Any, axis: int) -> Any:
        return tf.concat(list(arrays), axis=axis)

    def inner(self, X: Any, Y: Any) -> Any:
        return tf.linalg.matmul(X, Y, transpose_a=True)

    def combine(self, X: Any, C: Any) -> Any:
        return tf.linalg.matmul(X, self.asarray(C))

    def column_norms(self, X: Any) -> np.ndarray:
        return np.asarray(tf.norm(X, axis=0), dtype=np.float64)

    def qr(self, X: Any) -> tuple[Any, Any]:
        return tf.linalg.qr(X, full_matrices=False)

    def all_finite(self, X: Any) -> bool:
        return bool(tf.reduce_all(tf.math.is_finite(X)))

    def einsum(self, spec: str, *arrays: Any) -> Any:
        return tf.einsum(spec, *(self.asarray(a) for a in arrays))

    def reshape(self, x: Any, shape: Any) -> Any:
        return tf.reshape(x, tuple(shape))

    def transpose(self, X: Any) -> Any:
        return tf.transpose(X)


def matrix_operator(x: Any, symmetric: bool | None = None) -> MatrixOperator:
    """A dense TensorFlow matrix as an operator whose products stay in TensorFlow.

    Args:
        x: a square ``tf.Tensor`` or variable; float32 stays float32, anything else
            becomes float64.
        symmetric: as for :func:`specops.aslinearoperator`.

    Raises:
        ValueError: a non-square, non-finite or (with ``symmetric=None``) non-symmetric matrix.
    """
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"specops operators are square; got shape {tuple(x.shape)}")
    ops = TFOps(np.float32 if x.dtype == tf.float32 else np.float64, x.device)
    x = ops.asarray(x)
    host = ops.to_numpy(x)
    if not np.isfinite(host).all():
        raise ValueError("the matrix has NaN or infinite entries")
    if symmetric is None:
        check_dense_symmetric(host, "TensorFlow matrix")
    return MatrixOperator(x, ops, symmetric=symmetric is not False)
