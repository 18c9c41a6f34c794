"""Griffe extension: two documentation habits of this code base that griffe lacks.

- ``a, b: text`` in a Google-style ``Args:`` section documents both parameters
  (``block_rows, memory_budget: as exact_knn``). Griffe's parser reads that line as
  one parameter named ``"a, b"`` and warns that it is not in the signature; it is
  rewritten, before parsing, into one entry per name with the same text, so that a
  name really missing from the signature still fails ``mkdocs build --strict``.
- ``#: text`` on the line(s) above a module or class attribute is its docstring
  (the Sphinx convention), unless it has a docstring below it already.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_COMBINED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*(?:\([^)]*\))?\s*:.*)$")


def split_combined_args(text: str) -> str:
    """Return ``text`` with every ``a, b: description`` line of an Args section split."""
    lines, out, section_indent = text.splitlines(), [], None
    for line in lines:
        header = _SECTION.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            continue
        if section_indent is not None and line.strip():
            indent = len(line) - len(line.lstrip())
            if indent <= section_indent:
                section_indent = None
        match = _COMBINED.match(line) if section_indent is not None else None
        if match is None:
            out.append(line)
            continue
        indent, names, rest = match.groups()
        out.extend(f"{indent}{name.strip()}{rest}" for name in names.split(","))
    return "\n".join(out)


def comment_docstring(lines: Sequence[str], lineno: int) -> str | None:
    """The ``#:`` comment lines right above line ``lineno`` (1-based), joined; else ``None``."""
    found: list[str] = []
    index = lineno - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        found.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    return " ".join(found) or None


class HouseStyle(griffe.Extension):
    """Split combined ``Args:`` entries; read ``#:`` comments as attribute docstrings."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "," in obj.docstring.value:
            obj.docstring.value = split_combined_args(obj.docstring.value)

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
        except (KeyError, TypeError):
            return
        text = comment_docstring(lines, attr.lineno)
        if text:
            attr.docstring = griffe.Docstring(text, parent=attr)
