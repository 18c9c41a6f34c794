"""Exact k-nearest neighbours over a reference set sharded across ranks.

Each rank holds a contiguous slice of the reference set (global rows
``offset .. offset + R_local``) and the same queries. Every rank computes the
exact top-``k`` of all queries against its slice (blocked over queries, so the
similarity matrix never exceeds ``block_size x R_local``); the ``world_size``
candidate lists (values and global indices) are all-gathered and merged into
the global top-``k``. Order: best first, ties broken by the smaller global
reference index -- on every rank, for every world size, so that the result is
exactly the single-process one (given bitwise-equal similarities).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity

from pml_margins.distributed.collectives import (
    ProcessGroup,
    all_gather_rows,
    rank_and_world_size,
)
from pml_margins.validation import check_embeddings

__all__ = ["exact_topk", "merge_topk", "sharded_topk"]


def exact_topk(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``key`` (largest first), ties broken by the smaller column.

    ``torch.topk`` leaves the choice among equal values unspecified; here the
    ``k``-th value's ties are resolved by position, then the ``k`` winners are
    stably sorted. Cost: one ``topk`` plus an ``O(m)`` scan per row.

    Returns:
        ``(values, columns)``, both ``(n, k)``.
    """
    kth = key.topk(k, dim=1).values[:, -1:]
    above = key > kth
    ties = key == kth
    need = k - above.sum(dim=1, keepdim=True)
    take = above | (ties & (torch.cumsum(ties, dim=1) <= need))
    columns = torch.nonzero(take)[:, 1].view(key.shape[0], k)  # ascending per row
    values = key.gather(1, columns)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def merge_topk(
    values: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge candidate lists ``(n, m)`` into the top-``k`` by (value desc, index asc)."""
    by_index = torch.sort(indices, dim=1, stable=True).indices
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, by_value), indices.gather(1, by_value)


def sharded_topk(
    query: torch.Tensor,
    reference_shard: torch.Tensor,
    k: int,
    distance: BaseDistance | None = None,
    block_size: int = 1024,
    group: ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact global top-``k`` neighbours of ``query`` in the sharded reference set.

    Args:
        query: ``(Q, D)``, the same on every rank.
        reference_shard: this rank's ``(R_local, D)`` slice; the global reference
            set is the concatenation of the slices in rank order.
        k: number of neighbours, ``1 <= k <= R`` (the global size).
        distance: a PML distance (default ``CosineSimilarity()``); for a
            non-inverted one (``LpDistance``) the smallest distances win.
        block_size: queries per block of the local similarity matrix.
        group: process group (default: the world; none initialized: one process).

    Returns:
        ``(distances, indices)`` of shape ``(Q, k)``: the distance values and the
        global reference indices, best first, identical on every rank.

    Raises:
        ValueError: bad shapes, or ``k`` outside ``[1, R]``.
    """
    check_embeddings(query, "query")
    check_embeddings(reference_shard, "reference_shard", width=query.shape[1])
    distance = CosineSimilarity() if distance is None else distance
    sign = 1.0 if distance.is_inverted else -1.0
    sizes = all_gather_rows(torch.tensor([reference_shard.shape[0]], device=query.device), group)[
        0
    ].tolist()
    total = sum(sizes)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"k must be an int in [1, {total}] (the reference size), got {k!r}")
    offset = _offset(sizes, group)
    local_k = min(k, reference_shard.shape[0])
    keys, cols = [], []
    with torch.no_grad():
        for start in range(0, query.shape[0], block_size):
            key = sign * distance(query[start : start + block_size], reference_shard)
            value, column = exact_topk(key, local_k)
            keys.append(value)
            cols.append(column)
        key, index = torch.cat(keys), torch.cat(cols) + offset
        if local_k < k:  # pad: never chosen over a real candidate
            pad = k - local_k
            key = torch.cat([key, key.new_full((key.shape[0], pad), -torch.inf)], dim=1)
            index = torch.cat([index, index.new_full((index.shape[0], pad), total)], dim=1)
        world_size = len(sizes)
        if world_size > 1:
            key = _gather_columns(key, world_size, group)
            index = _gather_columns(index, world_size, group)
            key, index = merge_topk(key, index, k)
    return sign * key, index


def _offset(sizes: list[int], group: ProcessGroup | None) -> int:
    return sum(sizes[: rank_and_world_size(group)[0]])


def _gather_columns(x: torch.Tensor, world_size: int, group: ProcessGroup | None) -> torch.Tensor:
    """``(Q, k)`` per rank -> ``(Q, world_size * k)``, rank-major columns."""
    gathered = all_gather_rows(x.contiguous(), group)[0]  # (world_size * Q, k)
    q = x.shape[0]
    return gathered.view(world_size, q, -1).permute(1, 0, 2).reshape(q, -1)
