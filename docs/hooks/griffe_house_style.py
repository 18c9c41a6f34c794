"""Griffe extension: three documentation habits of this code base that griffe lacks.

- ``a, b: text`` in a Google-style ``Args:`` section documents both parameters
  (``block_rows, memory_budget: as exact_knn``). Griffe's parser reads that line as
  one parameter named ``"a, b"`` and warns that it is not in the signature; it is
  rewritten, before parsing, into one entry per name with the same text, so that a
  name really missing from the signature still fails ``mkdocs build --strict``.
- ``#: text`` on the line(s) above a module or class attribute is its docstring
  (the Sphinx convention), unless it has a docstring below it already.
- The docstrings' reStructuredText (read by ``help()`` and Sphinx) in the Markdown that
  mkdocstrings renders: a role (``:func:`~a.b```, ``:math:`x```) becomes inline code
  (``b``, the LaTeX source), a ``.. math::`` block a fenced ``latex`` block, and a
  ``text::`` literal block a fenced ``python`` block after ``text:``; the site showed
  them as raw markup.
"""

from __future__ import annotations

import re
import textwrap
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


_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_TITLED = re.compile(r"^(.*?)\s*<[^<>]+>$")  # :class:`title <target>`
_HEADER = re.compile(r"^(\s*)[A-Z][A-Za-z ]*:\s*$")  # a Google section: Args:, Returns:


def _role(match: re.Match[str]) -> str:
    titled = _TITLED.match(match.group(2))
    if titled:
        return f"`{titled.group(1)}`"
    target = match.group(2).lstrip(".")
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fenced(
    lines: list[str], start: int, indent: str, language: str, out: list[str], first: str = ""
) -> int:
    """Append ``first`` and ``lines[start:]``'s block indented deeper than ``indent``
    (blank lines inside it kept) to ``out`` as a fenced ``language`` block; return where
    the block ends."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > len(indent)):
        end += 1
    body = textwrap.dedent("\n".join(lines[start:end])).strip("\n").splitlines()
    body = [first, *body] if first else body
    out.extend([f"{indent}```{language}", *(f"{indent}{b}".rstrip() for b in body)])
    out.extend([f"{indent}```", ""])
    return end


def rest_to_markdown(text: str) -> str:
    """``text`` with its reST roles, math blocks and literal blocks in Markdown (above).

    A literal block is reST's: a line ending in ``::``, a blank line, an indented block;
    inside a Google section (``Args:``, ``Returns:``, ...) it is left as it is, where a
    fence would split the section's items."""
    text = _ROLE.sub(_role, _MATH_ROLE.sub(lambda m: f"`{m.group(1)}`", text))
    lines, out, i, section = text.splitlines(), [], 0, None
    while i < len(lines):
        line = lines[i]
        header = _HEADER.match(line)
        if header:
            section = len(header.group(1))
        elif section is not None and line.strip() and _indent(line) <= section:
            section = None
        math = _MATH.match(line)
        if math:
            i = _fenced(lines, i + 1, math.group(1), "latex", out, math.group(2))
            continue
        blank = i + 1 < len(lines) and not lines[i + 1].strip()
        following = next((n for n in lines[i + 1 :] if n.strip()), "")
        literal = line.rstrip().endswith("::") and blank and _indent(following) > _indent(line)
        if literal and section is None:
            stripped = line.rstrip()[:-1]
            out.extend([stripped, ""] if stripped.strip() != ":" else [])
            i = _fenced(lines, i + 1, " " * _indent(line), "python", out)
            continue
        out.append(line)
        i += 1
    return "\n".join(out).rstrip("\n") + ("\n" if text.endswith("\n") else "")


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
        if obj.docstring is None:
            return
        if "," in obj.docstring.value:
            obj.docstring.value = split_combined_args(obj.docstring.value)
        if "`" in obj.docstring.value or "::" in obj.docstring.value:
            obj.docstring.value = rest_to_markdown(obj.docstring.value)

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or attr.lineno is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
        except (KeyError, TypeError):
            return
        text = comment_docstring(lines, attr.lineno)
        if text:
            attr.docstring = griffe.Docstring(rest_to_markdown(text), parent=attr)
