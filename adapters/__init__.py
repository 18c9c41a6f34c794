"""Glue between pml-margins and the ecosystems our users train in.

Installed as ``pml_margins.adapters`` (the build maps this top-level ``adapters/``
folder there, so it never collides with the unrelated PyPI package ``adapters``).
Importing this package imports no ecosystem: each adapter module imports its
own on first use and, when it is missing, raises an ``ImportError`` naming the
extra to install.

- ``pml_margins.adapters.pml_trainers`` (no extra: PML is a core dependency):
  :func:`trainer_optimizers`, :func:`retrieval_tester` for PML's trainers and testers.
- ``pml_margins.adapters.retrieval`` (no extra): :func:`retrieval_calculator`, the
  calculator the tester and the Lightning callback use.
- ``pml_margins.adapters.lightning`` (``pip install 'pml-margins[lightning]'``):
  :class:`MetricLearningModule`, :class:`RetrievalMetricsCallback`.
- ``pml_margins.adapters.sentence_transformers``
  (``pip install 'pml-margins[sentence-transformers]'``): :class:`MetricLoss`.

These names can also be imported from this package directly,
e.g. ``from pml_margins.adapters import MetricLearningModule``; the module that
holds a name is imported only then. ``from pml_margins.adapters import *`` takes the
names that need no extra (it imports no framework); where an extra is missing, its
names raise the ``ImportError`` naming it (test for them with ``try``/``except
ImportError``, not ``hasattr``).
"""

from __future__ import annotations

import importlib
from typing import Any

#: the names that need no extra (``import *`` imports no framework)
__all__ = ["TrainerOptimizers", "retrieval_calculator", "retrieval_tester", "trainer_optimizers"]

# public name -> submodule that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "TrainerOptimizers": "pml_trainers",
    "trainer_optimizers": "pml_trainers",
    "retrieval_tester": "pml_trainers",
    "retrieval_calculator": "retrieval",
    "MetricLearningModule": "lightning",
    "RetrievalMetricsCallback": "lightning",
    "MetricLoss": "sentence_transformers",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
