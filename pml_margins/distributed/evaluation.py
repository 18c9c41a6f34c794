"""Exact retrieval evaluation with the reference set sharded across ranks.

Each rank holds a contiguous slice of the reference set (the global set is the
concatenation of the slices in rank order) and all the queries. Every rank
scores all queries against its slice, block by block exactly as
:func:`pml_margins.evaluation.exact_knn` does (same score formula, same
lowest-index tie rule), keeps its local top ``k`` with global indices, and the
``world_size`` candidate lists are all-gathered and merged by (score, global
index). The result -- on every rank -- is what ``exact_knn`` returns on the
whole reference set, so :class:`ShardedRetrievalAccuracyCalculator` gives the
metrics of the single-process
:class:`~pml_margins.evaluation.RetrievalAccuracyCalculator`.

Memory per rank: one ``block_rows x R_local`` score block, plus ``Q x k`` per
rank for the merge (``Q x k x world_size`` transiently).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pml_margins.distributed.collectives import (
    ProcessGroup,
    all_gather_rows,
    all_reduce_,
    rank_and_world_size,
)
from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation.calculator import _to_labels, _to_tensor
from pml_margins.evaluation.knn import Metric, auto_block_rows, check_knn_inputs, check_knn_k
from pml_margins.evaluation.topk import merge_candidates, topk_lowest_index_ties
from pml_margins.validation import check_embeddings

__all__ = ["ShardedRetrievalAccuracyCalculator", "merge_topk", "sharded_exact_knn"]


def merge_topk(
    values: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge candidate lists ``(n, m)`` into the top ``k`` by (value desc, index asc)."""
    return merge_candidates(values, indices, k, largest=True)


def _gather_columns(x: torch.Tensor, world_size: int, group: ProcessGroup | None) -> torch.Tensor:
    """``(Q, k)`` on each rank -> ``(Q, world_size * k)``, rank-major columns."""
    gathered = all_gather_rows(x.contiguous(), group)[0]  # (world_size * Q, k)
    return gathered.view(world_size, x.shape[0], -1).permute(1, 0, 2).reshape(x.shape[0], -1)


