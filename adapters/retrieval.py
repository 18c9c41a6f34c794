"""The one place where the adapters build their retrieval accuracy calculator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

__all__ = ["DEFAULT_METRICS", "retrieval_calculator"]

#: PML metrics the adapters report by default (the k-means ones, NMI and AMI, are left out)
DEFAULT_METRICS: tuple[str, ...] = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def retrieval_calculator(
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    include: Sequence[str] | None = None,
    k: int | str | None = None,
    device: torch.device | str | None = None,
) -> AccuracyCalculator:
    """An exact (torch, no faiss) cosine k-nn accuracy calculator.

    Args:
        recall_ks: cut-offs ``K`` of the ``recall_at_K`` metrics.
        include: metric names to compute; default :data:`DEFAULT_METRICS` and the
            ``recall_at_K`` for each ``K`` in ``recall_ks``.
        k: neighbours to retrieve, as PML's ``AccuracyCalculator`` (``None``: enough
            for R-precision and MAP@R).
        device: where the k-nn runs; ``None``: the calculator's default (CUDA if available).

    Returns:
        A PML ``AccuracyCalculator`` ranking by cosine similarity.
    """
    # TODO(eval): switch to pml_margins.evaluation.RetrievalAccuracyCalculator (Recall@K)
    del recall_ks
    include = DEFAULT_METRICS if include is None else tuple(include)
    return AccuracyCalculator(
        include=include, k=k, device=device, knn_func=CustomKNN(CosineSimilarity())
    )
