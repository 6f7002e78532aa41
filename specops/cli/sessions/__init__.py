"""Framework sessions: from the command line's arguments to a Hessian operator.

One module per framework, mirroring ``specops.backends``: :mod:`~specops.cli.sessions.torch`
(the default ResNet on digits, its training stage, user ``nn.Module`` s and checkpoints),
:mod:`~specops.cli.sessions.jax` (``(apply_fn, params)``) and
:mod:`~specops.cli.sessions.tensorflow` (Keras models). A session is built from the parsed
arguments and the communicator; it checks its arguments at once (before any computation),
and provides ``names`` (the parameter names, or None until the operator exists),
``needs_training``, ``train(state, out, printer)`` where training applies, and
``operator() -> Setup``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from specops.distributed import Comm
    from specops.model import ModelOperator

#: ``--backend`` choices -> the module of their session (each defines ``Session``).
BACKENDS = {"torch": "specops.cli.sessions.torch", "jax": "specops.cli.sessions.jax",
            "tensorflow": "specops.cli.sessions.tensorflow"}


@dataclasses.dataclass
class Setup:
    """What the stages need: the operator and how it was made.

    Attributes:
        H: the Hessian operator.
        description: the model and data, in words.
        dtype: the operator's dtype name.
        shapes: parameter name -> shape, where the session knows them.
    """

    H: ModelOperator
    description: str
    dtype: str
    shapes: dict | None = None


def session(backend: str, args: argparse.Namespace, comm: Comm) -> Any:
    """The session of ``backend`` for these arguments (its framework is imported only now).

    Args:
        backend: a key of :data:`BACKENDS`.
        args: the parsed arguments.
        comm: the communicator.

    Returns:
        The backend's ``Session``.
    """
    return importlib.import_module(BACKENDS[backend]).Session(args, comm)


def shard_data(data: Any, comm: Comm) -> Any:
    """This rank's part of the data.

    A list of batches is split by batches when there are enough, otherwise every batch (or
    the single batch) is split by samples.

    Args:
        data: one batch (a tuple or dict) or a sequence of batches.
        comm: the communicator.

    Returns:
        This rank's batches, or its part of the batch.
    """
    from specops.distributed import shard

    if comm.size == 1:
        return data
    if isinstance(data, (tuple, dict)):
        return _shard_batch(data, comm)
    data = list(data)
    if len(data) >= comm.size:
        return shard(data, comm)
    return [_shard_batch(b, comm) for b in data]


def _shard_batch(batch, comm):
    from specops.distributed import shard

    if isinstance(batch, dict):
        return {k: shard(v, comm) for k, v in batch.items()}
    return tuple(shard(v, comm) for v in batch)
