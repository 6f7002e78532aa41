"""Image classification data for the zoo models, as NumPy arrays (no downloads).

- :func:`digits`: scikit-learn's 8x8 hand-written digits (1797 images, shipped with
  scikit-learn), as 1-channel images, optionally upsampled.
- :func:`cifar`: CIFAR-10 or CIFAR-100 from a local folder holding the standard
  "python version" pickle batches (``cifar-10-batches-py`` / ``cifar-100-python``).
- :func:`batches`: split arrays into a list of ``(inputs, targets)`` batches, the form
  every backend's ``hessian`` takes.

Images come as float32 ``(N, C, H, W)`` standardized per channel, labels as int64.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from specops._checks import positive_int

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _standardize(X: np.ndarray) -> np.ndarray:
    mean = X.mean(axis=(0, 2, 3), keepdims=True)
    std = X.std(axis=(0, 2, 3), keepdims=True)
    return ((X - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def digits(size: int = 8, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 1-channel images.

    Args:
        size: image side; 8 is the original, a multiple of 8 repeats pixels, any other
            size interpolates linearly.
        n: keep this many images (a seeded random subset); default all 1797.
        seed: seed of the shuffle. The images are always shuffled, so any prefix is a
            class-balanced sample.

    Returns:
        ``(X, y)``: float32 ``(N, 1, size, size)`` standardized, int64 ``(N,)``.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(X))
    if n is not None:
        if not 0 < n <= len(X):
            raise ValueError(f"digits has {len(X)} images; n must be in 1..{len(X)}, got {n}")
        order = order[:n]
    X = (X[order] / 16.0).reshape(-1, 1, 8, 8)
    if size != 8:
        if size % 8 == 0:
            X = X.repeat(size // 8, axis=2).repeat(size // 8, axis=3)
        else:
            from scipy.ndimage import zoom

            X = zoom(X, (1, 1, size / 8, size / 8), order=1)
    return _standardize(X), y[order].astype(np.int64)


def cifar(root: str, name: str = "cifar10", train: bool = True, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 from the standard python pickle batches in a local folder.

    Args:
        root: a folder holding ``cifar-10-batches-py`` (``data_batch_1..5``,
            ``test_batch``) or ``cifar-100-python`` (``train``, ``test``), or that folder
            itself.
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        train: the training set (50000 images) or the test set (10000).
        n: keep the first ``n`` images.

    Returns:
        ``(X, y)``: float32 ``(N, 3, 32, 32)`` standardized per channel, int64 ``(N,)``.

    Raises:
        FileNotFoundError: the batches are not there (saying where they were looked for
            and where to get them).
    """
    base, files, key = cifar_files(root, name, train)
    xs, ys = [], []
    for f in files:
        with open(os.path.join(base, f), "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0)
        ys.append(np.asarray(d[key], dtype=np.int64))
    X, y = np.concatenate(xs), np.concatenate(ys)
    if n is not None:
        X, y = X[:n], y[:n]
    return _standardize(X), y


def cifar_files(root: str, name: str = "cifar10", train: bool | None = True) -> tuple[str, list, bytes]:
    """The folder, batch files and label key of CIFAR-10/100 under ``root``, checked to exist.

    Args:
        root: a folder holding the data set's folder, or that folder itself (as for :func:`cifar`).
        name: ``"cifar10"`` or ``"cifar100"``.
        train: the training batches (``True``), the test batch (``False``) or both (``None``).

    Returns:
        ``(folder, files, key)``: the folder of the batches, their file names, and the key of
        the labels in each unpickled batch.

    Raises:
        ValueError: an unknown ``name``.
        FileNotFoundError: a batch file is missing (naming every missing file and where to get them).
    """
    if name not in CIFAR_FOLDERS:
        raise ValueError(f"name must be one of {sorted(CIFAR_FOLDERS)}, got {name!r}")
    folder = CIFAR_FOLDERS[name]
    base = root if os.path.basename(os.path.normpath(root)) == folder else os.path.join(root, folder)
    if name == "cifar10":
        files = ([f"data_batch_{i}" for i in range(1, 6)] if train in (True, None) else []) + (
            ["test_batch"] if train in (False, None) else [])
        key = b"labels"
    else:
        files = (["train"] if train in (True, None) else []) + (["test"] if train in (False, None) else [])
        key = b"fine_labels"
    missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: {', '.join(os.path.join(base, f) for f in missing)} missing. Download the "
            f"'python version' from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it so that "
            f"{os.path.join(root, folder)} exists (specops downloads nothing)"
        )
    return base, files, key


def batches(X: Any, y: Any, batch_size: int) -> list:
    """``(X, y)`` as a list of ``(inputs, targets)`` batches of ``batch_size`` rows (the last may be shorter).

    Args:
        X: inputs (anything that slices along its first axis: an array, a tensor).
        y: targets, one per row of ``X``.
        batch_size: rows per batch.

    Returns:
        The list of ``(X[i:i + batch_size], y[i:i + batch_size])``.

    Raises:
        ValueError: ``batch_size < 1``.
    """
    batch_size = positive_int("batch_size", batch_size)
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]
