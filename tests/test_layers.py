"""The layers: the core (specops/ outside its applications, backends/) never imports an application.

Applications: ``specops.cli`` (``specops analyze`` with its report, ``specops study``),
``specops.plots`` (figures), ``specops.callbacks``, ``specops.zoo`` and matplotlib. Checked
twice: each core module imported in a fresh interpreter leaves none of them in ``sys.modules``,
and no core module's source names one in an import statement (a function-level import
included), except the plot methods that are the users' way into the figures.
"""

import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLICATIONS = ("specops.cli", "specops.plots", "specops.callbacks", "specops.zoo", "matplotlib")
# the plot methods of results and of the tracker's log: thin hooks that import the figures when called
PLOT_HOOKS = {"specops/density.py": {"matplotlib.pyplot"}, "specops/landscape.py": {"matplotlib.pyplot"},
              "specops/tracker_log.py": {"specops.plots"}}


def _core_files():
    out = []
    for top, package in (("specops", "specops"), ("backends", "specops.backends")):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(folder, ROOT)
            parts = rel.split(os.sep)
            if top == "specops" and len(parts) > 1 and parts[1] in ("cli", "plots", "callbacks", "zoo"):
                continue
            for f in sorted(files):
                if f.endswith(".py") and f != "__main__.py":   # python -m specops: the command line's entry
                    mod = ".".join([package, *parts[1:]] + ([] if f == "__init__.py" else [f[:-3]]))
                    out.append((os.path.join(rel, f), mod))
    return sorted(out)


def _is_application(name):
    return any(name == a or name.startswith(a + ".") for a in APPLICATIONS)


def test_core_modules_import_no_application():
    modules = [m for _, m in _core_files()]
    assert "specops.tracker" in modules and "specops.io" in modules and "specops.backends.torch" in modules
    assert not any(_is_application(m) for m in modules)
    # TensorFlow imports matplotlib itself: its backend modules run in a second interpreter, after TensorFlow
    tensorflow = [m for m in modules if m.startswith("specops.backends.tensorflow")]
    assert tensorflow
    bad = _imported_applications([m for m in modules if m not in tensorflow])
    bad.update(_imported_applications(tensorflow, first="tensorflow"))
    assert not bad, f"core modules that import the application layer (and what they imported): {bad}"


def _imported_applications(modules, first=None):
    """In a fresh interpreter (this one has imported the command line): each module in turn, and after each the
    application modules it pulled in (one interpreter for all: importing specops.X imports specops first anyway).
    ``first``: a framework imported before, whose own imports are not counted."""
    script = (
        "import importlib, json, sys\n"
        "apps = " + repr(APPLICATIONS) + "\n"
        "def loaded():\n"
        "    return {m for m in sys.modules if any(m == a or m.startswith(a + '.') for a in apps)}\n"
        + (f"import {first}\n" if first else "") +
        "seen, bad = loaded(), {}\n"
        "for mod in sys.argv[1:]:\n"
        "    importlib.import_module(mod)\n"
        "    new = loaded() - seen\n"
        "    if new:\n"
        "        bad[mod] = sorted(new)[:5]\n"
        "        seen |= new\n"
        "print(json.dumps(bad))\n")
    p = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_core_sources_name_no_application():
    bad = {}
    for path, _ in _core_files():
        with open(os.path.join(ROOT, path)) as fh:
            tree = ast.parse(fh.read(), path)
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        found = {n for n in names if _is_application(n)} - PLOT_HOOKS.get(path, set())
        found = {n for n in found if not any(n.startswith(h + ".") for h in PLOT_HOOKS.get(path, ()))}
        if found:
            bad[path] = sorted(found)
    assert not bad, f"core modules naming the application layer in an import: {bad}"
