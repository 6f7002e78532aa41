"""Vector operations on torch tensors (:class:`TorchOps`), CUDA buffers for MPI, dense torch matrices."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from specops.distributed import register_device_buffers
from specops.operator import MatrixOperator, check_dense_symmetric
from specops.ops import ROWS, VectorOps, sum_over_rows

_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


class TorchOps(VectorOps[torch.Tensor]):
    """Vector operations on torch tensors of one dtype on one device.

    Args:
        dtype: ``torch.float32`` / ``torch.float64`` (or the NumPy equivalents).
        device: a ``torch.device`` or device string.
    """

    name = "torch"
    in_place = True

    def __init__(self, dtype: Any = torch.float64, device: Any = "cpu"):
        if isinstance(dtype, torch.dtype):
            if dtype not in _TORCH_TO_NUMPY:
                raise TypeError(
                    f"specops works on float32 or float64 tensors, got {dtype}; cast the model "
                    "with model.float() or model.double()"
                )
            dtype = _TORCH_TO_NUMPY[dtype]
        super().__init__(dtype, str(torch.device(device)))
        self.torch_dtype = torch.float32 if self.dtype == np.float32 else torch.float64
        self.torch_device = torch.device(device)
        # rows per float32 partial sum of inner products and norms (specops.ops.sum_over_rows):
        # MKL adds in one run; GPU reductions are trees, blocks there only bound the launches
        self.rows = ROWS if self.torch_device.type == "cpu" else 1 << 22

    def is_native(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(device=self.torch_device, dtype=self.torch_dtype)
        return torch.as_tensor(np.asarray(x), dtype=self.torch_dtype, device=self.torch_device)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", torch.float64).numpy().copy()
        return np.array(x, dtype=np.float64)

    def zeros(self, shape: Any) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=self.torch_dtype, device=self.torch_device)

    def concat(self, arrays: Any, axis: int) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def inner(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return sum_over_rows(lambda x, y: (x.T @ y).double(), X, Y, rows=self.rows).to(self.torch_dtype)

    def combine(self, X: torch.Tensor, C: Any) -> torch.Tensor:
        return X @ self.asarray(C)

    def column_norms(self, X: torch.Tensor) -> np.ndarray:
        return self.to_numpy(sum_over_rows(lambda x: x.square().sum(dim=0).double(), X, rows=self.rows).sqrt())

    def qr(self, X: torch.Tensor) -> Any:
        return torch.linalg.qr(X, mode="reduced")

    def free_memory(self) -> int:
        """Bytes free on this CUDA device (``torch.cuda.mem_get_info``), else the host's."""
        if self.device.startswith("cuda"):
            return int(torch.cuda.mem_get_info(torch.device(self.device))[0])
        return super().free_memory()

    def all_finite(self, X: torch.Tensor) -> bool:
        # the max-norm propagates NaN and infinity: one pass, no boolean copy of X
        return bool(torch.isfinite(torch.linalg.vector_norm(X, float("inf"))))

    def einsum(self, spec: str, *arrays: torch.Tensor) -> torch.Tensor:
        return torch.einsum(spec, *arrays)

    def write_block(self, buffer: torch.Tensor, start: int, X: torch.Tensor, axis: int = 1) -> torch.Tensor:
        buffer.narrow(axis, start, X.shape[axis]).copy_(X)  # in place: no copy of the basis per step
        return buffer

    def buffer(self, shape: Any) -> torch.Tensor:
        # uninitialized (the algorithms read only what they wrote: no page is touched before
        # its column is used); 2-D column-major, so a block of columns is contiguous
        if len(shape) == 2:
            return torch.empty(tuple(shape)[::-1], dtype=self.torch_dtype, device=self.torch_device).T
        return torch.empty(tuple(shape), dtype=self.torch_dtype, device=self.torch_device)

    def subtract_combine(self, W: torch.Tensor, X: torch.Tensor, C: Any) -> torch.Tensor:
        return torch.addmm(W, X, self.asarray(C), alpha=-1.0)  # one GEMM, no temporary

    def to_host(self, X: torch.Tensor) -> np.ndarray:
        return X.detach().to("cpu", self.torch_dtype).numpy()

    def host(self) -> TorchOps:
        return TorchOps(self.torch_dtype, "cpu")


def _is_cuda_tensor(X: Any) -> bool:
    """Whether ``X`` is a CUDA tensor: MPI can read it, and fill a new one (see below)."""
    return isinstance(X, torch.Tensor) and X.is_cuda


def _mpi_buffers(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CUDA tensor's send buffer and a new receive buffer, for a CUDA-aware MPI's Allreduce."""
    send = X.contiguous()
    recv = send.new_empty(send.shape)
    # MPI knows nothing of CUDA streams: the product must be complete before it reads.
    torch.cuda.current_stream(send.device).synchronize()
    return send, recv


register_device_buffers(_is_cuda_tensor, _mpi_buffers)  # MPIComm sums CUDA blocks on the device


def matrix_operator(x: torch.Tensor, symmetric: bool | None = None) -> MatrixOperator:
    """A dense torch matrix as an operator whose products stay on its device.

    Called by :func:`specops.aslinearoperator` for torch tensors.

    Args:
        x: a square 2-D tensor. float32 stays float32; any other dtype becomes float64.
        symmetric: ``None`` checks symmetry and raises if ``x`` is not symmetric;
            ``True`` trusts the caller; ``False`` wraps it as non-symmetric.

    Raises:
        ValueError: for a non-square, non-finite or (``symmetric=None``) non-symmetric matrix.
        TypeError: for a complex matrix.
    """
    if x.is_complex():
        raise TypeError(f"expected a real matrix, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"specops operators are square; got shape {tuple(x.shape)}")
    ops = TorchOps(torch.float32 if x.dtype == torch.float32 else torch.float64, x.device)
    M = x.detach().to(ops.torch_dtype)
    if not ops.all_finite(M):
        raise ValueError("the matrix has NaN or infinite entries")
    if symmetric is None:
        check_dense_symmetric(ops.to_numpy(M), "matrix")
    return MatrixOperator(M, ops, symmetric=symmetric is not False)
