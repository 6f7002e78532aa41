"""The ``specops`` command: ``specops analyze`` turns a model into a complete curvature report.

With no arguments it trains a small ResNet (batch norm, residual connections;
:mod:`specops.zoo.torch_resnet`) on scikit-learn's digits for a few seconds and
analyses its loss Hessian: the top eigenvalues, the trace, the eigenvalue spectral
density, the same per block (ResNet stage), and the loss landscape along the top
eigenvectors. ``docs/cli.md`` documents every argument and the callable contracts;
``specops analyze --help`` lists them.

Every stage's result goes to ``--out/results.json`` (atomically) as soon as it is
done; ``--resume`` skips the finished stages of an interrupted run. Under
``mpiexec -n N`` the data is sharded over the ranks, every rank computes, and rank 0
alone writes and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import math
import os
import sys
import time

import numpy as np

from specops import report as rp

DEFAULT_OUT = "specops-report"
LOSSES = ("cross_entropy", "mse")
LANDSCAPES = ("none", "1d", "2d")
BACKENDS = ("torch", "jax", "tensorflow")
#: Environment variables by which MPI launchers announce the number of processes.
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")
#: Parameters of the default model's data: digits images held out for the accuracy.
DEFAULT_HELD_OUT = 297


class UsageError(ValueError):
    """An invalid argument, found before any computation."""


# --- argument parsing -------------------------------------------------------------------------
def _number(kind, minimum=None, exclusive=False, maximum=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if exclusive else '>='} {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _span(text):
    return "auto" if text == "auto" else _number(float, 0, exclusive=True)(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specops", description="Spectra of neural-network loss Hessians.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser(
        "analyze", help="one command from model to a complete curvature report",
        description="Top eigenvalues, trace, spectral density, per-block curvature and the loss landscape of "
                    "a model's loss Hessian, written to --out (results.json, esd.png, landscape.png, "
                    "blocks.png, summary.md). Without --model: a small ResNet trained on digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = a.add_argument_group("model and data")
    g.add_argument("--model", metavar="MODULE:CALLABLE",
                   help="callable returning the model (torch: an nn.Module; jax: (apply_fn, params); tensorflow: "
                        "a keras Model); default: a ResNet-8 trained on digits")
    g.add_argument("--data", metavar="MODULE:CALLABLE",
                   help="callable returning the data: one batch (inputs, targets) or a list of batches; "
                        "default: digits (with the default model)")
    g.add_argument("--loss", default="cross_entropy",
                   help=f"{' or '.join(LOSSES)}, or MODULE:CALLABLE returning the batch mean: loss(outputs, "
                        "targets) for torch and jax, loss(targets, outputs) (Keras order) for tensorflow")
    g.add_argument("--checkpoint", metavar="PATH", help="torch state_dict to load into the model")
    g.add_argument("--backend", choices=BACKENDS, default="torch")
    g.add_argument("--device", default="auto", help="torch device (cpu, cuda, cuda:1); auto: cuda if available")
    g.add_argument("--dtype", choices=("model", "float32", "float64"), default="model",
                   help="floating dtype of the analysis (model: the model's own)")
    g.add_argument("--samples", type=_number(int, 1), default=512,
                   help="default data: training images the Hessian is taken over")
    g.add_argument("--batch-size", type=_number(int, 1), default=None,
                   help="default data: split the samples into batches of this size")
    g.add_argument("--epochs", type=_number(int, 0), default=8, help="default model: training epochs")
    g.add_argument("--threads", type=_number(int, 1), default=None,
                   help="torch CPU threads per process (default: 1 for the default model, whose 8x8 "
                        "convolutions gain nothing from more; torch's own choice otherwise, divided by the "
                        "number of MPI ranks)")
    g = a.add_argument_group("analysis")
    g.add_argument("--blocks", default="auto",
                   help="per-block analysis: 'auto' (top-level modules), 'stages' (ResNet stem, stage1..3, "
                        "head), 'none', or comma-separated module prefixes / glob patterns")
    g.add_argument("--top-k", type=_number(int, 1), default=3, help="top eigenvalues of the full Hessian")
    g.add_argument("--eig-tol", type=_number(float, 0, exclusive=True), default=1e-3,
                   help="relative residual tolerance of the eigenvalues")
    g.add_argument("--eig-matvecs", type=_number(int, 1), default=500, help="product budget of each eigsh")
    g.add_argument("--trace-rtol", type=_number(float, 0, exclusive=True), default=0.02,
                   help="stop the trace estimate once stderr <= rtol * |trace|")
    g.add_argument("--trace-matvecs", type=_number(int, 3), default=200, help="product budget of the trace")
    g.add_argument("--block-trace-matvecs", type=_number(int, 3), default=60,
                   help="product budget of each block's trace")
    g.add_argument("--esd-probes", type=_number(int, 1), default=5, help="SLQ probe vectors")
    g.add_argument("--esd-steps", type=_number(int, 2), default=64, help="Lanczos steps per SLQ probe")
    g.add_argument("--landscape", choices=LANDSCAPES, default="2d", help="loss landscape: none, a line or a plane")
    g.add_argument("--landscape-directions", choices=("eigen", "filter", "random"), default="eigen",
                   help="top eigenvectors, filter-normalized random (Li et al. 2018), or unit random")
    g.add_argument("--landscape-span", type=_span, default="auto",
                   help="half-width of the landscape grid in units of the directions; auto: 1 for filter-"
                        "normalized directions (Li et al.), else sqrt(4 / top eigenvalue), where the quadratic "
                        "model rises by 2")
    g.add_argument("--landscape-steps", type=_number(int, 2, maximum=201), default=21, help="grid points per axis")
    g.add_argument("--seed", type=_number(int, 0), default=0, help="seed of every random choice")
    g = a.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, skipping finished stages")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds an earlier run")
    g.add_argument("--stages", default=",".join(rp.STAGES[1:]),
                   help="comma-separated stages to run (others are skipped)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


# --- distribution -----------------------------------------------------------------------------
def launched_size(environ=None) -> int:
    """The number of processes an MPI launcher started, from its environment (1 if none)."""
    environ = os.environ if environ is None else environ
    for var in MPI_SIZE_VARS:
        try:
            return max(int(environ[var]), 1)
        except (KeyError, ValueError):
            continue
    return 1


def detect_comm():
    """An :class:`~specops.distributed.MPIComm` under ``mpiexec -n N`` with N > 1, else the
    single-process communicator (and mpi4py is not imported)."""
    from specops.distributed import Comm, MPIComm

    if launched_size() <= 1:
        return Comm()
    comm = MPIComm()
    return comm if comm.size > 1 else Comm()


# --- loading user callables -------------------------------------------------------------------
def load_callable(spec: str, what: str):
    """``"package.module:name"`` -> the object (``name`` may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} must look like 'module:callable' (e.g. mypkg.models:make_model), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{what}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what}: {spec} is not callable")
    return obj


