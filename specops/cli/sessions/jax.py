"""The JAX session of the command line.

``--model`` returns ``(apply_fn, params)``, the loss is ``loss(apply_fn(params, inputs),
targets)``; the operator is :func:`specops.backends.jax.hessian`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from specops.cli.common import UsageError, call_user, load_callable
from specops.cli.sessions import Setup, shard_data

if TYPE_CHECKING:
    import argparse

    from specops.distributed import Comm


class Session:
    """``--model`` returns ``(apply_fn, params)``; the loss is ``loss(apply_fn(params, inputs), targets)``."""

    def __init__(self, args: argparse.Namespace, comm: Comm) -> None:
        try:
            import jax
            import jax.numpy as jnp

            from specops.backends import jax as sj
        except ImportError as e:
            raise UsageError(f"--backend jax needs JAX and specops.backends.jax ({e})") from e
        self.jax, self.jnp, self.sj, self.args, self.comm = jax, jnp, sj, args, comm
        if args.model is None or args.data is None:
            raise UsageError("--backend jax needs --model (returning (apply_fn, params)) and --data; the default "
                             "model is PyTorch")
        if args.checkpoint:
            raise UsageError("--checkpoint loads torch state_dicts; with --backend jax load the weights in your "
                             "--model callable")
        if args.device != "auto":
            raise UsageError("--device is for torch; choose JAX's device with JAX_PLATFORMS")
        out = call_user(load_callable(args.model, "--model"), "--model")
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and callable(out[0])):
            raise UsageError(f"--model {args.model} must return (apply_fn, params) with --backend jax")
        self.apply_fn, self.params = out
        self.data = call_user(load_callable(args.data, "--data"), "--data")
        self.loss = self._loss(args.loss)
        self.description = f"JAX model from {args.model}"
        self.names: list[str] | None = None
        self.needs_training = False

    def _loss(self, spec: str) -> Any:
        jax, jnp = self.jax, self.jnp
        if spec == "cross_entropy":
            def loss(outputs: Any, targets: Any) -> Any:
                logp = jax.nn.log_softmax(outputs)
                return -jnp.mean(jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=1))
            return loss
        if spec == "mse":
            return lambda outputs, targets: jnp.mean((outputs - targets) ** 2)
        return load_callable(spec, "--loss")

    def operator(self) -> Setup:
        """The Hessian operator of the loss over this rank's data."""
        apply_fn, loss = self.apply_fn, self.loss

        def loss_fn(params: Any, batch: Any) -> Any:
            return loss(apply_fn(params, batch[0]), batch[1])

        data = shard_data(self.data, self.comm)
        dtype = None if self.args.dtype == "model" else getattr(self.jnp, self.args.dtype)
        H = self.sj.hessian(loss_fn, self.params, data, comm=self.comm, dtype=dtype)
        self.names = list(H.param_blocks)
        return Setup(H, self.description, H.dtype.name)
