r"""Relevance under a custom label comparison, as PML's ``label_comparison_fn`` defines it.

PML's ``AccuracyCalculator(label_comparison_fn=f)`` lets labels be anything ``f``
compares: several columns per sample (``(N, L)``), values compared with a tolerance,
a hierarchy. ``f(a, b)`` broadcasts like ``==``: it gets a ``(Q, 1[, L])`` and a
``(Q, k[, L])`` tensor and returns ``(Q, k)`` booleans. The k-nn is unchanged; what
changes is which neighbours count as matches and how many references are relevant
to a query. PML's rules, which these functions reproduce:

* relevant count of a query label ``u``: :math:`c_u = \sum_n f(u, y_n)` over the
  reference labels, one ``f`` call per distinct query label with PML's shapes: ``u`` as
  a ``(1[, L])`` tensor against the ``(N[, L])`` reference labels (a comparison may
  expand its first argument to its second, as it may in PML);
* R (the ranks that R-Precision and MAP@R read): :math:`c_u - 1` when the reference
  set contains the queries, else :math:`c_u`;
* a query is left out (lone) when :math:`c_u - f(u, u) \le 0` (reference set contains
  the queries) or :math:`c_u = 0`;
* per-class averages group queries by equal label rows.

With ``f = torch.eq`` on 1-D labels this is the equality path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["LabelRelevance", "compared", "custom_relevance", "label_positions", "unique_labels"]

#: a PML label comparison: ``f(a, b)`` -> booleans of the broadcast shape (without ``L``)
LabelComparison = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LabelRelevance(NamedTuple):
    """What the k-nn metrics need to know about the labels, per distinct query label."""

    unique: torch.Tensor  # (U[, L]) distinct query labels, sorted (rows: lexicographically)
    inverse: torch.Tensor  # (Q,) each query's row of ``unique``
    counts: torch.Tensor  # (U,) int64: references matching each (PML's "bin counts")
    lone: torch.Tensor  # (U,) bool: PML leaves that label's queries out


def unique_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct labels (rows, for ``(N, L)`` labels) in sorted order, and each one's index."""
    if labels.ndim == 1:
        return torch.unique(labels, return_inverse=True)
    return torch.unique(labels, dim=0, return_inverse=True)


def custom_relevance(
    query_labels: torch.Tensor,
    reference_labels: torch.Tensor,
    ref_includes_query: bool,
    compare: LabelComparison,
) -> LabelRelevance:
    """PML's relevant counts and lone labels under ``compare`` (see the module doc).

    Example:
        >>> near = lambda a, b: (a - b).abs() <= 1  # labels within 1 match
        >>> r = custom_relevance(torch.tensor([0, 5]), torch.tensor([0, 1, 5, 9]), False, near)
        >>> r.counts.tolist(), r.lone.tolist()
        ([2, 1], [False, False])
    """
    unique, inverse = unique_labels(query_labels)
    counts = torch.empty(len(unique), dtype=torch.long, device=unique.device)
    for row in range(len(unique)):  # PML's calls: (1[, L]) against (N[, L])
        part = unique[row : row + 1]
        found = compared(compare, part, reference_labels, (len(reference_labels),), flat=True)
        counts[row] = found.sum()
    if ref_includes_query:
        lone = counts - compared(compare, unique, unique, (len(unique),)).long() <= 0
    else:
        lone = counts == 0
    return LabelRelevance(unique, inverse, counts, lone)


def label_positions(unique: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each label's row in ``unique`` (distinct, in any order: PML pairs a
    ``label_counts`` tuple's labels and counts by position), by exact equality.

    Labels absent from ``unique`` get ``len(unique)``.
    """
    if labels.ndim == 1:
        ordered, order = torch.sort(unique)
        labels = labels.contiguous()
        position = torch.searchsorted(ordered, labels).clamp_(max=max(len(unique) - 1, 0))
        found = ordered[position] == labels if len(unique) else torch.zeros_like(labels).bool()
        return torch.where(found, order[position] if len(unique) else position, len(unique))
    both, inverse = torch.unique(torch.cat([unique, labels]), dim=0, return_inverse=True)
    row_of = torch.full((len(both),), len(unique), dtype=torch.long, device=labels.device)
    row_of[inverse[: len(unique)]] = torch.arange(len(unique), device=labels.device)
    return row_of[inverse[len(unique) :]]


def compared(
    compare: LabelComparison,
    a: torch.Tensor,
    b: torch.Tensor,
    shape: tuple[int, ...],
    flat: bool = False,
) -> torch.Tensor:
    """``compare(a, b)`` as booleans of ``shape`` (``flat``: of any shape with as many
    elements, flattened: PML sums such a result); else a ``TypeError``/``ValueError``
    naming what the comparison returned for which inputs."""
    result = compare(a, b)
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"label_comparison_fn must return a tensor of booleans, got {type(result).__name__}"
        )
    if flat and result.numel() == math.prod(shape):
        result = result.reshape(shape)
    if tuple(result.shape) != tuple(shape):
        raise ValueError(
            f"label_comparison_fn returned shape {tuple(result.shape)} for labels of shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}; expected {tuple(shape)}"
        )
    if result.dtype != torch.bool:  # 0/1 numbers are booleans; a graded score is not
        graded = (result != 0) & (result != 1)
        if bool(graded.any()):
            raise ValueError(
                "label_comparison_fn must return booleans (match or not), got "
                f"{result.dtype} values such as {result[graded].flatten()[0].item()!r}; "
                "compare with a threshold"
            )
    return result.bool()