def _call(fn, what):
    try:
        return fn()
    except Exception as e:
        raise UsageError(f"{what} raised {type(e).__name__}: {e}") from e


# --- blocks -------------------------------------------------------------------------------------
def resolve_blocks(spec: str, names: list[str]) -> dict:
    """``--blocks`` -> block name -> list of patterns, checked against the parameter names."""
    from specops.model import select_names

    spec = spec.strip()
    if spec == "none":
        return {}
    tops = list(dict.fromkeys(n.split(".")[0] for n in names))
    if spec in ("auto", "stages"):
        if spec == "stages" and not {"stage1", "stage2", "stage3"} <= set(tops):
            raise UsageError("--blocks stages needs a ResNet from specops.zoo.torch_resnet (modules stem, stage1, "
                             f"stage2, stage3, head); this model's top-level modules are: {', '.join(tops)}")
        return {t: [t] for t in tops} if len(tops) > 1 else {}
    blocks = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            select_names(names, item)
        except ValueError:
            raise UsageError(f"unknown block {item!r}: no parameter name starts with it or matches it; the "
                             f"model's top-level modules are: {', '.join(tops)}") from None
        blocks[item] = [item]
    if not blocks:
        raise UsageError("--blocks is empty; pass 'none' to skip the per-block analysis")
    return blocks


