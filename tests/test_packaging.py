"""The distribution ships backends/ as specops.backends (the package-dir mapping)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_backends_and_zoo(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("specops-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("numpy.py", "torch/__init__.py", "jax/__init__.py", "tensorflow/__init__.py", "tensorflow/optim.py"):
        assert f"specops/backends/{module}" in names
    # every module of the source tree ships (a new subpackage missing from pyproject's list fails here)
    sources = {str(f.relative_to(ROOT)) for f in (ROOT / "specops").rglob("*.py")}
    sources |= {"specops/" + str(f.relative_to(ROOT)) for f in (ROOT / "backends").rglob("*.py")}
    assert not sources - names, f"missing from the wheel: {sorted(sources - names)}"
    assert "specops/cli/study/runs.py" in names and "specops/distributed/mpi.py" in names
    assert "specops/py.typed" in names  # PEP 561: the package ships its type hints
    assert not any(n.startswith(("backends/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "specops = specops.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
