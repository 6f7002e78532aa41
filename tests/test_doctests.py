"""Every docstring example in specops and its backends runs, and prints what it shows.

Modules are found by scanning the source for ``>>>``, so a new example anywhere in the
package is picked up without a list to maintain.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (source folder, package name) pairs: backends/ installs as specops.backends.
PACKAGES = [(ROOT / "specops", "specops"), (ROOT / "backends", "specops.backends")]


def _module_name(path: Path, folder: Path, package: str) -> str:
    parts = path.relative_to(folder).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def modules_with_examples() -> list[str]:
    """Dotted names of the package's modules whose source contains a ``>>>`` example."""
    return sorted(
        _module_name(path, folder, package)
        for folder, package in PACKAGES
        for path in folder.rglob("*.py")
        if path.name != "__main__.py" and ">>>" in path.read_text()
    )


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    assert tests, f"{name} has '>>>' in its source but no docstring example doctest can find"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed (report above)"


@pytest.mark.parametrize("name", ["eigsh", "trace", "diagonal", "spectral_density", "aslinearoperator",
                                  "LinearOperator"])
def test_key_public_names_have_examples(name):
    import specops

    obj = getattr(specops, name)
    assert ">>>" in (obj.__doc__ or ""), f"specops.{name} has no Examples section"
