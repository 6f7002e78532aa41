"""Griffe extension for the API reference: ``specops.backends`` and Sphinx-style roles.

1. The adapters live in the top-level ``backends/`` folder and are installed as the
   subpackage ``specops.backends`` (a package-dir mapping in pyproject.toml). Griffe reads
   source files by folder, so ``backends/`` is loaded here and attached to the ``specops``
   package, where the API reference looks for it.
2. ``specops/__init__.py`` re-exports functions named like their modules
   (``from specops.eigsh import eigsh``): at run time ``specops.eigsh`` is the function,
   so here too, for every such name in ``__all__``.
3. Docstrings cross-reference names with Sphinx roles (``:func:`eigsh```,
   ``:class:`~specops.EigResult```), which Markdown does not know. Each role becomes a
   link to the name's API entry when the reference documents it, else inline code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

BACKENDS = Path(__file__).resolve().parents[2] / "backends"
ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)`")


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as seen from ``obj``'s scope (``name`` if not found)."""
    head, _, rest = name.partition(".")
    for scope in (obj, *_parents(obj)):
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError, KeyError):
            continue
        return f"{path}.{rest}" if rest else path
    return name


def _parents(obj: griffe.Object):
    while obj.parent is not None:
        obj = obj.parent
        yield obj


def _link_roles(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        def link(match: re.Match) -> str:
            short, name = match.groups()
            shown = name.rsplit(".", 1)[-1] if short else name
            return f'<autoref optional identifier="{_resolve(obj, name)}"><code>{shown}</code></autoref>'

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _link_roles(member)


class BackendsSubpackage(griffe.Extension):
    """Attach ``backends/``, expose re-exported functions, turn Sphinx roles into links."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Once ``specops`` is loaded: attach ``backends/``, re-export, rewrite the roles."""
        if pkg.name != "specops":
            return
        if "backends" not in pkg.members:
            pkg.set_member("backends", loader.load(BACKENDS))
        _link_roles(pkg)
        for name in pkg.exports or ():
            member = pkg.members.get(name)
            if member is not None and member.is_module and name in member.members:
                pkg.set_member(name, griffe.Alias(name, member.members[name], parent=pkg))
