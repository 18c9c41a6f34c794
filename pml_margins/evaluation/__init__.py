"""Exact retrieval evaluation: blocked k-nn, Recall@K and PML's metrics."""

from pml_margins.evaluation.calculator import RetrievalAccuracyCalculator, resolve_distance
from pml_margins.evaluation.knn import auto_block_rows, exact_knn
from pml_margins.evaluation.metrics import (
    aggregate,
    average_precision,
    average_precision_at_r,
    precision_at_1,
    r_precision,
    recall_at_k,
    reciprocal_rank,
    relevant_counts,
)
from pml_margins.evaluation.topk import topk_lowest_index_ties

__all__ = [
    "RetrievalAccuracyCalculator",
    "aggregate",
    "auto_block_rows",
    "average_precision",
    "average_precision_at_r",
    "exact_knn",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
    "reciprocal_rank",
    "relevant_counts",
    "resolve_distance",
    "topk_lowest_index_ties",
]