# --- the model setups ----------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """What the stages need: the operator and how it was made."""

    H: object
    description: str
    dtype: str
    shapes: dict | None = None


def _shard_data(data, comm):
    """This rank's part: a list of batches is split by batches when there are enough, otherwise
    every batch (or the single batch) is split by samples."""
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


def default_model(seed: int = 0):
    """The default network: ResNet-8 (batch norm, residual connections), width 8, for 1x8x8 digits."""
    import torch

    from specops.zoo.torch_resnet import resnet

    torch.manual_seed(seed)
    return resnet(8, num_classes=10, in_channels=1, width=8, batch_norm=True, residual=True)


def default_data(samples: int = 512, seed: int = 0):
    """Digits split for the default run: ``(train_X, train_y, test_X, test_y)``; the Hessian is
    taken over the first ``samples`` training images."""
    from specops.zoo.data import digits

    X, y = digits(seed=seed)
    n_train = len(X) - DEFAULT_HELD_OUT
    if samples > n_train:
        raise UsageError(f"--samples {samples}: the digits training split has {n_train} images")
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def _to_torch(obj, torch):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _to_torch(v, torch) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_torch(v, torch) for v in obj)
    if isinstance(obj, list):
        return [_to_torch(v, torch) for v in obj]
    return obj


def _torch_loss(spec: str):
    from torch import nn

    if spec == "cross_entropy":
        return nn.CrossEntropyLoss()
    if spec == "mse":
        return nn.MSELoss()
    fn = load_callable(spec, "--loss")
    return fn() if isinstance(fn, type) else fn


def _load_checkpoint(model, path: str, torch):
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


class TorchSession:
    """Builds the torch model, data and operator; trains the default model as a stage."""

    def __init__(self, args, comm):
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
            self.model = _call(load_callable(args.model, "--model"), "--model")
            if not isinstance(self.model, torch.nn.Module):
                raise UsageError(f"--model {args.model} returned a {type(self.model).__name__}; with --backend "
                                 "torch it must return a torch.nn.Module")
            self.description = f"{type(self.model).__name__} from {args.model}"
            self.data = _call(load_callable(args.data, "--data"), "--data")
        self.loss_fn = _torch_loss(args.loss)
        if args.checkpoint:
            _load_checkpoint(self.model, args.checkpoint, torch)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def needs_training(self) -> bool:
        return self.default and not self.args.checkpoint

    def train(self, state, out: str, printer):
        """The ``train`` stage: rank 0 trains (or reloads ``model.pt`` on resume), every rank gets the weights."""
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
            bar = rp.ProgressBar("train", args.epochs, "epochs", enabled=printer.progress)
            info = train(self.model, Xtr, ytr, epochs=args.epochs, seed=args.seed,
                         log=lambda e, loss, acc: bar.update(e))
            info["test_accuracy"] = accuracy(self.model, torch.from_numpy(Xte), torch.from_numpy(yte))
            bar.close(f" accuracy {info['train_accuracy']:.3f} train, {info['test_accuracy']:.3f} held out")
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
        from specops.backends import torch as st

        torch, args = self.torch, self.args
        self.model.eval()   # the analysis is of the trained network: batch norm with running statistics
        if args.dtype != "model":
            self.model.to(getattr(torch, args.dtype))
        self.model.to(self.dev)
        if self.default:
            Xtr, ytr = self.split[0][: args.samples], self.split[1][: args.samples]
            bs = args.batch_size or len(Xtr)
            data = [(torch.from_numpy(Xtr[i : i + bs]), torch.from_numpy(ytr[i : i + bs]))
                    for i in range(0, len(Xtr), bs)]
            data = data[0] if len(data) == 1 else data
        else:
            data = _to_torch(self.data, torch)
        data = _shard_data(data, self.comm)
        H = st.hessian(self.model, self.loss_fn, data, comm=self.comm)
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        return Setup(H, self.description, dtype)


