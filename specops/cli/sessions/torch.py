"""The PyTorch session of the command line.

The default ResNet-8 on digits and its training stage, or a user ``nn.Module`` (with an
optional checkpoint), and the operator of :func:`specops.backends.torch.hessian`. torch is
imported when a session is made.
"""

from __future__ import annotations

import io
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from specops.cli import report as rp
from specops.cli.common import UsageError, call_user, load_callable
from specops.cli.sessions import Setup, shard_data
from specops.progress import Bar

if TYPE_CHECKING:
    import argparse

    from specops.cli.common import Printer
    from specops.distributed import Comm
    from specops.cli.report import ReportState

#: Digits images held out from the default model's training data, for its accuracy.
DEFAULT_HELD_OUT = 297


def default_model(seed: int = 0) -> Any:
    """The default network: ResNet-8 (batch norm, residual connections), width 8, for 1x8x8 digits.

    Args:
        seed: the torch seed of its initialization.

    Returns:
        The ``torch.nn.Module``.
    """
    import torch

    from specops.zoo.torch_resnet import resnet

    torch.manual_seed(seed)
    return resnet(8, num_classes=10, in_channels=1, width=8, batch_norm=True, residual=True)


def default_data(samples: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits split for the default run: ``(train_X, train_y, test_X, test_y)``.

    The Hessian is taken over the first ``samples`` training images.

    Args:
        samples: images the Hessian will be taken over (checked against the training split).
        seed: seed of the digits' shuffle.

    Returns:
        The training images and labels, and the held-out ones.

    Raises:
        UsageError: more samples than the training split holds.
    """
    from specops.zoo.data import digits

    X, y = digits(seed=seed)
    n_train = len(X) - DEFAULT_HELD_OUT
    if samples > n_train:
        raise UsageError(f"--samples {samples}: the digits training split has {n_train} images")
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _to_torch(obj: Any, torch: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _to_torch(v, torch) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_torch(v, torch) for v in obj)
    if isinstance(obj, list):
        return [_to_torch(v, torch) for v in obj]
    return obj


def _torch_loss(spec: str) -> Any:
    from torch import nn

    if spec == "cross_entropy":
        return nn.CrossEntropyLoss()
    if spec == "mse":
        return nn.MSELoss()
    fn = load_callable(spec, "--loss")
    return fn() if isinstance(fn, type) else fn


def _load_checkpoint(model: Any, path: str, torch: Any) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"--checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--checkpoint {path!r} is not a torch checkpoint ({e})") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise UsageError(f"--checkpoint {path!r} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UsageError(f"--checkpoint {path!r} does not match the model: {detail[:800]}") from e


class Session:
    """Builds the torch model, data and operator; trains the default model as a stage."""

    def __init__(self, args: argparse.Namespace, comm: Comm) -> None:
        import torch

        self.torch, self.args, self.comm = torch, args, comm
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        elif args.model is None:
            torch.set_num_threads(1)
        elif comm.size > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // comm.size))
        if args.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = args.device
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise UsageError(f"--device {args.device!r}: {e}") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: CUDA is not available; use --device cpu")
            if dev.index is None and comm.size > 1:
                from specops.distributed import gpu_index

                dev = torch.device("cuda", gpu_index(torch.cuda.device_count(), comm))
        self.dev = dev
        self.default = args.model is None
        if self.default and args.data is not None:
            raise UsageError("--data needs --model: the default ResNet is trained on its own digits data")
        if self.default:
            self.model = default_model(args.seed)
            self.description = "ResNet-8 (batch norm, residual, width 8) on digits 1x8x8"
            self.split = default_data(args.samples, args.seed)
        else:
            if args.data is None:
                raise UsageError("--model needs --data (a callable returning the batches to analyse)")
            self.model = call_user(load_callable(args.model, "--model"), "--model")
            if not isinstance(self.model, torch.nn.Module):
                raise UsageError(f"--model {args.model} returned a {type(self.model).__name__}; with --backend "
                                 "torch it must return a torch.nn.Module")
            self.description = f"{type(self.model).__name__} from {args.model}"
            self.data = call_user(load_callable(args.data, "--data"), "--data")
        self.loss_fn = _torch_loss(args.loss)
        if args.checkpoint:
            _load_checkpoint(self.model, args.checkpoint, torch)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def needs_training(self) -> bool:
        """Whether the ``train`` stage runs: the default model without a checkpoint."""
        return self.default and not self.args.checkpoint

    def train(self, state: ReportState, out: str, printer: Printer) -> None:
        """The ``train`` stage: rank 0 trains (or reloads ``model.pt`` on resume), every rank gets the weights.

        Args:
            state: the run's state (the stage is recorded in it).
            out: the output folder (``model.pt`` goes there).
            printer: the rank-0 printer.
        """
        torch, args = self.torch, self.args
        settings = dict(epochs=args.epochs, seed=args.seed, model="resnet8-width8", data="digits")
        path = os.path.join(out, "model.pt")
        if state.done("train", settings) and os.path.isfile(path):
            weights = torch.load(path, map_location="cpu", weights_only=True) if self.comm.rank == 0 else None
            self.model.load_state_dict(self.comm.bcast(weights))
            printer(f"  train: reusing {path}")
            return
        t0 = time.perf_counter()
        from specops.zoo.train import accuracy, train

        Xtr, ytr, Xte, yte = self.split
        info = None
        if self.comm.rank == 0:
            bar = Bar(args.epochs, "train", "epochs", enabled=printer.progress)

            def log(epoch: int, loss: float, acc: float) -> None:
                bar.to(epoch)
                bar.show(loss=loss, accuracy=acc)

            info = train(self.model, Xtr, ytr, epochs=args.epochs, seed=args.seed, log=log)
            info["test_accuracy"] = accuracy(self.model, torch.from_numpy(Xte), torch.from_numpy(yte))
            bar.close(train_accuracy=info["train_accuracy"], held_out=info["test_accuracy"])
            buf = io.BytesIO()
            torch.save(self.model.state_dict(), buf)
            rp.atomic_write(path, buf.getvalue())
            weights = self.model.state_dict()
        else:
            weights = None
        self.model.load_state_dict(self.comm.bcast(weights))
        info = self.comm.bcast(info)
        state.finish("train", settings, info, 0, time.perf_counter() - t0)

    def operator(self) -> Setup:
        """The Hessian operator of the trained model in eval mode over this rank's data."""
        from specops.backends import torch as st

        torch, args = self.torch, self.args
        self.model.eval()   # the analysis is of the trained network: batch norm with running statistics
        if args.dtype != "model":
            self.model.to(getattr(torch, args.dtype))
        self.model.to(self.dev)
        if self.default:
            Xtr, ytr = self.split[0][: args.samples], self.split[1][: args.samples]
            bs = args.batch_size or len(Xtr)
            data: Any = [(torch.from_numpy(Xtr[i : i + bs]), torch.from_numpy(ytr[i : i + bs]))
                    for i in range(0, len(Xtr), bs)]
            data = data[0] if len(data) == 1 else data
        else:
            data = _to_torch(self.data, torch)
        data = shard_data(data, self.comm)
        H = st.hessian(self.model, self.loss_fn, data, comm=self.comm)
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        return Setup(H, self.description, dtype)
