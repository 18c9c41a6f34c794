"""Retrieval metrics per query, from the k-nn label-match matrix.

Every function takes ``match``, a ``(Q, k)`` boolean matrix whose entry
``[i, j]`` says whether query ``i``'s ``j``-th nearest reference shares its
label, and where needed ``relevant``, the number of references that share query
``i``'s label (its own entry excluded when the reference set contains the query).
They return one float64 value per query; :func:`aggregate` averages them. The
definitions follow pytorch-metric-learning's ``AccuracyCalculator`` exactly,
including what happens when ``k`` is smaller than ``relevant``.

With :math:`m_{ij}` the match matrix and :math:`R_i` the relevant count:

.. math::

    \\mathrm{Recall@K}_i = \\max_{j < K} m_{ij}, \\qquad
    \\mathrm{RP}_i = \\frac{1}{\\min(R_i, k)} \\sum_{j < \\min(R_i, k)} m_{ij}, \\qquad
    \\mathrm{AP@R}_i = \\frac{1}{R_i} \\sum_{j < \\min(R_i, k)} m_{ij}\\,
        \\frac{\\sum_{l \\le j} m_{il}}{j + 1}
"""

from __future__ import annotations

import torch

from pml_margins.evaluation.inputs import check_int
from pml_margins.evaluation.label_matching import unique_labels
from pml_margins.validation import check_bool, check_flag

__all__ = [
    "aggregate",
    "average_precision",
    "average_precision_at_r",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
    "reciprocal_rank",
    "relevant_counts",
]

_ROWS_PER_CHUNK = 8192


def _check_match(match: object) -> torch.Tensor:
    """``match`` if it is a ``(Q, k)`` boolean tensor, else ``TypeError``/``ValueError``
    (shapes and dtypes only: nothing read back)."""
    if not isinstance(match, torch.Tensor) or match.dtype != torch.bool:
        got = match.dtype if isinstance(match, torch.Tensor) else type(match).__name__
        raise TypeError(f"match must be a boolean tensor (Q, k), got {got}")
    if match.ndim != 2:
        raise ValueError(f"match must be (Q, k), got shape {tuple(match.shape)}")
    return match


