"""Batches of a JAX loss: their size, and data parallelism over one process's devices (:class:`DataMesh`)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax import tree_util

from specops import batches


def batch_size(batch: Any) -> int:
    """The common leading dimension of the arrays of a batch pytree."""
    return batches.batch_size(tree_util.tree_leaves(batch))


class DataMesh:
    """Data parallelism over the devices of one process, in one compiled program.

    A batch is split along its leading (sample) axis over a one-axis
    ``jax.sharding.Mesh`` (``NamedSharding(mesh, P("data"))``); the parameters and the
    product block are replicated. ``jax.jit`` of the unchanged loss then runs every
    device on its slice of the batch and sums the partial gradients and products with
    one all-reduce inside the program, so the result is the one-device product up to
    the order of the sums.

    Args:
        devices: ``"local"`` (``jax.local_devices()``), a list of ``jax.Device``, or a
            ``jax.sharding.Mesh`` (the batch is split over all of its axes).
        home: the device the results go back to (the operator's vectors live there).

    Raises:
        ValueError: no device, or a device of another process (split the data across
            processes with ``comm=`` instead).
    """

    def __init__(self, devices: Any, home: Any) -> None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if isinstance(devices, str):
            if devices != "local":
                raise ValueError(f"devices must be 'local', a list of devices or a Mesh, got {devices!r}")
            devices = jax.local_devices(backend=home.platform)
        if isinstance(devices, Mesh):
            self.mesh, axes = devices, tuple(devices.axis_names)
        else:
            devices = list(devices)
            if not devices:
                raise ValueError("devices is empty: pass 'local', a list of jax devices or a Mesh")
            self.mesh, axes = Mesh(np.array(devices), ("data",)), ("data",)
        remote = [d for d in self.mesh.devices.flat if d.process_index != jax.process_index()]
        if remote:
            raise ValueError(
                f"devices holds {len(remote)} device(s) of other processes; a batch is split over this "
                "process's devices only: give each process its own shard of the data and pass comm=..."
            )
        self.size = int(self.mesh.devices.size)
        self.home = home
        self._split = NamedSharding(self.mesh, PartitionSpec(axes))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())

    def splits(self, batch: Any) -> bool:
        """Whether ``batch`` is split: its size is a multiple of the number of devices."""
        return self.size > 1 and batch_size(batch) % self.size == 0

    def split(self, batch: Any) -> Any:
        def put(x: Any) -> Any:
            return jax.device_put(x, self._split) if getattr(x, "ndim", 0) >= 1 else x
        return tree_util.tree_map(put, batch)

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self._replicated)

    def gather(self, x: Any) -> Any:
        return jax.device_put(x, self.home)

    def __repr__(self) -> str:
        return f"DataMesh({self.size} devices: {', '.join(str(d) for d in self.mesh.devices.flat)})"

