"""Checks of the keyword arguments PML hands its ``calculate_*`` methods, for direct calls.

``get_accuracy`` checks its own inputs and builds these arguments itself; a user (or a
subclass) calling ``calculate_r_precision(knn_labels=..., query_labels=...,
not_lone_query_mask=..., label_counts=..., ref_includes_query=...)`` directly gets the
same clear ``TypeError``/``ValueError`` for what cannot be read, instead of an error
from deep inside (or, for a mask of the wrong length, a silent answer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from pml_margins.validation import check_flag

__all__ = ["MetricKwargs", "checked_metric_kwargs", "checked_query_mask"]


class MetricKwargs(NamedTuple):
    """The checked arguments: ``label_counts`` as ``unique`` and ``counts`` tensors on the
    query labels' device, ``ref_includes_query`` as a ``bool``."""

    knn_labels: torch.Tensor
    query_labels: torch.Tensor
    unique: torch.Tensor
    counts: torch.Tensor
    ref_includes_query: bool


def _tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (as get_accuracy hands its metrics), "
            f"got {type(value).__name__}"
        )
    return value


def checked_metric_kwargs(kwargs: dict[str, Any]) -> MetricKwargs:
    """``kwargs`` of a direct ``calculate_*`` call, checked as PML's ``get_accuracy`` builds
    them: ``knn_labels`` ``(Q, k[, ...])`` and ``query_labels`` ``(Q[, ...])`` tensors
    with ``Q`` rows each; ``label_counts`` a pair of the distinct labels and their counts
    (sequences or tensors) of equal length, labels of the query labels' shape;
    ``ref_includes_query`` a truth value (:func:`~pml_margins.validation.check_flag`).

    Raises:
        TypeError: labels that are not tensors, ``label_counts`` not a pair, a flag that
            is not a truth value.
        ValueError: row counts, shapes or lengths that do not agree.
    """
    labels = _tensor(kwargs["query_labels"], "query_labels")
    knn_labels = _tensor(kwargs["knn_labels"], "knn_labels")
    if labels.ndim == 0 or knn_labels.ndim == 0 or len(knn_labels) != len(labels):
        raise ValueError(
            f"knn_labels (shape {tuple(knn_labels.shape)}) must have one row per query "
            f"label (query_labels: shape {tuple(labels.shape)})"
        )
    try:  # a tuple, a list, or a (2, n) tensor or array: what PML's indexing reads
        unique, counts = kwargs["label_counts"]
    except (TypeError, ValueError):
        raise TypeError(
            "label_counts must be a pair (distinct labels, their counts), as "
            "get_label_counts returns"
        ) from None
    unique, counts = (torch.as_tensor(t, device=labels.device) for t in (unique, counts))
    if unique.ndim == 0 or counts.ndim != 1 or len(unique) != len(counts):
        raise ValueError(
            f"label_counts pairs each distinct label with its count, got {len(unique)} labels "
            f"(shape {tuple(unique.shape)}) and counts of shape {tuple(counts.shape)}"
        )
    if unique.shape[1:] != labels.shape[1:]:
        raise ValueError(
            f"label_counts' labels (shape {tuple(unique.shape)}) and query_labels (shape "
            f"{tuple(labels.shape)}) must hold labels of one shape: each query label is "
            "looked up among them"
        )
    flag = check_flag(kwargs.get("ref_includes_query", False), "ref_includes_query")
    return MetricKwargs(knn_labels, labels, unique, counts, flag)


def checked_query_mask(mask: object, num_queries: int, device: torch.device) -> torch.Tensor:
    """``not_lone_query_mask`` as a tensor: booleans, one per query (a list or array of
    them too), or integer row indices (which PML's indexing takes as well).

    Raises:
        TypeError: another dtype.
        ValueError: booleans of another length than the queries, or not 1-D.
    """
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"not_lone_query_mask must hold booleans, got {mask.dtype}")
    if mask.ndim != 1 or (mask.dtype == torch.bool and len(mask) != num_queries):
        raise ValueError(
            f"not_lone_query_mask must be 1-D with one boolean per query ({num_queries}), "
            f"got shape {tuple(mask.shape)}"
        )
    return mask