class JaxSession:
    """``--model`` returns ``(apply_fn, params)``; the loss is ``loss(apply_fn(params, inputs), targets)``."""

    def __init__(self, args, comm):
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
        out = _call(load_callable(args.model, "--model"), "--model")
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and callable(out[0])):
            raise UsageError(f"--model {args.model} must return (apply_fn, params) with --backend jax")
        self.apply_fn, self.params = out
        self.data = _call(load_callable(args.data, "--data"), "--data")
        self.loss = self._loss(args.loss)
        self.description = f"JAX model from {args.model}"
        self.names = None
        self.needs_training = False

    def _loss(self, spec):
        jax, jnp = self.jax, self.jnp
        if spec == "cross_entropy":
            def loss(outputs, targets):
                logp = jax.nn.log_softmax(outputs)
                return -jnp.mean(jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=1))
            return loss
        if spec == "mse":
            return lambda outputs, targets: jnp.mean((outputs - targets) ** 2)
        return load_callable(spec, "--loss")

    def operator(self) -> Setup:
        apply_fn, loss = self.apply_fn, self.loss

        def loss_fn(params, batch):
            return loss(apply_fn(params, batch[0]), batch[1])

        data = _shard_data(self.data, self.comm)
        dtype = None if self.args.dtype == "model" else getattr(self.jnp, self.args.dtype)
        H = self.sj.hessian(loss_fn, self.params, data, comm=self.comm, dtype=dtype)
        self.names = list(H.param_blocks)
        return Setup(H, self.description, H.dtype.name)


class TensorflowSession:
    """``--model`` returns a Keras model; the loss is a Keras loss (``from_logits=True``)."""

    def __init__(self, args, comm):
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
        self.model = _call(load_callable(args.model, "--model"), "--model")
        self.data = _call(load_callable(args.data, "--data"), "--data")
        if args.loss == "cross_entropy":
            self.loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        elif args.loss == "mse":
            self.loss = tf.keras.losses.MeanSquaredError()
        else:
            self.loss = load_callable(args.loss, "--loss")
        self.description = f"Keras model from {args.model}"
        self.names = None
        self.needs_training = False

    def operator(self) -> Setup:
        H = self.stf.hessian(self.model, self.loss, _shard_data(self.data, self.comm), comm=self.comm)
        self.names = list(H.param_blocks)
        return Setup(H, self.description, H.dtype.name)


SESSIONS = {"torch": TorchSession, "jax": JaxSession, "tensorflow": TensorflowSession}


# --- the run ------------------------------------------------------------------------------------
class Printer:
    """Prints on rank 0 only; progress bars go to stderr."""

    def __init__(self, rank: int, progress: bool):
        self.rank0 = rank == 0
        self.progress = progress and self.rank0

    def __call__(self, text: str = "", stream=None):
        if self.rank0:
            print(text, file=stream or sys.stdout, flush=True)

    def bar(self, label: str, total: int, unit: str = "matvecs") -> rp.ProgressBar:
        return rp.ProgressBar(label, total, unit, enabled=self.progress)


#: Settings that identify the model and data; a resumed run must share them.
IDENTITY = ("model", "data", "loss", "checkpoint", "backend", "dtype", "samples", "batch_size", "epochs", "seed")


def _settings(args) -> dict:
    keys = [k for k in vars(args) if k not in ("command", "resume", "overwrite", "no_progress", "out")]
    return {k: getattr(args, k) for k in keys}


