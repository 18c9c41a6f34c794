"""Top-k selection with ties broken by column index, whole or over column blocks.

Everything here keeps, for each row, the ``k`` best scores; equal scores go
to the lower column index, and the result is ordered by (best first, column
ascending), so it does not depend on how the columns were blocked, on
the device, or on the order a selection kernel happens to return equal values in.

A :class:`RunningTopK` receives a row block's costs (lower is nearer) one column block at a time,
the column blocks of any one row arriving in ascending column order (that order
is what lets a strict "better than the current k-th" rule keep the lower index
among equal scores). Two implementations:

* :class:`TorchRunningTopK`: ``torch.topk`` per block, merged with the running
  result; any device, any floating dtype.
* :class:`FaissHeapRunningTopK`: faiss's binary heaps (the selection faiss's own
  flat-index search uses), CPU float32. A heap rejects most costs with one
  comparison and needs no merge between blocks; run per worker thread it beat
  the ``torch.topk`` engine by 2-2.8x at every size we measured (5,924 and 20,000
  points, k = 200 and 1,000, 2 cores), so it is the CPU float32 choice for any ``k``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "FaissHeapRunningTopK",
    "RunningTopK",
    "TorchRunningTopK",
    "merge_candidates",
    "order_ties_by_index",
    "running_topk",
    "topk_lowest_index_ties",
]


def order_ties_by_index(
    values: torch.Tensor, columns: torch.Tensor, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder rows sorted by value (descending if ``largest``, else ascending) so
    that equal values are by column.

    Only rows holding two equal values are touched. ``values`` and ``columns``
    are modified in place and returned.
    """
    if values.shape[1] < 2:
        return values, columns
    tied = torch.nonzero((values[:, 1:] == values[:, :-1]).any(dim=1)).flatten()
    if tied.numel() > 0:
        v, c = values[tied], columns[tied]
        c, by_column = torch.sort(c, dim=1)
        v, by_value = torch.sort(v.gather(1, by_column), dim=1, descending=largest, stable=True)
        values[tied], columns[tied] = v, c.gather(1, by_value)
    return values, columns


