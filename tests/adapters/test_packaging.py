"""``adapters/`` ships as ``pml_margins.adapters``: wheel, editable install, lazy extras."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.adapters.conftest import REPO_ROOT, SOURCE_ADAPTERS

# the adapters that need an extra: module, the modules it needs, the extra, a name it exports
EXTRAS = [
    ("lightning", ("lightning", "lightning.pytorch"), "lightning", "MetricLearningModule"),
    ("sentence_transformers", ("sentence_transformers",), "sentence-transformers", "MetricLoss"),
]

# run in a fresh interpreter: imports the adapters package and reports what came with it
PROBE = """
import sys
import pml_margins.adapters as a
import pml_margins.adapters._extras  # a sub-module, without torch to keep this fast
heavy = sorted(m for m in ("lightning", "pytorch_lightning", "sentence_transformers",
                           "transformers") if m in sys.modules)
print(a.__file__)
print(",".join(heavy) or "-")
"""


def _copy_source(dest: Path) -> Path:
    """The files a build reads, copied so that building leaves the checkout untouched."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pml_margins", "adapters"):
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)
    return dest


def _pip(*args: str) -> None:
    pytest.importorskip("setuptools", reason="building without isolation needs setuptools")
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _probe(cwd: Path, env_path: str = "", site_dir: Path | None = None) -> tuple[Path, str]:
    """Import pml_margins.adapters in a clean interpreter started outside the checkout.

    ``-S``: without the environment's site-packages, so that an installed
    pml-margins (CI's own editable install) cannot shadow the one under test.
    """
    code = (
        PROBE if site_dir is None else f"import site; site.addsitedir({str(site_dir)!r})\n" + PROBE
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if env_path:
        env["PYTHONPATH"] = env_path
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return Path(out[0]), out[1]


def _source_modules() -> set[str]:
    return {p.relative_to(SOURCE_ADAPTERS).as_posix() for p in SOURCE_ADAPTERS.rglob("*.py")}


def test_wheel_ships_and_imports_the_adapters(tmp_path: Path) -> None:
    src = _copy_source(tmp_path / "src")
    _pip("wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist"))
    (wheel,) = (tmp_path / "dist").glob("pml_margins-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    shipped = {
        n.removeprefix("pml_margins/adapters/")
        for n in names
        if n.startswith("pml_margins/adapters/")
    }
    assert shipped == _source_modules()
    # no top-level `adapters` package: that name belongs to an unrelated PyPI project
    assert not [n for n in names if n.startswith("adapters/")]
    # every sub-package of the source tree is in the wheel (pyproject lists them by hand)
    for init in (REPO_ROOT / "pml_margins").rglob("__init__.py"):
        rel = init.relative_to(REPO_ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel: add it to [tool.setuptools] packages"

    target = tmp_path / "target"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    # the unrelated `adapters` distribution installed alongside: both must import
    (target / "adapters").mkdir()
    (target / "adapters" / "__init__.py").write_text("UNRELATED = True\n")
    where, heavy = _probe(tmp_path, env_path=str(target))
    assert where == target / "pml_margins" / "adapters" / "__init__.py"
    assert heavy == "-"  # importing the package imports no ecosystem
    check = "import adapters, pml_margins.adapters; assert adapters.UNRELATED"
    subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        check=True,
    )


def test_editable_install_maps_the_adapters_folder(tmp_path: Path) -> None:
    src = _copy_source(tmp_path / "src")
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip uninstalls the environment's own pml-margins first
    _pip(
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--ignore-installed",
        "--prefix",
        str(prefix),
        "-e",
        str(src),
    )
    site_dir = Path(
        sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    )
    where, heavy = _probe(tmp_path, site_dir=site_dir)
    assert where == src / "adapters" / "__init__.py"  # the source itself, not a copy
    assert heavy == "-"


def test_source_checkout_resolves_to_the_top_level_folder() -> None:
    import pml_margins.adapters

    assert Path(pml_margins.adapters.__file__).resolve() == SOURCE_ADAPTERS / "__init__.py"


@pytest.mark.parametrize(("module", "needs", "extra", "name"), EXTRAS)
def test_missing_extra_raises_an_install_hint(
    monkeypatch: pytest.MonkeyPatch, module: str, needs: tuple[str, ...], extra: str, name: str
) -> None:
    for mod in needs:
        monkeypatch.setitem(sys.modules, mod, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"pml_margins.adapters.{module}", raising=False)
    hint = f"pip install 'pml-margins[{extra}]'"
    with pytest.raises(ImportError, match=rf"pip install 'pml-margins\[{extra}\]'") as info:
        importlib.import_module(f"pml_margins.adapters.{module}")
    assert hint in str(info.value)
    import pml_margins.adapters

    with pytest.raises(ImportError, match=extra):
        getattr(pml_margins.adapters, name)


def test_unknown_attribute() -> None:
    import pml_margins.adapters

    with pytest.raises(AttributeError, match="no_such_thing"):
        pml_margins.adapters.no_such_thing  # noqa: B018
    assert "MetricLearningModule" in dir(pml_margins.adapters)
