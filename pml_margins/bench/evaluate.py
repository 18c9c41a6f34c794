"""Retrieval metrics of a set of embeddings: every item queries all the others."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["METRIC_KEYS", "evaluate_retrieval"]

#: the non-recall metrics reported, in table order
METRIC_KEYS: tuple[str, ...] = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def evaluate_retrieval(
    embeddings: torch.Tensor, labels: torch.Tensor, recall_ks: Sequence[int] = (1, 2, 4, 8)
) -> dict[str, float]:
    """Recall@K, P@1, R-Precision and MAP@R of ``embeddings`` retrieving among themselves.

    Ranks by cosine similarity (the geometry every margin loss trains for) with
    :class:`pml_margins.evaluation.RetrievalAccuracyCalculator`. Each embedding is a
    query; the reference set is all the others (the query itself is not counted).
    Only the neighbours the metrics need are searched: ``k`` is the largest class
    size minus one (R of R-Precision and MAP@R) or the largest Recall@K cut-off,
    not PML's default of every other item (which on 16k glyphs costs minutes).

    Returns:
        ``{"recall_at_<k>": ..., "precision_at_1": ..., "r_precision": ...,
        "mean_average_precision_at_r": ...}`` as floats in ``[0, 1]``.
    """
    from pytorch_metric_learning.distances import CosineSimilarity

    from pml_margins.evaluation import RetrievalAccuracyCalculator

    keys = (*(f"recall_at_{k}" for k in recall_ks), *METRIC_KEYS)
    calculator = RetrievalAccuracyCalculator(
        include=keys,
        recall_ks=tuple(recall_ks),
        distance=CosineSimilarity(),
        k="max_bin_count",
    )
    metrics = calculator.get_accuracy(embeddings.float(), labels)
    return {key: float(metrics[key]) for key in keys}
