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

    Embeddings are L2-normalized first (retrieval by cosine similarity, the geometry
    every margin loss trains for). Each embedding is a query; the reference set is
    all the others (``ref_includes_query=True``: the query itself is not counted).

    Returns:
        ``{"recall_at_<k>": ..., "precision_at_1": ..., "r_precision": ...,
        "mean_average_precision_at_r": ...}`` as floats in ``[0, 1]``.
    """
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    normalized = torch.nn.functional.normalize(embeddings.float(), dim=1)
    calculator = AccuracyCalculator(include=METRIC_KEYS, k="max_bin_count")
    metrics = calculator.get_accuracy(normalized, labels)
    # PML's calculator has no Recall@K; Recall@1 equals P@1 (a correct first neighbour)
    result = {f"recall_at_{k}": float("nan") for k in recall_ks}
    if 1 in recall_ks:
        result["recall_at_1"] = float(metrics["precision_at_1"])
    result.update({key: float(metrics[key]) for key in METRIC_KEYS})
    return result
