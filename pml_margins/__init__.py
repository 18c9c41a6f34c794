"""pml-margins: margin-based metric-learning losses and exact retrieval evaluation.

A plugin for pytorch-metric-learning: every loss is a
``pytorch_metric_learning.losses.BaseMetricLossFunction``.
"""

__version__ = "0.1.0"
