"""mkdocs hook: fail the build when a public name has no docstring.

A public name is one listed in ``__all__`` of a module that an API page renders
(a ``::: module`` line under ``docs/api/``, unless its options say
``members: false``). mkdocstrings silently leaves such names out of the page;
this hook stops the build instead, naming each of them. It reads the sources
with griffe, as mkdocstrings does (so nothing is imported), and is also run by
``tests/docs/test_api_reference.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[2]
API_PAGES = ROOT / "docs" / "api"
_EXTENSION = "griffe_house_style.py"  # the one mkdocs.yml loads
_DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$")


def rendered_modules(pages: Path = API_PAGES) -> list[str]:
    """The modules whose members the API pages render, in page order."""
    modules = []
    for page in sorted(pages.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            match = _DIRECTIVE.match(line)
            if not match:
                continue
            options = []
            for following in lines[i + 1 :]:
                if following.strip() and not following.startswith(" "):
                    break
                options.append(following.strip())
            if "members: false" not in options:
                modules.append(match.group(1))
    return modules


def _has_docstring(obj: griffe.Object | griffe.Alias) -> bool:
    try:
        docstring = obj.docstring
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return docstring is not None and bool(docstring.value.strip())


def missing_docstrings(modules: Iterable[str], search_paths: Sequence[str | Path]) -> list[str]:
    """``module.name`` for every name in a module's ``__all__`` without a docstring.

    A name in ``__all__`` that the module does not define or import counts as missing,
    as does one that griffe reads as a submodule: a function or class imported under its
    own module's name (``from .x import x``) is shadowed by the submodule in griffe's
    tree, and mkdocstrings (``show_submodules: false``) then leaves it out of the page.
    A module without ``__all__`` counts as one missing entry (``module.__all__``).
    """
    extensions = griffe.load_extensions(f"{Path(__file__).with_name(_EXTENSION)}:HouseStyle")
    loader = griffe.GriffeLoader(search_paths=[str(p) for p in search_paths], extensions=extensions)
    missing = []
    for name in modules:
        module = loader.load(name)
        loader.resolve_aliases(implicit=False, external=None)
        if module.exports is None:
            missing.append(f"{name}.__all__")
            continue
        for export in module.exports:
            export_name = export if isinstance(export, str) else export.name
            member = module.members.get(export_name)
            if member is None or member.is_module or not _has_docstring(member):
                missing.append(f"{name}.{export_name}")
    return missing


def on_pre_build(config: object) -> None:
    """mkdocs entry point: raise when :func:`missing_docstrings` finds any."""
    from mkdocs.exceptions import PluginError

    missing = missing_docstrings(rendered_modules(), [ROOT])
    if missing:
        raise PluginError(
            f"{len(missing)} public name(s) without a docstring (document them, or drop "
            "them from __all__ / make them private): " + ", ".join(missing)
        )
