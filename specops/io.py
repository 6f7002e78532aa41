"""Files and JSON, once for the whole package: atomic writes and the JSON encoding of results.

- :func:`to_jsonable` / :func:`from_jsonable`: NumPy arrays as ``{"__ndarray__", "dtype"}``,
  NumPy scalars as numbers, a non-finite float as ``{"__float__": "inf"}`` (``"-inf"``,
  ``"nan"``), so that the text is strict JSON (``allow_nan=False``) and reads back exactly.
  Results (``results.json``, :meth:`~specops.results.Result.to_json`), the tracker's log and
  the study all use it (:func:`dumps`, :func:`loads`).
- :func:`atomic_write`: a temporary file in the same folder, then ``os.replace``; the file gets
  the permissions of any new file (``0o666`` less the umask).

The core writes no figures; the application layer saves them with
:func:`specops.plots.atomic_savefig`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np


def to_jsonable(x: Any) -> Any:
    """``x`` as plain JSON data (see the module docstring for the encoding)."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": x.dtype.name}
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return {"__float__": repr(x)}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    return x


def from_jsonable(x: Any) -> Any:
    """The inverse of :func:`to_jsonable`: arrays back as NumPy arrays, non-finite floats as floats."""
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.array(x["__ndarray__"], dtype=x["dtype"])
        if "__float__" in x:
            return float(x["__float__"])
        return {k: from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_jsonable(v) for v in x]
    return x


def dumps(x: Any, **kwargs: Any) -> str:
    """``x`` as strict JSON text (:func:`to_jsonable`, ``allow_nan=False``; ``kwargs`` go to ``json.dumps``)."""
    return json.dumps(to_jsonable(x), allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """The data of :func:`dumps`'s text (:func:`from_jsonable`)."""
    return from_jsonable(json.loads(text))


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see the old file or the new one, never a partial one. The file gets the
    permissions of any new file (``0o666`` less the umask), not the temporary file's 0600:
    ``report.html`` is meant to be read by others.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    atomic_write(path, buf.getvalue())


def atomic_save_npz(path: str, arrays: dict) -> None:
    """Save a dict of arrays as ``.npz`` atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())
