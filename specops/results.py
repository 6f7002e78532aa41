"""Result objects: host NumPy numbers plus the settings that produced them, round-tripping JSON."""

from __future__ import annotations

import dataclasses
import json

import numpy as np


def _to_jsonable(x):
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": x.dtype.name}
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return {"__float__": repr(x)}
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


def _from_jsonable(x):
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.array(x["__ndarray__"], dtype=x["dtype"])
        if "__float__" in x:
            return float(x["__float__"])
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


class Result:
    """Mixin for result dataclasses: ``to_dict``/``to_json``/``from_json``.

    Fields listed in ``_NOT_SERIALIZED`` (backend arrays such as eigenvectors) are
    left out of JSON and come back as ``None``.
    """

    _NOT_SERIALIZED: tuple = ()

    def to_dict(self) -> dict:
        d = {
            f.name: _to_jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in self._NOT_SERIALIZED
        }
        d["type"] = type(self).__name__
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        kind = d.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"this JSON holds a {kind}, not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: _from_jsonable(v) for k, v in d.items() if k in names}
        values.update({k: None for k in cls._NOT_SERIALIZED})
        return cls(**values)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))
