"""Defects found by this session's review of the documentation, each test failing on the
code before its fix."""

from __future__ import annotations

from pathlib import Path

import griffe

from tests.docs.test_api_reference import ROOT, check, house_style


def test_a_name_shadowed_by_its_submodule_counts_as_missing(tmp_path: Path) -> None:
    """``from .thing import thing`` in a package: griffe reads ``thing`` as the submodule,
    mkdocstrings left the function out of the page, and the hook passed (as it did for
    ``pml_margins.functional.autograd_only``, the class the README's gradients-of-gradients
    section is about)."""
    pkg = tmp_path / "toyshadow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""Toy."""\nfrom toyshadow.thing import thing\n__all__ = ["thing"]\n'
    )
    (pkg / "thing.py").write_text('"""Its module."""\n\n\ndef thing():\n    """Its function."""\n')
    assert check.missing_docstrings(["toyshadow"], [tmp_path]) == ["toyshadow.thing"]


def test_autograd_only_is_rendered_as_the_class() -> None:
    functional = griffe.load("pml_margins.functional", search_paths=[str(ROOT)])
    member = functional.members["autograd_only"]
    assert not member.is_module and member.final_target.is_class


def test_rest_markup_becomes_markdown() -> None:
    """Roles, ``.. math::`` blocks and ``::`` literal blocks reached the site as raw text
    (142 roles and 7 math blocks on the functional page alone)."""
    text = (
        "See :func:`~pml_margins.functional.arcface_target` and :class:`torch.Tensor`,\n"
        ":meth:`.Loss.forward`, :math:`\\cos\\theta`.\n\n"
        ".. math::\n    a = b\n\n    c = d\n\n"
        "Example::\n\n    run()\n\nEnd.\n"
    )
    assert house_style.rest_to_markdown(text) == (
        "See `arcface_target` and `torch.Tensor`,\n"
        "`Loss.forward`, `\\cos\\theta`.\n\n"
        "```latex\na = b\n\nc = d\n```\n\n"
        "Example:\n\n```python\nrun()\n```\n\nEnd.\n"
    )


def test_no_rendered_docstring_keeps_rest_markup() -> None:
    extensions = griffe.load_extensions(
        f"{ROOT / 'docs' / 'hooks' / 'griffe_house_style.py'}:HouseStyle"
    )
    loader = griffe.GriffeLoader(search_paths=[str(ROOT)], extensions=extensions)
    leftovers = []
    modules = [loader.load(name) for name in check.rendered_modules()]
    loader.resolve_aliases(implicit=False, external=None)
    checked = 0
    for module in modules:
        for member in [module, *module.members.values()]:
            try:
                obj = member.final_target if member.is_alias else member
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            if obj.docstring is None:
                continue
            checked += 1
            value = obj.docstring.value
            if any(mark in value for mark in (":func:`", ":math:`", ".. math::", ":class:`")):
                leftovers.append(obj.path)
    assert checked > 200 and leftovers == []


def test_literal_blocks_inside_sections_and_inline_math_are_kept_whole() -> None:
    """From the review of the converter: a ``::`` block inside an Args item was fenced at
    the item's indentation (griffe then read the fence lines as items), an Args line
    ending in ``::`` without a blank line became a code block, a one-line ``.. math::``
    lost its formula, ``:math:`~x``` lost the tilde and a titled role kept its target."""
    inside = (
        "Args:\n    spec: a mapping like::\n\n        {'a': 1}\n"
        "    op: such as aten::\n        add (any namespace).\n"
    )
    assert house_style.rest_to_markdown(inside) == inside
    assert house_style.rest_to_markdown(
        "A :math:`.5 s`, :math:`~\\theta`, :class:`t <torch.Tensor>`.\n\n.. math:: a = b\n"
    ) == ("A `.5 s`, `~\\theta`, `t`.\n\n```latex\na = b\n```\n")
