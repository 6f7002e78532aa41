"""The getting-started pages run: every ``python`` block of a page, in order, as one script.

Each page runs in its own interpreter (frameworks keep global state, e.g. Keras' floatx),
and its blocks check their own numbers against dense truth with ``assert``. A block
preceded by ``<!-- requires: PACKAGE -->`` runs only where that package is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGES = Path(__file__).resolve().parents[1] / "docs" / "getting-started"
BLOCK = re.compile(r"(?:<!-- requires: ([\w.]+) -->\s*\n)?```python\n(.*?)```", re.S)


def page_script(path: Path) -> tuple[str, list[str]]:
    """The page's runnable code, and the packages whose blocks were left out."""
    code, missing = [], []
    for requires, block in BLOCK.findall(path.read_text()):
        if requires and importlib.util.find_spec(requires) is None:
            missing.append(requires)
            continue
        code.append(block)
    return "\n".join(code), missing


def run_script(page: str, script: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env=env, cwd=PAGES)
    assert run.returncode == 0, f"{page} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("page", sorted(p.name for p in PAGES.glob("*.md")))
def test_getting_started_page_runs(page):
    script, _ = page_script(PAGES / page)
    assert script.strip(), f"{page} has no python block"
    run_script(page, script)


@pytest.mark.parametrize("requires", ["flax"])
def test_optional_blocks_are_run_where_installed(requires):
    """The blocks that need an optional package are in the scripts above when it is installed."""
    if importlib.util.find_spec(requires) is None:
        pytest.skip(f"{requires} is not installed: its getting-started blocks were not run")
    pages = [p for p in sorted(PAGES.glob("*.md")) if f"<!-- requires: {requires} -->" in p.read_text()]
    assert pages, f"no page has a block that requires {requires}"
    assert all(not page_script(p)[1] for p in pages)


def test_block_extraction_sees_every_fence(tmp_path):
    text = "a\n```python\nx = 1\n```\n<!-- requires: no_such_package_xyz -->\n```python\ny = 2\n```\n"
    (tmp_path / "page.md").write_text(text)
    assert page_script(tmp_path / "page.md") == ("x = 1\n", ["no_such_package_xyz"])


ROOT = PAGES.parents[1]


def ci_docs_command() -> str:
    """The docs-build line of ``.ci/run``, exactly as CI runs it."""
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "mkdocs build" in line]
    assert len(lines) == 1, f".ci/run should build the docs once, found {lines}"
    return lines[0].strip()


def build_docs_copy(tmp_path: Path, plant: str | None = None) -> subprocess.CompletedProcess:
    """Run CI's docs build in a copy of the sources, with ``plant`` appended to a docstring."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "site", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache",
        ".hypothesis", "tests"))
    if plant is not None:
        path = copy / "specops" / "density.py"
        text = path.read_text()
        anchor = '        Returns:\n'
        assert anchor in text
        path.write_text(text.replace(anchor, plant + anchor, 1))
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    command = ci_docs_command().replace(".venv/bin/mkdocs", f"{sys.executable} -m mkdocs")
    return subprocess.run(["bash", "-c", command], cwd=copy, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the docs toolchain is not installed")
def test_ci_docs_build_fails_on_a_docstring_warning(tmp_path):
    """CI's own docs command passes on the sources and fails once a malformed docstring is planted.

    ``--quiet`` once hid strict mode's warnings, so the build could not fail on one: this
    runs the very line of ``.ci/run``.
    """
    clean = build_docs_copy(tmp_path / "clean")
    assert clean.returncode == 0, f"the docs build fails on the sources:\n{clean.stderr[-3000:]}"
    planted = build_docs_copy(tmp_path / "planted",
                              plant="        Raises:\n            As the other functions do.\n\n")
    assert planted.returncode != 0, "a malformed Raises section did not fail CI's docs build"
    assert "Failed to get 'exception: description' pair" in planted.stderr