def _prepare_out(args, comm, printer) -> rp.ReportState:
    """Check --out, and load an earlier run's state on --resume (rank 0 reads, every rank gets it)."""
    error, data = None, None
    if comm.rank == 0:
        try:
            rp.check_writable(args.out)
            path = os.path.join(args.out, rp.RESULTS)
            if os.path.exists(path):
                if args.resume:
                    state = rp.ReportState(args.out)
                    state.load()
                    old = state.data["settings"]
                    diff = [k for k in IDENTITY if old.get(k) != getattr(args, k)]
                    if diff:
                        shown = ", ".join(f"--{k.replace('_', '-')} was {old.get(k)!r}, now {getattr(args, k)!r}"
                                          for k in diff)
                        raise UsageError(f"cannot resume the run in {args.out}: it analysed another model or data "
                                         f"({shown}); use the same arguments or another --out")
                    data = state.data
                elif not args.overwrite:
                    raise UsageError(f"--out {args.out} already holds a run ({path}); pass --resume to continue it "
                                     "or --overwrite to start over")
        except (UsageError, OSError, ValueError) as e:
            error = str(e)
    error, data = comm.bcast((error, data))
    if error:
        raise UsageError(error)
    state = rp.ReportState(args.out, write=comm.rank == 0)
    if data is not None:
        state.data = data
        printer(f"resuming the run in {args.out}: finished stages "
                f"{', '.join(s for s in state.data['stages'] if s != 'blocks_partial') or 'none'}")
    return state


def _check_args(args):
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in rp.STAGES]
    if unknown:
        raise UsageError(f"--stages: unknown stage {unknown[0]!r}; stages are {', '.join(rp.STAGES[1:])}")
    args.stages = ",".join(stages)
    if args.landscape == "2d" and args.landscape_directions == "eigen" and args.top_k < 2 and "landscape" in stages:
        raise UsageError("--landscape 2d along eigenvectors needs --top-k >= 2 (or --landscape-directions filter)")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")


def analyze(args) -> int:
    t_start = time.perf_counter()
    _check_args(args)
    comm = detect_comm()
    printer = Printer(comm.rank, not args.no_progress)
    state = _prepare_out(args, comm, printer)
    session = SESSIONS[args.backend](args, comm)
    blocks = resolve_blocks(args.blocks, session.names) if session.names is not None else None
    stages = args.stages.split(",")

    state.data["settings"] = _settings(args)
    state.data["versions"] = rp.library_versions()
    if session.needs_training:
        session.train(state, args.out, printer)
    setup = session.operator()
    H = setup.H
    if blocks is None:   # backends whose parameter names are known only from the operator
        blocks = resolve_blocks(args.blocks, session.names)
    loss = H.loss_at()
    model_info = dict(description=setup.description, num_params=int(H.shape[0]), num_samples=int(H.num_samples),
                      loss=loss, dtype=setup.dtype, engine=H.engine, ranks=comm.size,
                      blocks={name: int(s.stop - s.start) for name, s in H.param_blocks.items()})
    old = state.data.get("model") or {}
    if old.get("num_params") not in (None, model_info["num_params"]) or (
            old.get("loss") is not None and not math.isclose(old["loss"], loss, rel_tol=1e-5, abs_tol=1e-8)):
        raise UsageError(f"cannot resume the run in {args.out}: the model or data changed (it had "
                         f"{old.get('num_params')} parameters and loss {old.get('loss')}, now "
                         f"{model_info['num_params']} and {loss}); use another --out or --overwrite")
    state.data["model"] = model_info
    state.data["versions"] = rp.library_versions()
    state.save()
    printer(f"specops analyze: {rp.describe_model(state.data)}; {comm.size} rank(s); output in {args.out}")

    runner = StageRunner(args, H, state, printer, blocks)
    for name in ("eigen", "trace", "esd", "blocks", "landscape"):
        if name in stages:
            getattr(runner, name)()
    state.data["total_seconds"] = time.perf_counter() - t_start
    state.save()
    runner.write_summary()
    printer()
    printer(rp.summary_table(state.data))
    printer(f"\nreport: {os.path.join(args.out, 'summary.md')} ({time.perf_counter() - t_start:.1f} s)")
    return 0


