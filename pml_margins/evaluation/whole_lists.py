r"""Whole ranked lists (PML's ``k=None``) from one float64 product, certified exact.

When every reference is wanted, the engine's float32 candidate pass selects nothing
and its float64 re-scoring of all ``N^2`` pairs, element-wise, costs ``N^2 D``
subtract-square-adds: at CUB's test size 9 s against 0.5 s for the float64 product
of the same size. For inputs that are not float64 the lists here come from that
product and are still exactly those of the float64 brute force:

1. **Approximate values.** After centring (Euclidean) the float64 rows,
   :math:`\tilde v = |a|^2 + |b|^2 - 2\,a \cdot b` (or :math:`a \cdot b`) lies within
   :math:`E_a` (:func:`float64_error_bound`) of the exact value
   ``sum((a - b)^2)`` (``sum(a * b)``) that the engine computes element-wise.
2. **Order.** A stable sort by :math:`\tilde v` orders every two references whose
   :math:`\tilde v` differ by more than :math:`2E_a` as the exact values do. Runs of
   neighbours in that order closer than :math:`2E_a` (exact duplicates, the ties of
   integer data) are re-scored exactly and re-sorted by (value, index) within their
   positions: ties go to the lower index, as everywhere in the engine.
3. **Values.** A returned value is the exact one rounded to the output dtype
   (float32; ``sqrt`` first for ``"euclidean"``). Rounding is monotone, so where
   :math:`\tilde v - E_a` and :math:`\tilde v + E_a` round to the same output, so does
   the exact value; the few others (and the re-sorted runs) are re-scored exactly.

The result equals :func:`~pml_margins.evaluation.knn.exact_knn`'s engine bit for bit
(the exact values come from its own re-scoring), whatever the thread count or device.
Float64 inputs, whose values are returned in float64, keep the element-wise path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from pml_margins.evaluation import knn as engine

__all__ = ["float64_error_bound", "whole_lists"]

#: unit roundoff of float64
UNIT_ROUNDOFF_64 = 2.0**-53
#: float64 elements of one chunk of query rows against every reference (256 MiB)
CHUNK_ELEMENTS = 2**25
#: pairs re-scored exactly per call (their rows are gathered: 2^15 x D float64)
PAIRS_PER_CALL = 2**15


def float64_error_bound(
    query_norms: torch.Tensor, max_reference_norm: float, dim: int, metric: str
) -> torch.Tensor:
    r"""Per query, a bound ``E`` on ``|v~ - v|`` for every reference.

    ``v~`` is the float64 product form of step 1 on centred rows (norms ``|a|``,
    largest reference norm ``R``) and ``v`` the engine's element-wise float64 value:
    the product's and the norms' rounding, ``(D + 2) u (|a| + R)^2``, the centring's,
    ``2 u (|a| + R)^2``, and the element-wise sum's own, ``D u (|a| + R)^2``, together
    under

    .. math::

        E_a = 4 (D + 8)\, u\, (|a| + R)^2 \quad\text{(Euclidean)},\qquad
        E_a = 4 (D + 8)\, u\, |a| R \quad\text{(dot)}

    with ``u = 2^-53`` (twice the sum: the rounding of ``v~ +- E`` stays inside).
    """
    scale = 4 * (dim + 8) * UNIT_ROUNDOFF_64
    if metric == "dot":
        return scale * query_norms * max_reference_norm + 2.0**-1000
    return scale * (query_norms + max_reference_norm) ** 2 + 2.0**-1000


def _exact(
    query: torch.Tensor,
    reference: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    metric: str,
    normalize: bool,
) -> torch.Tensor:
    """The engine's exact float64 values of the pairs ``(rows[p], columns[p])``."""
    out = torch.empty(len(rows), dtype=torch.float64, device=query.device)
    for s in range(0, len(rows), PAIRS_PER_CALL):
        part = slice(s, s + PAIRS_PER_CALL)
        pairs = columns[part].unsqueeze(1)
        out[part] = engine._rescore(query[rows[part]], reference, pairs, metric, normalize)[:, 0]
    return out


