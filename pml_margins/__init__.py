"""pml-margins: margin-based metric-learning losses and exact retrieval evaluation.

A plugin for pytorch-metric-learning: every loss is a
``pytorch_metric_learning.losses.BaseMetricLossFunction``.
"""

from pml_margins.validation import value_checks, value_checks_enabled

__all__ = ["value_checks", "value_checks_enabled"]
__version__ = "0.1.0"