class StageRunner:
    """Runs each analysis stage once, writes its result at once, and skips it when resumed."""

    def __init__(self, args, H, state, printer, blocks):
        self.args, self.H, self.state, self.printer, self.block_patterns = args, H, state, printer, blocks
        self.out = args.out
        self.eig = None
        self.images = []

    def _skip(self, name, settings) -> bool:
        if self.state.done(name, settings):
            self.printer(f"  {name}: finished earlier, skipped")
            return True
        return False

    def _eig_settings(self):
        a = self.args
        return dict(k=a.top_k, which="LA", tol=a.eig_tol, max_matvecs=a.eig_matvecs, seed=a.seed)

    def eigen(self):
        import specops as so

        settings = self._eig_settings()
        if self._skip("eigen", settings):
            return
        bar = self.printer.bar("top eigenvalues", self.args.eig_matvecs)
        t0 = time.perf_counter()
        A = rp.ProgressOperator(self.H, bar)
        self.eig = so.eigsh(A, k=self.args.top_k, tol=self.args.eig_tol, max_matvecs=self.args.eig_matvecs,
                            seed=self.args.seed)
        bar.close(f" {np.array2string(self.eig.eigenvalues, precision=4)}")
        if self.state.write:
            rp.atomic_save_npy(os.path.join(self.out, "eigenvectors.npy"), self.H.ops.to_numpy(self.eig.eigenvectors))
        self.state.finish("eigen", settings, self.eig.to_dict(), A.num_matvecs, time.perf_counter() - t0)

    def trace(self):
        import specops as so

        a = self.args
        settings = dict(method="auto", num_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed)
        if self._skip("trace", settings):
            return
        bar = self.printer.bar("trace", a.trace_matvecs)
        t0 = time.perf_counter()
        A = rp.ProgressOperator(self.H, bar)
        r = so.trace(A, method="auto", num_matvecs=a.trace_matvecs, rtol=a.trace_rtol, seed=a.seed)
        bar.close(f" {r.estimate:.5g} +- {r.stderr:.2g}")
        self.state.finish("trace", settings, r.to_dict(), A.num_matvecs, time.perf_counter() - t0)

    def esd(self):
        import specops as so
        from specops.density import SpectralDensity

        a = self.args
        settings = dict(num_probes=a.esd_probes, num_steps=a.esd_steps, seed=a.seed)
        if not self._skip("esd", settings):
            bar = self.printer.bar("spectral density", a.esd_probes * min(a.esd_steps, self.H.shape[0]))
            t0 = time.perf_counter()
            A = rp.ProgressOperator(self.H, bar)
            d = so.spectral_density(A, num_probes=a.esd_probes, num_steps=a.esd_steps, seed=a.seed)
            bar.close()
            self.state.finish("esd", settings, d.to_dict(), A.num_matvecs, time.perf_counter() - t0)
        d = SpectralDensity.from_dict(self.state.data["stages"]["esd"]["result"])
        tops = self.state.result("eigen")["eigenvalues"] if "eigen" in self.state.data["stages"] else []
        if self.state.write:
            rp.plot_esd(d, list(tops), os.path.join(self.out, "esd.png"))

    def blocks(self):
        import specops as so

        a = self.args
        if not self.block_patterns:
            self.printer("  blocks: none (a single top-level module; name blocks with --blocks)")
            return
        settings = dict(blocks=self.block_patterns, k=1, tol=a.eig_tol, max_matvecs=a.eig_matvecs,
                        trace_method="auto", trace_matvecs=a.block_trace_matvecs, rtol=a.trace_rtol,
                        seed=a.seed)
        if not self._skip("blocks", settings):
            partial = self.state.data["stages"].get("blocks_partial")
            done = partial["result"] if partial and partial.get("settings") == rp._to_jsonable(settings) else {}
            t0 = time.perf_counter()
            total = 0
            for name, patterns in self.block_patterns.items():
                if name in done:
                    self.printer(f"  block {name}: finished earlier, skipped")
                    total += done[name]["num_matvecs"]
                    continue
                tb = time.perf_counter()
                Hb = self.H.restrict(patterns)
                bar = self.printer.bar(f"block {name}", a.eig_matvecs + a.block_trace_matvecs)
                A = rp.ProgressOperator(Hb, bar)
                e = so.eigsh(A, k=1, tol=a.eig_tol, max_matvecs=a.eig_matvecs, seed=a.seed)
                t = so.trace(A, method="auto", num_matvecs=min(a.block_trace_matvecs, 3 * Hb.shape[0]),
                             rtol=a.trace_rtol, seed=a.seed)
                bar.close(f" top {e.eigenvalues[0]:.4g}, trace {t.estimate:.4g} +- {t.stderr:.2g}")
                done[name] = dict(num_params=int(Hb.shape[0]), eigen=e.to_dict(), trace=t.to_dict(),
                                  num_matvecs=A.num_matvecs, seconds=time.perf_counter() - tb)
                total += A.num_matvecs
                self.state.finish("blocks_partial", settings, done, total, time.perf_counter() - t0)
            seconds = sum(b["seconds"] for b in done.values())
            self.state.finish("blocks", settings, done, total, seconds)
            self.state.data["stages"].pop("blocks_partial", None)
            self.state.save()
        if self.state.write:
            rp.plot_blocks(self.state.data["stages"]["blocks"]["result"], os.path.join(self.out, "blocks.png"))

    def _eigenvectors(self):
        if self.eig is not None:
            return [self.eig.eigenvectors[:, j] for j in range(self.eig.eigenvectors.shape[1])]
        path = os.path.join(self.out, "eigenvectors.npy")
        V = self.H.ops.from_numpy(self.H.comm.bcast(np.load(path) if self.state.write else None))
        return [V[:, j] for j in range(V.shape[1])]

    def landscape(self):
        import specops as so
        from specops.landscape import Landscape, make_directions

        a = self.args
        if a.landscape == "none":
            return
        count = 1 if a.landscape == "1d" else 2
        kind = a.landscape_directions
        settings = dict(ndim=count, kind=kind, span=a.landscape_span, steps=a.landscape_steps, seed=a.seed,
                        bias="zero")
        if kind == "eigen":
            settings["eigen"] = self._eig_settings()
        if settings["span"] == "auto":
            settings["span"] = self._auto_span(kind)
        if not self._skip("landscape", settings):
            if kind == "eigen":
                if not self.state.done("eigen", self._eig_settings()):
                    raise UsageError("the eigen landscape needs the eigen stage: add 'eigen' to --stages")
                dirs = self._eigenvectors()[:count]
            else:
                dirs = make_directions(self.H, kind, count, seed=a.seed)
                if kind == "random":   # unit directions, so the span is in parameter norm like eigenvectors
                    dirs = [d * (1.0 / self.H.ops.norm(d)) for d in dirs]
            bar = self.printer.bar(f"landscape {a.landscape}", a.landscape_steps ** count + 1, "losses")
            ls = so.landscape(self.H, dirs, span=settings["span"], steps=a.landscape_steps, seed=a.seed,
                              kind=kind, callback=lambda done, total: bar.update(done))
            bar.close()
            self.state.finish("landscape", settings, ls.to_dict(), 0, ls.seconds)
        ls = Landscape.from_dict(self.state.data["stages"]["landscape"]["result"])
        if self.state.write:
            rp.plot_landscape(ls, os.path.join(self.out, "landscape.png"))

    def _auto_span(self, kind: str) -> float:
        if kind == "filter" or "eigen" not in self.state.data["stages"]:
            return 1.0
        top = float(self.state.result("eigen")["eigenvalues"][0])
        return float(f"{math.sqrt(4.0 / top):.3g}") if top > 0 else 1.0

    def write_summary(self):
        if not self.state.write:
            return
        images = [f for f in ("esd.png", "landscape.png", "blocks.png") if os.path.exists(os.path.join(self.out, f))]
        rp.atomic_write(os.path.join(self.out, "summary.md"), rp.summary_markdown(self.state.data, images))


def main(argv=None) -> int:
    """Entry point of the ``specops`` console script and ``python -m specops``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return analyze(args)
    except UsageError as e:
        if launched_size() <= 1 or os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":
            print(f"specops analyze: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nspecops analyze: interrupted; finished stages are in {args.out}/{rp.RESULTS}; continue with "
              "--resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
