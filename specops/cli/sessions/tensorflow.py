"""The TensorFlow session of the command line.

``--model`` returns a Keras model, the loss is a Keras loss (``from_logits=True``); the
operator is :func:`specops.backends.tensorflow.hessian`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from specops.cli.common import UsageError, call_user, load_callable
from specops.cli.sessions import Setup, shard_data

if TYPE_CHECKING:
    import argparse

    from specops.distributed import Comm


class Session:
    """``--model`` returns a Keras model; the loss is a Keras loss (``from_logits=True``)."""

    def __init__(self, args: argparse.Namespace, comm: Comm) -> None:
        try:
            import tensorflow as tf

            from specops.backends import tensorflow as stf
        except ImportError as e:
            raise UsageError(f"--backend tensorflow needs TensorFlow and specops.backends.tensorflow ({e})") from e
        self.tf, self.stf, self.args, self.comm = tf, stf, args, comm
        if args.model is None or args.data is None:
            raise UsageError("--backend tensorflow needs --model (returning a Keras model) and --data; the "
                             "default model is PyTorch")
        if args.checkpoint:
            raise UsageError("--checkpoint loads torch state_dicts; with --backend tensorflow load the weights "
                             "in your --model callable")
        if args.device != "auto":
            raise UsageError("--device is for torch; TensorFlow places the model itself")
        self.model = call_user(load_callable(args.model, "--model"), "--model")
        self.data = call_user(load_callable(args.data, "--data"), "--data")
        if args.loss == "cross_entropy":
            self.loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        elif args.loss == "mse":
            self.loss = tf.keras.losses.MeanSquaredError()
        else:
            self.loss = load_callable(args.loss, "--loss")
        self.description = f"Keras model from {args.model}"
        self.names: list[str] | None = None
        self.needs_training = False

    def operator(self) -> Setup:
        """The Hessian operator of the loss over this rank's data."""
        H = self.stf.hessian(self.model, self.loss, shard_data(self.data, self.comm), comm=self.comm)
        self.names = list(H.param_blocks)
        return Setup(H, self.description, H.dtype.name)