def topk_lowest_index_ties(
    scores: torch.Tensor, k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row, highest first, equal scores ordered by column index.

    With ``largest=False`` the ``k`` smallest, lowest first.

    ``torch.topk`` returns the right values but, among equal values at the
    boundary, an arbitrary subset of columns in an arbitrary order. Rows where it
    left out a tied column are redone with a stable full sort: found by asking
    ``torch.topk`` for ``k + 1`` columns, they are the rows whose ``(k+1)``-th score
    equals the ``k``-th (rare: it needs an exact tie there). Then every row is
    ordered by (score descending, column ascending).

    Args:
        scores: ``(B, N)`` scores, higher is nearer; no NaN.
        k: number of columns to keep, ``1 <= k <= N``.

    Returns:
        ``(values, columns)``, each ``(B, k)``.
    """
    extra = int(k < scores.shape[1])  # one more column tells whether a tie was cut
    values, columns = torch.topk(scores, k + extra, dim=1, largest=largest, sorted=True)
    if extra:
        # a tie at the boundary can only have been cut where the (k+1)-th equals the k-th
        redo = torch.nonzero(values[:, k] == values[:, k - 1]).flatten()
        values, columns = values[:, :k], columns[:, :k]
        if redo.numel() > 0:
            sorted_values, sorted_columns = torch.sort(
                scores[redo], dim=1, descending=largest, stable=True
            )
            values[redo] = sorted_values[:, :k]
            columns[redo] = sorted_columns[:, :k]
    return order_ties_by_index(values, columns, largest)


class RunningTopK:
    """The ``k`` smallest costs per row of a ``num_rows x N`` cost matrix fed in blocks.

    Costs are "lower is nearer" (a negated similarity, or a distance-like score).
    Call :meth:`add` with a block of rows and columns; for every row, its column
    blocks must come in ascending column order, starting at column 0, and must
    together hold at least ``k`` columns. :meth:`result` gives ``(costs,
    columns)``, each ``(num_rows, k)``, by (cost ascending, column ascending).
    """

    def __init__(self, num_rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_rows, self.k, self.dtype, self.device = num_rows, k, dtype, device

    def add(self, row_start: int, costs: torch.Tensor, col_start: int) -> None:
        raise NotImplementedError

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def unordered_ties_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`result`, possibly with equal costs not yet in column order
        (:func:`order_ties_by_index` or :func:`merge_candidates` finish it)."""
        return self.result()


class TorchRunningTopK(RunningTopK):
    """:class:`RunningTopK` by ``torch.topk`` per block, merged with the running lists.

    A block is reduced to its own top ``k`` and merged with what the rows hold:
    held entries (lower columns) come before the block's in the candidate list,
    so position order among equal costs is column order and
    :func:`topk_lowest_index_ties` on the candidates keeps the lower column.
    """

    def __init__(self, num_rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(num_rows, k, dtype, device)
        self.values = torch.full((num_rows, k), torch.inf, dtype=dtype, device=device)
        self.columns = torch.full((num_rows, k), -1, dtype=torch.long, device=device)
        self.held = np.zeros(num_rows, dtype=np.int64)  # entries held, per row
        self.next_column = np.zeros(num_rows, dtype=np.int64)  # columns below were seen

    def add(self, row_start: int, costs: torch.Tensor, col_start: int) -> None:
        rows = slice(row_start, row_start + costs.shape[0])
        if int(self.next_column[rows].max()) > col_start:
            raise ValueError(f"column blocks out of order at column {col_start}")
        have = int(self.held[row_start])
        kk = min(self.k, costs.shape[1])
        values, columns = topk_lowest_index_ties(costs, kk, largest=False)
        columns += col_start
        if have == 0:
            self.values[rows, :kk], self.columns[rows, :kk] = values, columns
            keep = kk
        else:
            candidates = torch.cat([self.values[rows, :have], values], dim=1)
            candidate_columns = torch.cat([self.columns[rows, :have], columns], dim=1)
            keep = min(self.k, have + kk)
            merged, position = topk_lowest_index_ties(candidates, keep, largest=False)
            self.values[rows, :keep] = merged
            self.columns[rows, :keep] = candidate_columns.gather(1, position)
        self.held[rows] = keep
        self.next_column[rows] = col_start + costs.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.values, self.columns


class FaissHeapRunningTopK(RunningTopK):
    """:class:`RunningTopK` with faiss's max-heaps (CPU, float32).

    ``float_maxheap_array_t.addn`` gives the columns of a block sequential ids
    from ``col_start`` and inserts a cost only if it is strictly below the row's
    current k-th; among equal costs the heap evicts the larger id first. With
    column blocks in ascending order that keeps the lower column among equal
    costs. The heaps are sorted at the end and equal costs reordered by column.
    """

    def __init__(self, num_rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        if dtype != torch.float32 or device.type != "cpu":
            raise ValueError(f"faiss heaps need CPU float32 costs, got {dtype} on {device}")
        super().__init__(num_rows, k, dtype, device)
        import faiss

        self._values = np.empty((num_rows, k), dtype=np.float32)
        self._columns = np.empty((num_rows, k), dtype=np.int64)
        self._heaps = faiss.float_maxheap_array_t()
        self._heaps.nh, self._heaps.k = num_rows, k
        self._heaps.val = faiss.swig_ptr(self._values)
        self._heaps.ids = faiss.swig_ptr(self._columns)
        self._heaps.heapify()
        self._swig_ptr = faiss.swig_ptr

    def add(self, row_start: int, costs: torch.Tensor, col_start: int) -> None:
        block = np.ascontiguousarray(costs.numpy(), dtype=np.float32)
        self._heaps.addn(
            block.shape[1], self._swig_ptr(block), int(col_start), int(row_start), len(block)
        )

    def unordered_ties_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The heaps sorted by cost (faiss only, no torch op to start threads)."""
        self._heaps.reorder()
        return torch.from_numpy(self._values), torch.from_numpy(self._columns)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return order_ties_by_index(*self.unordered_ties_result(), largest=False)


def merge_candidates(
    values: torch.Tensor, columns: torch.Tensor, k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge candidate lists ``(n, m)`` into the best ``k`` by (value, column ascending).

    Columns may come in any order (several partial top-k lists side by side).
    One stable sort by value; the rows where equal values straddle the cut are
    sorted again, by column first, to keep the lower columns; then equal values
    are ordered by column.
    """
    order = torch.sort(values, dim=1, descending=largest, stable=True).indices
    values, columns = values.gather(1, order), columns.gather(1, order)
    if k < values.shape[1]:
        cut = torch.nonzero(values[:, k] == values[:, k - 1]).flatten()
        if cut.numel() > 0:
            values[cut], columns[cut] = _sort_by_column_then_value(
                values[cut], columns[cut], largest
            )
    return order_ties_by_index(values[:, :k].contiguous(), columns[:, :k].contiguous(), largest)


def _sort_by_column_then_value(
    values: torch.Tensor, columns: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    by_column = torch.sort(columns, dim=1, stable=True).indices
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_value = torch.sort(values, dim=1, descending=largest, stable=True).indices
    return values.gather(1, by_value), columns.gather(1, by_value)


def running_topk(num_rows: int, k: int, dtype: torch.dtype, device: torch.device) -> RunningTopK:
    """The faster :class:`RunningTopK` for this case: faiss heaps on CPU float32,
    ``torch.topk`` otherwise (CUDA, float64)."""
    if device.type == "cpu" and dtype == torch.float32:
        return FaissHeapRunningTopK(num_rows, k, dtype, device)
    return TorchRunningTopK(num_rows, k, dtype, device)
