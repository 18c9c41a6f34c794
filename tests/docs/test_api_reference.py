"""The API reference covers every public module and every public name has a docstring.

``mkdocs build --strict`` (CI) runs the same check through docs/hooks/check_docstrings.py;
these tests pin the check itself down on small packages written here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


check = _load("check_docstrings")
house_style = _load("griffe_house_style")


def _page_modules() -> set[str]:
    """Every ``::: module`` on an API page, ``members: false`` or not."""
    found = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        for line in page.read_text().splitlines():
            if line.startswith(":::"):
                found.add(line.split()[1])
    return found


def test_every_package_and_public_module_has_a_page() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    public = {p for p in packages if p != "pml_margins"} | {"pml_margins.schedules"}
    # the adapters' source folder is adapters/ (installed as pml_margins.adapters)
    documented = {
        m.replace("adapters", "pml_margins.adapters", 1) if m.startswith("adapters") else m
        for m in _page_modules()
    }
    assert public <= documented, public - documented


def test_every_public_name_in_the_rendered_modules_has_a_docstring() -> None:
    modules = check.rendered_modules()
    assert "pml_margins.distributed" in modules and "adapters.lightning" in modules
    assert check.missing_docstrings(modules, [ROOT]) == []


def test_missing_docstrings_are_named(tmp_path: Path) -> None:
    pkg = tmp_path / "toypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""Toy."""\n'
        "from toypkg.impl import bare, documented\n"
        '__all__ = ["CONST", "UNDOCUMENTED_CONST", "bare", "documented", "ghost"]\n'
        "#: a documented constant\n"
        "CONST = 1\n"
        "UNDOCUMENTED_CONST = 2\n"
    )
    (pkg / "impl.py").write_text(
        'def documented():\n    """Yes."""\n\n\ndef bare():\n    return 1\n'
    )
    (tmp_path / "noall.py").write_text('"""No __all__."""\nx = 1\n')
    missing = check.missing_docstrings(["toypkg", "noall"], [tmp_path])
    assert missing == [
        "toypkg.UNDOCUMENTED_CONST",
        "toypkg.bare",
        "toypkg.ghost",
        "noall.__all__",
    ]


def test_members_false_pages_are_not_checked(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("::: one\n\n::: two\n    options:\n      members: false\n")
    (tmp_path / "b.md").write_text("text\n::: three\n    options:\n      heading_level: 3\n")
    assert check.rendered_modules(tmp_path) == ["one", "three"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Run.\n\nArgs:\n    a, b: shared.\n    c: own.\n\nReturns:\n    x, y: a pair.",
            "Run.\n\nArgs:\n    a: shared.\n    b: shared.\n    c: own."
            "\n\nReturns:\n    x, y: a pair.",
        ),
        (
            "Args:\n    query, query_labels (Tensor): all.",
            "Args:\n    query (Tensor): all.\n    query_labels (Tensor): all.",
        ),
        ("Text with a, b: not an argument.", "Text with a, b: not an argument."),
    ],
)
def test_combined_args_become_one_entry_per_name(text: str, expected: str) -> None:
    assert house_style.split_combined_args(text) == expected
