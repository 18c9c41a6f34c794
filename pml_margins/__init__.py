"""pml-margins: margin-based metric-learning losses and exact retrieval evaluation.

A plugin for pytorch-metric-learning: every loss is a
``pytorch_metric_learning.losses.BaseMetricLossFunction``.

``pml_margins.value_checks`` and ``pml_margins.value_checks_enabled`` are
:func:`pml_margins.validation.value_checks` and
:func:`pml_margins.validation.value_checks_enabled`; ``pml_margins.autograd_only`` and
``pml_margins.autograd_only_enabled`` are those of
:mod:`pml_margins.functional.autograd_switch` (gradients of gradients). Each is imported
on first use (importing the package itself imports no torch).
"""

from typing import Any

__all__ = ["autograd_only", "autograd_only_enabled", "value_checks", "value_checks_enabled"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("autograd_only", "autograd_only_enabled"):
        from pml_margins import functional

        return getattr(functional, name)
    if name in __all__:
        from pml_margins import validation

        return getattr(validation, name)
    raise AttributeError(f"module 'pml_margins' has no attribute {name!r}")
