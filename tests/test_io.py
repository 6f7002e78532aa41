"""specops.io: the one JSON encoding (strict JSON, exact round trip) and atomic writes."""

import json
import os

import numpy as np
import pytest

from specops import io


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_exact_and_strict(dtype):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4)).astype(dtype)
    data = {"a": a, "s": a[0, 0], "inf": float("inf"), "ninf": -np.inf, "nan": float("nan"), "list": [1, 2.5, None],
            "t": (np.int64(3), np.bool_(True)), 7: "key"}
    text = io.dumps(data)
    raw = _strict(text)                                   # no Infinity/NaN constants in the text
    assert raw["inf"] == {"__float__": "inf"} and raw["ninf"] == {"__float__": "-inf"}
    assert raw["nan"] == {"__float__": "nan"} and raw["7"] == "key" and raw["t"] == [3, True]
    back = io.loads(text)
    assert back["a"].dtype == a.dtype and np.array_equal(back["a"], a)          # bit for bit, dtype kept
    assert back["s"] == float(a[0, 0]) and back["inf"] == np.inf and back["ninf"] == -np.inf
    assert np.isnan(back["nan"]) and back["list"] == [1, 2.5, None]
    assert io.to_jsonable(io.to_jsonable(data)) == io.to_jsonable(data)       # encoded data is left as is


def test_atomic_write_replaces_whole_files(tmp_path):
    path = str(tmp_path / "f.json")
    io.atomic_write(path, "old")
    io.atomic_write(path, b"new")
    with open(path) as fh:
        assert fh.read() == "new"
    assert os.listdir(tmp_path) == ["f.json"]                                 # no temporary file left
    io.atomic_save_npz(str(tmp_path / "v.npz"), {"x": np.arange(3.0)})
    with np.load(tmp_path / "v.npz") as d:
        assert np.array_equal(d["x"], np.arange(3.0))
    with pytest.raises(FileNotFoundError):
        io.atomic_write(str(tmp_path / "missing" / "f"), "x")
