"""Exact retrieval evaluation: k-nn equal to a float64 brute force, Recall@K and PML's metrics."""

from pml_margins.evaluation.calculator import RetrievalAccuracyCalculator, resolve_distance
from pml_margins.evaluation.knn import exact_knn, float32_error_bound
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

__all__ = [
    "RetrievalAccuracyCalculator",
    "aggregate",
    "average_precision",
    "average_precision_at_r",
    "exact_knn",
    "float32_error_bound",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
    "reciprocal_rank",
    "relevant_counts",
    "resolve_distance",
]
