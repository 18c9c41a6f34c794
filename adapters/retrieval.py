"""The one place where the adapters build their retrieval accuracy calculator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_metric_learning.distances import CosineSimilarity

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation.calculator import check_recall_ks

__all__ = ["DEFAULT_METRICS", "retrieval_calculator"]

#: metrics the adapters report besides ``recall_at_K`` (the k-means ones, NMI and AMI, are left out)
DEFAULT_METRICS: tuple[str, ...] = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def retrieval_calculator(
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    include: Sequence[str] | None = None,
    k: int | str | None = None,
    device: torch.device | str | None = None,
) -> RetrievalAccuracyCalculator:
    """Our exact retrieval calculator, ranking by cosine similarity (no faiss for the k-nn).

    Args:
        recall_ks: cut-offs ``K`` of the ``recall_at_K`` metrics.
        include: metric names to compute; default the ``recall_at_K`` for each ``K``
            in ``recall_ks`` and :data:`DEFAULT_METRICS`.
        k: neighbours to retrieve, as PML's ``AccuracyCalculator`` (``None``: enough
            for every metric asked for).
        device: where the k-nn runs; ``None``: where the query embeddings are.

    Returns:
        A :class:`pml_margins.evaluation.RetrievalAccuracyCalculator` (a PML
        ``AccuracyCalculator``, accepted by PML's testers and hooks).
    """
    recall_ks = check_recall_ks(recall_ks)
    if isinstance(include, (str, bytes)):  # (tuple() would split it into letters)
        raise TypeError(f"include must be a tuple or list of metric names, got {include!r}")
    if include is None:
        include = (*(f"recall_at_{kk}" for kk in recall_ks), *DEFAULT_METRICS)
    return RetrievalAccuracyCalculator(
        include=tuple(include),
        k=k,
        device=device,
        recall_ks=tuple(recall_ks),
        distance=CosineSimilarity(),
    )
