"""Adapter tests skip only when their extra is missing, and fail on a broken install."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adapters.conftest import require_extra


def test_a_missing_package_skips_and_says_so() -> None:
    with pytest.raises(pytest.skip.Exception, match="not installed: pip install x-extra"):
        require_extra("pml_margins_no_such_package_xyz", "x-extra")


def test_an_installed_package_that_fails_to_import_fails_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_extra_pkg.py").write_text(
        "raise ImportError('libtorchvision.so: undefined symbol')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"is installed but does not import.*undefined symbol"):
        require_extra("broken_extra_pkg", "x-extra")


def test_an_installed_package_is_returned() -> None:
    assert require_extra("json", "unused").__name__ == "json"
