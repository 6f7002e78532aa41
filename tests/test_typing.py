"""Type hints on every public function and method of the type-checked modules.

The modules are those mypy checks in CI (``[tool.mypy] files`` in pyproject.toml: files, or folders
whose every module counts); mypy
checks the hints are consistent, this test that none is missing on a public name.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(str(f.relative_to(ROOT)) for entry in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
               for f in ([ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py")))


def test_every_module_is_checked():
    assert {"specops/eigsh.py", "backends/torch/__init__.py", "specops/cli/study/runs.py"} <= set(FILES)


def module_name(file: str) -> str:
    parts = Path(file).with_suffix("").parts
    if parts[0] == "backends":
        parts = ("specops", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def missing_hints(func, where: str) -> list[str]:
    signature = inspect.signature(func)
    missing = [f"{where}({p})" for p in signature.parameters.values()
               if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")]
    if signature.return_annotation is inspect.Signature.empty and func.__name__ != "__init__":
        missing.append(f"{where} -> ?")
    return missing


def public_callables(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if attr == "__init__" and getattr(obj, "_is_protocol", False):
                    continue  # typing.Protocol's generated __init__ (a protocol is never constructed)
                if isinstance(member, property):
                    member = member.fget
                elif isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member


@pytest.mark.parametrize("module", [module_name(f) for f in FILES])
def test_public_functions_are_annotated(module):
    mod = importlib.import_module(module)
    missing = [m for name, func in public_callables(mod) for m in missing_hints(func, f"{module}.{name}")]
    assert not missing, "missing type hints:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_hint():
    def f(x, y: int):
        return x

    assert missing_hints(f, "f") == ["f(x)", "f -> ?"]


def test_py_typed_marker_is_packaged():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (ROOT / "specops" / "py.typed").exists()
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["specops"]