def _check_relevant(match: object, relevant: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(match, relevant)`` checked: ``relevant`` a ``(Q,)`` integer tensor on
    ``match``'s device, one count per row of ``match``."""
    match = _check_match(match)
    if (
        not isinstance(relevant, torch.Tensor)
        or relevant.is_floating_point()
        or (relevant.dtype in (torch.bool, torch.complex64, torch.complex128))
    ):
        got = relevant.dtype if isinstance(relevant, torch.Tensor) else type(relevant).__name__
        raise TypeError(f"relevant must be an integer tensor (Q,), got {got}")
    if relevant.shape != match.shape[:1]:
        raise ValueError(
            f"relevant must hold one count per query, shape ({match.shape[0]},); "
            f"got {tuple(relevant.shape)}"
        )
    if relevant.device != match.device:
        raise ValueError(f"relevant is on {relevant.device}, match on {match.device}")
    if len(relevant) and bool((relevant < 0).any()):  # (a negative AP, NaN, -0 from them)
        raise ValueError(f"relevant counts must be >= 0, got {int(relevant.min())}")
    return match, relevant


def relevant_counts(
    query_labels: torch.Tensor, reference_labels: torch.Tensor, ref_includes_query: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, how many references carry its label, with and without itself.

    Counting uses ``torch.unique`` and a sorted search, no classes × N matrix.

    Args:
        query_labels: ``(Q,)`` labels (integer, or real numbers compared for equality).
        reference_labels: ``(N,)`` labels of the same kind on the same device.
        ref_includes_query: query ``i`` is reference ``i``; its own entry is
            subtracted from the relevant count.

    Returns:
        ``(label_count, relevant)``: the number of references with the query's
        label, and that number minus one when ``ref_includes_query`` (never below 0: a
        label absent from the references, possible only in counts given by hand, has
        none, and its at-``R`` metrics are NaN, as PML's); int64 ``(Q,)``.

    Example:
        >>> relevant_counts(torch.tensor([5, 7]), torch.tensor([5, 5, 7, 9]), True)
        (tensor([2, 1]), tensor([1, 0]))

    Raises:
        TypeError / ValueError: labels that are not 1-D real tensors on one device, an
            empty reference set, ``ref_includes_query`` not a bool.
    """
    ref_includes_query = check_flag(ref_includes_query, "ref_includes_query")
    for name, labels in (("query_labels", query_labels), ("reference_labels", reference_labels)):
        if not isinstance(labels, torch.Tensor) or labels.is_complex():
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"{name} must be a real torch.Tensor, got {got}")
        if labels.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if query_labels.device != reference_labels.device:
        raise ValueError(
            f"query_labels are on {query_labels.device}, reference_labels on "
            f"{reference_labels.device}"
        )
    if len(reference_labels) == 0 and len(query_labels):
        raise ValueError("reference_labels is empty: no reference to count")
    if len(reference_labels) == 0:  # (nothing to count for no query)
        none = torch.zeros(0, dtype=torch.long, device=query_labels.device)
        return none, none.clone()
    unique, counts = torch.unique(reference_labels, return_counts=True)
    position = torch.searchsorted(unique, query_labels.contiguous()).clamp_(max=len(unique) - 1)
    found = unique[position] == query_labels
    label_count = torch.where(found, counts[position], torch.zeros_like(counts[position]))
    return label_count, (label_count - int(ref_includes_query)).clamp_(min=0)


def _by_row_chunks(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to row chunks so float64 temporaries stay bounded."""
    num_rows = len(tensors[0])
    if num_rows <= _ROWS_PER_CHUNK:
        return fn(*tensors)
    return torch.cat(
        [
            fn(*(t[s : s + _ROWS_PER_CHUNK] for t in tensors))
            for s in range(0, num_rows, _ROWS_PER_CHUNK)
        ]
    )


def recall_at_k(match: torch.Tensor, k: int) -> torch.Tensor:
    """1 where one of the first ``k`` neighbours shares the query's label, else 0.

    Args:
        match: ``(Q, k_total)`` boolean matches; ``k`` larger than ``k_total``
            uses all columns.
        k: the cut-off, ``>= 1``.

    Returns:
        ``(Q,)`` float64.
    """
    k = check_int(k, "k")
    return _check_match(match)[:, :k].any(dim=1).to(torch.float64)


def precision_at_1(match: torch.Tensor) -> torch.Tensor:
    """1 where the nearest neighbour shares the query's label (equals Recall@1)."""
    return recall_at_k(match, 1)


def _relevance_mask(match: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    columns = torch.arange(match.shape[1], device=match.device)
    return columns < relevant[:, None]


def r_precision(match: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Share of matches among the first ``R`` neighbours (``min(R, k)`` if ``k < R``).

    Queries with ``R = 0`` give NaN; exclude them first.
    """

    def fn(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        mask = _relevance_mask(m, r)
        return (m & mask).sum(dim=1).to(torch.float64) / mask.sum(dim=1)

    return _by_row_chunks(fn, *_first_r_columns(*_check_relevant(match, relevant)))


def _first_r_columns(match: torch.Tensor, relevant: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``match`` cut to the largest ``R`` (the columns an at-``R`` metric reads: with
    PML's ``k=None`` the whole list, thousands of columns, against R's tens), and ``relevant``."""
    if len(relevant) and match.shape[1]:
        match = match[:, : max(1, int(relevant.max()))]
    return match, relevant


def _average_precision(match: torch.Tensor, relevant: torch.Tensor, at_r: bool) -> torch.Tensor:
    r""":math:`\frac{1}{R}\sum_h h / p_h` over the matches, the ``h``-th at rank ``p_h``
    (within the first ``R`` ranks if ``at_r``), from the matches' positions alone."""
    match, relevant = _check_relevant(match, relevant)
    if at_r:
        match, relevant = _first_r_columns(match, relevant)

    def fn(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        hits = m & _relevance_mask(m, r) if at_r else m
        rows, columns = hits.nonzero(as_tuple=True)  # row-major: ranks ascending per row
        counts = hits.sum(dim=1)
        first = torch.cumsum(counts, 0) - counts  # each row's first entry in rows/columns
        nth = torch.arange(1, len(rows) + 1, device=m.device) - first[rows]
        precision = nth.to(torch.float64) / (columns + 1).to(torch.float64)
        total = torch.zeros(len(m), dtype=torch.float64, device=m.device)
        return total.index_add_(0, rows, precision) / r

    return _by_row_chunks(fn, match, relevant)


def average_precision_at_r(match: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Average precision over the first ``R`` neighbours, divided by ``R`` (MAP@R)."""
    return _average_precision(match, relevant, at_r=True)


def average_precision(match: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Sum of precision at every matching rank among all ``k`` columns, divided by ``R``.

    This is PML's ``mean_average_precision`` per query: it depends on ``k``.
    """
    return _average_precision(match, relevant, at_r=False)


def reciprocal_rank(match: torch.Tensor) -> torch.Tensor:
    """``1 / rank`` of the first match among the ``k`` neighbours, 0 if none."""
    if _check_match(match).shape[1] == 0:
        return torch.zeros(len(match), dtype=torch.float64, device=match.device)
    first = match.to(torch.uint8).argmax(dim=1).to(torch.float64)
    return torch.where(match.any(dim=1), 1.0 / (first + 1.0), torch.zeros_like(first))


def aggregate(
    per_query: torch.Tensor,
    labels: torch.Tensor,
    avg_of_avgs: bool = False,
    return_per_class: bool = False,
) -> float | list[float]:
    """Average per-query values: over queries, over classes, or one per class.

    Args:
        per_query: ``(Q,)`` values.
        labels: ``(Q,)`` labels of the queries (or ``(Q, L)``: classes are equal rows).
        avg_of_avgs: mean of the per-class means.
        return_per_class: per-class means, in ascending label order.

    Returns:
        A float, or a list of floats when ``return_per_class``.

    Example:
        >>> aggregate(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3, 3, 8]), avg_of_avgs=True)
        0.25
    """
    avg_of_avgs = check_bool(avg_of_avgs, "avg_of_avgs")
    return_per_class = check_bool(return_per_class, "return_per_class")
    if avg_of_avgs and return_per_class:
        raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
    if not isinstance(per_query, torch.Tensor) or per_query.ndim != 1:
        got = tuple(per_query.shape) if isinstance(per_query, torch.Tensor) else type(per_query)
        raise TypeError(f"per_query must be a (Q,) tensor, got {got}")
    if not isinstance(labels, torch.Tensor) or labels.ndim not in (1, 2):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        raise TypeError(f"labels must be a (Q,) or (Q, L) tensor, got {got}")
    if len(labels) != len(per_query):
        raise ValueError(f"{len(per_query)} per-query values but {len(labels)} labels")
    per_query = per_query.to(torch.float64)
    if not (avg_of_avgs or return_per_class):
        return per_query.mean().item()
    unique, inverse = unique_labels(labels)
    sums = torch.zeros(len(unique), dtype=torch.float64, device=per_query.device)
    sums.index_add_(0, inverse, per_query)
    per_class = sums / torch.bincount(inverse, minlength=len(unique))
    if return_per_class:
        return per_class.cpu().tolist()
    return per_class.mean().item()