def _resort_runs(
    key: torch.Tensor,
    order: torch.Tensor,
    bound: torch.Tensor,
    exact_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Re-sort, in place, each run of neighbours closer than ``2 E`` by (exact key, index).

    ``key``/``order``: a chunk's sorted keys and their columns; ``exact_of(rows,
    columns)`` gives exact keys. Returns the mask of the re-scored entries (whose
    ``key`` now holds the exact key).
    """
    close = (key[:, 1:] - key[:, :-1]) <= 2 * bound  # (rows, 1) bound; inf - inf: NaN, False
    in_run = torch.zeros_like(key, dtype=torch.bool)
    in_run[:, 1:] |= close
    in_run[:, :-1] |= close
    rows, positions = in_run.nonzero(as_tuple=True)
    if not len(rows):
        return in_run
    starts = in_run.clone()
    starts[:, 1:] &= ~close  # a run starts where its left neighbour is not close
    run_id = torch.cumsum(starts[rows, positions].long(), 0)
    columns = order[rows, positions]
    exact = exact_of(rows, columns)
    by = torch.argsort(columns, stable=True)  # (run, exact key, index)
    by = by[torch.argsort(exact[by], stable=True)]
    by = by[torch.argsort(run_id[by], stable=True)]
    order[rows, positions] = columns[by]  # the runs' positions, in order
    key[rows, positions] = exact[by]
    return in_run


def whole_lists(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    metric: str,
    normalize: bool,
    exclude_self: bool,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact ``k`` nearest references of every query, for ``k`` near ``N`` and
    checked inputs that are not float64: float32 values (as
    :func:`~pml_margins.evaluation.knn.exact_knn` returns them) and indices."""
    device, (nq, dim), nr = query.device, query.shape, len(reference)
    reference = reference.to(device)
    same = query is reference or (exclude_self and engine.same_values(query, reference))
    b = engine._float64_rows(reference, normalize)
    a = b if same else engine._float64_rows(query, normalize)
    if metric != "dot":
        centre = b.mean(dim=0)
        b = b.sub_(centre)
        a = b if same else a.sub_(centre)
    a_squares, b_squares = torch.linalg.vecdot(a, a), torch.linalg.vecdot(b, b)
    bound = float64_error_bound(a_squares.sqrt(), float(b_squares.max().sqrt()), dim, metric)
    values = torch.empty(nq, k, dtype=torch.float32, device=device)
    indices = torch.empty(nq, k, dtype=torch.long, device=device)
    sign = -1.0 if metric == "dot" else 1.0  # key = sign * value, ascending

    def exact_values(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return _exact(query, reference, rows, columns, metric, normalize)

    def exact_keys(first: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda rows, columns: sign * exact_values(rows + first, columns)

    step = max(1, CHUNK_ELEMENTS // max(1, nr))
    for s in tqdm(range(0, nq, step), desc="k-nn", unit="chunk", disable=not progress):
        rows = slice(s, min(s + step, nq))
        key = torch.mm(a[rows], b.T)
        if metric == "dot":
            key.neg_()
        else:  # |a|^2 + |b|^2 - 2 a.b
            key.mul_(-2).add_(b_squares).add_(a_squares[rows].unsqueeze(1))
        if exclude_self:
            own = torch.arange(rows.start, rows.stop, device=device)
            key[own - s, own] = torch.inf
        key, order = torch.sort(key, dim=1, stable=True)
        e = bound[rows].unsqueeze(1)
        rescored = _resort_runs(key, order, e, exact_keys(s))
        key, order, rescored = key[:, :k], order[:, :k], rescored[:, :k]
        value = key if metric != "dot" else key.neg()
        low, high = value - e, value + e
        if metric != "dot":
            low.clamp_(min=0)  # the exact value is >= 0
        out = engine.finish_values(low, metric, query.dtype)
        unsure = rescored | (out != engine.finish_values(high, metric, query.dtype))
        r, p = unsure.nonzero(as_tuple=True)
        if len(r):
            exact = value[r, p]  # exact where re-scored; the others now
            fresh = ~rescored[r, p]
            if bool(fresh.any()):
                exact[fresh] = exact_values(r[fresh] + s, order[r[fresh], p[fresh]])
            out[r, p] = engine.finish_values(exact, metric, query.dtype)
        values[rows], indices[rows] = out, order
    return values, indices