def sharded_exact_knn(
    query: torch.Tensor,
    reference_shard: torch.Tensor,
    k: int,
    *,
    metric: Metric = "euclidean",
    exclude_self: bool = False,
    block_rows: int | None = None,
    memory_budget: int | None = None,
    group: ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~pml_margins.evaluation.exact_knn` over a reference set sharded across ranks.

    Args:
        query: ``(Q, D)``, the same on every rank.
        reference_shard: this rank's ``(R_local, D)`` slice of the reference set.
        k: neighbours per query, ``0 <= k <= R`` (``R - 1`` with ``exclude_self``),
            ``R`` the global reference size.
        metric: ``"euclidean"`` or ``"dot"`` (normalize beforehand for cosine).
        exclude_self: query ``i`` is global reference ``i`` and not its own neighbour.
        block_rows, memory_budget: as ``exact_knn``, for the local ``Q x R_local`` scores.
        group: process group (default: the world; none initialized: one process).

    Returns:
        ``(scores, indices)``, each ``(Q, k)``, identical on every rank: the
        similarity (``"dot"``) or Euclidean distance, and global reference indices.

    Raises:
        ValueError: bad ``k`` or ``metric``, or mismatched widths.
    """
    check_knn_inputs(query, reference_shard, metric, "reference_shard")
    device = query.device
    rank, world_size = rank_and_world_size(group)
    sizes = all_gather_rows(torch.tensor([len(reference_shard)], device=device), group)[0]
    sizes = sizes.tolist()
    total, offset = sum(sizes), sum(sizes[:rank])
    check_knn_k(k, len(query), total, exclude_self)
    dtype = torch.promote_types(query.dtype, torch.float32)
    num_query, num_local = len(query), len(reference_shard)
    if k == 0:
        return torch.empty(num_query, 0, dtype=dtype, device=device), torch.empty(
            num_query, 0, dtype=torch.long, device=device
        )
    reference = reference_shard.to(device=device, dtype=dtype)
    ref_sq_norms = (reference * reference).sum(dim=1) if metric == "euclidean" else None
    if block_rows is None:
        block_rows = auto_block_rows(max(1, num_local), dtype.itemsize, device, memory_budget)
    local_k = min(k, num_local)
    scores_out = torch.full((num_query, k), -torch.inf, dtype=dtype, device=device)
    index_out = torch.full((num_query, k), total, dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, num_query if local_k else 0, block_rows):
            stop = min(start + block_rows, num_query)
            scores = query[start:stop].to(dtype) @ reference.T
            if ref_sq_norms is not None:
                scores.mul_(2).sub_(ref_sq_norms)
            lo, hi = max(start, offset), min(stop, offset + num_local)
            if exclude_self and lo < hi:  # queries lo..hi are references lo..hi, held here
                own = torch.arange(lo, hi, device=device)
                scores[own - start, own - offset] = -torch.inf
            values, columns = topk_lowest_index_ties(scores, local_k)
            scores_out[start:stop, :local_k] = values
            index_out[start:stop, :local_k] = columns + offset
        if world_size > 1:
            scores_out, index_out = merge_topk(
                _gather_columns(scores_out, world_size, group),
                _gather_columns(index_out, world_size, group),
                k,
            )
        if ref_sq_norms is not None:
            q_sq_norms = (query.to(dtype) ** 2).sum(dim=1, keepdim=True)
            scores_out = (q_sq_norms - scores_out).clamp_(min=0).sqrt_()
    return scores_out, index_out


class ShardedRetrievalAccuracyCalculator(RetrievalAccuracyCalculator):
    """:class:`~pml_margins.evaluation.RetrievalAccuracyCalculator` with a sharded reference set.

    Same arguments (plus ``group``) and the same metrics, equal to the
    single-process calculator on the concatenated reference set. Call
    :meth:`get_accuracy` on every rank, with the full query set and this rank's
    reference slice; every rank gets the result. Only the reference labels
    (one integer per reference) are all-gathered, never the embeddings.

    Example (on every rank)::

        calc = ShardedRetrievalAccuracyCalculator(include=("precision_at_1", "recall_at_1"))
        calc.get_accuracy(queries, query_labels, my_references, my_reference_labels)
        calc.get_accuracy(my_part_of_a_set, its_labels)  # the set against itself
    """

    def __init__(self, *args: Any, group: ProcessGroup | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.knn_func is not None:
            raise ValueError(
                f"{type(self).__name__} runs its own sharded exact k-nn; a custom knn_func "
                "cannot see the other ranks' references"
            )
        self.group = group
        self._shard: torch.Tensor | None = None

    def get_accuracy(
        self,
        query: Any,
        query_labels: Any,
        reference: Any = None,
        reference_labels: Any = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Metrics over the global reference set.

        Args:
            query, query_labels: all queries (the same on every rank); or, with
                ``reference=None``, this rank's slice of a set that is evaluated
                against itself (queries and references are then the whole set).
            reference, reference_labels: this rank's slice of the reference set.
            ref_includes_query: the global reference set starts with the queries.
            include, exclude: as PML.
        """
        if reference is None:
            if reference_labels is not None:
                raise ValueError("reference_labels given without reference")
            shard, device = self._checked_query(query)
            shard_labels = _to_labels(query_labels, len(shard), "query_labels", device)
            query = all_gather_rows(shard, self.group)[0]
            query_labels = all_gather_rows(shard_labels, self.group)[0]
            ref_includes_query = True
        else:
            if reference_labels is None:
                raise ValueError("reference given without reference_labels")
            query, device = self._checked_query(query)
            query_labels = _to_labels(query_labels, len(query), "query_labels", device)
            shard = check_embeddings(
                _to_tensor(reference, "reference"), "reference", query.shape[1], "the query's width"
            ).to(device)
            shard_labels = _to_labels(reference_labels, len(shard), "reference_labels", device)
        reference_labels, sizes = all_gather_rows(shard_labels, self.group)
        if ref_includes_query:
            self._check_reference_starts_with_query(query, query_labels, shard, shard_labels, sizes)
        self._shard = shard
        # only len() of the reference is read outside _knn: a zero-stride stand-in
        virtual_reference = shard.new_zeros(()).expand(len(reference_labels), shard.shape[1])
        try:
            return self._compute(
                query,
                virtual_reference,
                query_labels,
                reference_labels,
                ref_includes_query,
                include,
                exclude,
            )
        finally:
            self._shard = None

    def _check_reference_starts_with_query(
        self,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        shard: torch.Tensor,
        shard_labels: torch.Tensor,
        sizes: list[int],
    ) -> None:
        rank = rank_and_world_size(self.group)[0]
        start = sum(sizes[:rank])
        stop = min(start + len(shard), len(query))
        ok = sum(sizes) >= len(query)
        if ok and stop > start:
            ok = torch.allclose(query[start:stop], shard[: stop - start].to(query.dtype)) and (
                torch.equal(query_labels[start:stop], shard_labels[: stop - start])
            )
        bad = all_reduce_(torch.tensor([0 if ok else 1], device=query.device), "sum", self.group)
        if int(bad.item()):
            raise ValueError(
                "ref_includes_query=True needs the first len(query) rows of the (global) "
                "reference set and its labels to equal query and query_labels"
            )

    def _knn(
        self, query: torch.Tensor, reference: torch.Tensor, k: int, ref_includes_query: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self._shard
        if shard is None:
            raise RuntimeError("_knn is only called from get_accuracy")
        if self.normalize:
            query = torch.nn.functional.normalize(query, dim=1)
            shard = torch.nn.functional.normalize(shard, dim=1)
        return sharded_exact_knn(
            query,
            shard,
            k,
            metric=self.metric,
            exclude_self=ref_includes_query,
            block_rows=self.block_rows,
            memory_budget=self.memory_budget,
            group=self.group,
        )
