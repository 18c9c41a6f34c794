"""Exact retrieval evaluation with the reference set sharded across ranks.

Each rank holds a contiguous slice of the reference set (the global set is the
concatenation of the slices in rank order) and all the queries. Every rank runs
the one exact k-nn engine (:func:`pml_margins.evaluation.knn.knn_float64`) on its
slice, which gives its exact local top ``k`` in float64 with global indices; the
``world_size`` lists are all-gathered and merged by (value, global index). The
global top ``k`` lies in the union of the local ones, so the result -- on every
rank -- is what :func:`~pml_margins.evaluation.exact_knn` returns on the whole
reference set, and :class:`ShardedRetrievalAccuracyCalculator` gives the metrics
of the single-process :class:`~pml_margins.evaluation.RetrievalAccuracyCalculator`.

Memory per rank: the engine's tiles, plus ``Q x k x world_size`` for the merge.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence
from typing import Any

import torch

from pml_margins.distributed.collectives import (
    ProcessGroup,
    all_gather_rows,
    all_reduce_,
    checked_on_every_rank,
    rank_and_world_size,
    settings_code,
)
from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.evaluation.calculator import (
    common_float,
    describe_knn,
)
from pml_margins.evaluation.inputs import as_embeddings, check_knn, label_dtype
from pml_margins.evaluation.knn import (
    Backend,
    Metric,
    check_num_threads,
    finish_values,
    knn_float64,
    merge_neighbours,
    thread_limit,
    uses_faiss,
)
from pml_margins.validation import check_flag

__all__ = ["ShardedRetrievalAccuracyCalculator", "sharded_exact_knn"]


def _gather_columns(x: torch.Tensor, world_size: int, group: ProcessGroup | None) -> torch.Tensor:
    """``(Q, k)`` on each rank -> ``(Q, world_size * k)``, rank-major columns."""
    gathered = all_gather_rows(x.contiguous(), group)[0]  # (world_size * Q, k)
    return gathered.view(world_size, x.shape[0], -1).permute(1, 0, 2).reshape(x.shape[0], -1)


def _callable_name(function: object) -> str:
    """A user's function as the ranks compare it: ``None``, or its module and qualified
    name (a lambda's: ``<lambda>``), else its class's."""
    if function is None:
        return "None"
    named = function if hasattr(function, "__qualname__") else type(function)
    return f"{getattr(named, '__module__', '')}.{named.__qualname__}"


def sharded_exact_knn(
    query: torch.Tensor,
    reference_shard: torch.Tensor,
    k: int,
    *,
    metric: Metric = "euclidean",
    normalize: bool = False,
    exclude_self: bool = False,
    block_rows: int | None = None,
    num_threads: int | None = None,
    backend: Backend = "auto",
    group: ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~pml_margins.evaluation.exact_knn` over a reference set sharded across ranks.

    Args:
        query: ``(Q, D)``, the same on every rank (else a ``ValueError`` on every rank;
            differences of rounding, as a model recomputed on each rank gives, pass).
        reference_shard: this rank's ``(R_local, D)`` slice of the reference set, with at
            least one row (an empty slice is a ``ValueError`` on every rank).
        k: neighbours per query, ``0 <= k <= R`` (``R - 1`` with ``exclude_self``),
            ``R`` the global reference size.
        metric, normalize, block_rows, num_threads, backend: as ``exact_knn``.
        exclude_self: query ``i`` is global reference ``i`` and not its own neighbour.
        group: process group (default: the world; none initialized: one process).

    Returns:
        ``(values, indices)``, each ``(Q, k)``, identical on every rank, as
        ``exact_knn`` on the concatenated reference set (global indices).

    Raises:
        TypeError / ValueError: bad embeddings, ``k``, ``metric``, ``block_rows``,
            ``num_threads`` or ``backend``.
    """

    def check() -> tuple[torch.Tensor, torch.Tensor]:
        checked = as_embeddings(query, "query")
        shard = as_embeddings(reference_shard, "reference_shard", checked.shape[1])
        # what needs no global size (k's range does: checked below, alike on every rank)
        check_knn(k, metric, False, 0, sys.maxsize, block_rows)
        uses_faiss(backend, checked.device)
        if num_threads is not None:
            check_num_threads(num_threads)
        return checked, shard

    # every rank raises when one does: else the others wait in the sizes' all-gather,
    # or one's own arguments would make another collective differ (an abort)
    rows = _rows(query)
    agreed = {
        "k, metric, normalize and exclude_self": (
            settings_code(_integer_or_repr(k), str(metric), bool(normalize), bool(exclude_self)),
            f"k={k!r}, metric={metric!r}, normalize={normalize!r}, exclude_self={exclude_self!r}",
        ),
        "query rows": (float(rows), str(rows)),
    }
    query, reference_shard = checked_on_every_rank(check, group, _device_of(query), agreed)
    device = query.device
    _agree_on_layouts(group, device, ("query",), query=query)  # its dtype: the values' (the shards'
    # dtypes may differ: each rank ranks its own in float64; their width is the query's)
    rank, world_size = rank_and_world_size(group)
    sizes = all_gather_rows(torch.tensor([len(reference_shard)], device=device), group)[0]
    sizes = sizes.tolist()
    total, offset = sum(sizes), sum(sizes[:rank])
    k, block_rows = check_knn(k, metric, exclude_self, len(query), total, block_rows)
    largest = metric == "dot"
    with torch.no_grad(), thread_limit(num_threads):
        local_k = min(k, len(reference_shard))
        values, indices = knn_float64(
            query,
            reference_shard,
            local_k,
            metric,
            normalize,
            offset if exclude_self else None,
            block_rows,
            backend=backend,
        )
        pad = k - local_k  # worst values that never win: the global set has k better
        worst = -torch.inf if largest else torch.inf
        values = torch.nn.functional.pad(values, (0, pad), value=worst)
        indices = torch.nn.functional.pad(indices + offset, (0, pad), value=total)
        if world_size > 1:
            values, indices = merge_neighbours(
                _gather_columns(values, world_size, group),
                _gather_columns(indices, world_size, group),
                k,
                largest,
            )
    return finish_values(values, metric, query.dtype), indices


def _agree_on_layouts(
    group: ProcessGroup | None,
    device: torch.device,
    same: Sequence[str] = (),
    **tensors: torch.Tensor,
) -> None:
    """``ValueError`` on every rank when the ranks' checked tensors differ in dtype or in
    shape past their rows: what is gathered would be misread (an abort, or each rank
    its own result); and when those named in ``same`` (the query set and its labels,
    which every rank passes whole) differ in content: each rank would rank its own
    queries and count with its own labels, a number that is no rank's (and not the
    same on all). Labels are compared exactly (:func:`_content_code`), embeddings
    through :func:`_value_summary` up to a relative 1e-6 per row (queries that each
    rank's model recomputed may differ in their last bits)."""
    codes = {
        f"{name} dtypes and shapes past the rows": (
            settings_code(str(t.dtype), tuple(t.shape[1:])),
            f"{t.dtype}, {tuple(t.shape[1:])}",
        )
        for name, t in tensors.items()
    }
    hint = "pass the same query set on every rank, or reference=None for a sharded set"
    equal = {}
    for name in same:
        t = tensors[name]
        if t.is_floating_point() and t.ndim == 2:
            equal[f"{name} values (summarized)"] = _value_summary(t)
        else:
            code = _content_code(t)
            codes[f"{name} values"] = (code, f"fingerprint {code:.0f} of {len(t)} rows; {hint}")
    checked_on_every_rank(lambda: None, group, device, codes, equal, hint)


#: odd position multiplier of :func:`_content_code` (PCG's 64-bit one)
_POSITION_MULTIPLIER = 6364136223846793005


def _content_code(values: torch.Tensor) -> float:
    """An exact fingerprint of ``values``' elements in order: the int64 sum (wrapping) of
    their bit patterns times odd positional weights, its low 53 bits (a float64 holds
    them exactly). Integer arithmetic: the same on any device and thread count."""
    flat = values.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    weights = torch.arange(len(flat), dtype=torch.int64, device=flat.device)
    weights = weights.mul_(_POSITION_MULTIPLIER).bitwise_or_(1)
    code = int(torch.sum(flat.long() * weights))
    return float(code & ((1 << 53) - 1))


def _value_summary(x: torch.Tensor) -> torch.Tensor:
    r"""``(2 N,)`` float64 sums per row of ``x`` ``(N, D)`` that change with its values and
    their order, and by about their rounding error when the values do:
    :math:`\sum_j |x_{ij}|\,u_j` and :math:`\sum_j \max(x_{ij}, 0)\,v_j`, with fixed
    positional weights in ``[1, 2)`` (sums of positive terms: no cancellation near 0).
    Per row, so that a row that differs stands out by its own size: one summary of the
    whole set let a 0.1 change in one coordinate of one of 3,000 x 64 queries pass its
    relative 1e-6 (found by review). Row chunks, float64."""
    opts = {"dtype": torch.float64, "device": x.device}

    def weights(n: int, seed: float) -> torch.Tensor:
        return torch.arange(n, **opts).mul_(seed).frac_().add_(1.0)

    u, v = weights(x.shape[1], 0.6180339887), weights(x.shape[1], 0.4142135623)
    out = torch.empty(len(x), 2, **opts)
    step = max(1, 2**20 // max(1, x.shape[1]))
    for s in range(0, len(x), step):
        rows = x[s : s + step].detach().to(torch.float64)
        out[s : s + step, 0] = rows.abs() @ u
        out[s : s + step, 1] = rows.clamp(min=0) @ v  # (rows may be x itself)
    return out.reshape(-1)


def _ranks_label_dtype(
    group: ProcessGroup | None, device: torch.device, *labels: torch.Tensor | None
) -> torch.dtype:
    """:func:`~pml_margins.evaluation.inputs.label_dtype` of every rank's labels (one
    all-reduce): the narrowest floating dtype on any rank, else int64."""
    dtype = label_dtype([t.dtype for t in labels if t is not None])
    bits = torch.finfo(dtype).bits if dtype.is_floating_point else 1024
    narrowest = all_reduce_(torch.tensor([-bits], device=device), "max", group)
    return {32: torch.float32, 64: torch.float64, 1024: torch.int64}[-int(narrowest.item())]


def _rows(x: Any) -> int:
    """``len(x)``, or -1 where it has none (the checks then name the problem)."""
    try:
        return len(x)
    except TypeError:
        return -1


def _integer_or_repr(value: Any) -> int | str:
    """An integer argument as an ``int`` (a numpy or tensor one too: the ranks' devices
    may differ), anything else as its ``repr`` (the checks then name the problem)."""
    try:
        return operator.index(value)
    except TypeError:
        return repr(value)


def _device_of(x: Any) -> torch.device:
    """Where ``x`` lives (CPU for numpy arrays and anything else): the verdicts' device."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


class ShardedRetrievalAccuracyCalculator(RetrievalAccuracyCalculator):
    """:class:`~pml_margins.evaluation.RetrievalAccuracyCalculator` with a sharded reference set.

    Same arguments (plus ``group``) and the same metrics, equal to the
    single-process calculator on the concatenated reference set. Call
    :meth:`get_accuracy` on every rank, with the full query set and this rank's
    reference slice (at least one row: an empty slice is a ``ValueError`` on every
    rank); every rank gets the result. Only the reference labels
    (one integer per reference) are all-gathered, not the embeddings -- unless a
    subclass adds a metric of its own (PML passes every metric ``reference``): the
    reference set is then gathered for it.

    Example (on every rank)::

        calc = ShardedRetrievalAccuracyCalculator(include=("precision_at_1", "recall_at_1"))
        calc.get_accuracy(queries, query_labels, my_references, my_reference_labels)
        calc.get_accuracy(my_part_of_a_set, its_labels)  # the set against itself
    """

    def __init__(self, *args: Any, group: ProcessGroup | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self._shard: torch.Tensor | None = None

    def check_search(self, exact: tuple[str, bool] | None, knn_func: Any) -> None:
        """A search other than the exact k-nn (a ``knn_func`` run as PML's) is refused."""
        if knn_func is not None:
            raise ValueError(
                f"{type(self).__name__} runs the sharded exact k-nn, which supports "
                "LpDistance(p=2, power=1 or 2) and CosineSimilarity / DotProductSimilarity "
                "(power=1, p=2 when normalizing), as built (no hook, no method or is_inverted "
                "changed), and FaissKNN with a flat L2 or inner-product index made and dropped "
                f"at each call; got {describe_knn(knn_func)}, which cannot see the other ranks' "
                "references"
            )

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
            query, query_labels: all queries (the same on every rank: a ``ValueError``
                on every rank where the labels differ, or the embeddings beyond
                rounding); or, with
                ``reference=None``, this rank's slice of a set that is evaluated
                against itself (queries and references are then the whole set).
            reference, reference_labels: this rank's slice of the reference set.
            ref_includes_query: the global reference set starts with the queries.
            include, exclude: as PML.
        """

        ref_includes_query = check_flag(ref_includes_query, "ref_includes_query")
        try:  # (raised in check: every rank then raises together)
            self.refresh_search()
            refused = None
        except (TypeError, ValueError) as error:
            refused = error

        def check() -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
            """(query, query_labels, shard, shard_labels), checked, on the compute device;
            query and its labels are None when the set is evaluated against itself (the
            whole set is then gathered from the shards)."""
            self._check_call_metrics(include, exclude)  # (their type first)
            if refused is not None:
                raise refused
            if reference is None:  # PML then ignores reference_labels: the query's own
                shard, device = self._checked_query(query)
                labels = self.checked_labels(query_labels, len(shard), "query_labels")
                if reference_labels is not None and reference_labels is not query_labels:
                    self._check_ignored_reference_labels(reference_labels, labels)
                return None, None, shard, labels.to(device)
            if reference_labels is None:
                raise ValueError("reference given without reference_labels")
            q, device = self._checked_query(query)
            q_labels = self.checked_labels(query_labels, len(q), "query_labels").to(device)
            shard = as_embeddings(reference, "reference", q.shape[1]).to(device)
            labels = self.checked_labels(reference_labels, len(shard), "reference_labels")
            return q, q_labels, shard, labels.to(device)

        # every rank raises if one does (no rank left waiting in a collective), and when
        # the ranks' settings differ (other collectives: a hang, or an abort)
        device = self.device if self.device is not None else _device_of(query)
        # (a bad include/exclude, refused by check() on every rank, is compared as its repr)
        asked = [
            tuple(v) if isinstance(v, (tuple, list)) else (repr(v),) for v in (include, exclude)
        ]
        metrics = (*self.original_function_dict, "include", *asked[0], "exclude", *asked[1])
        settings = (str(self.k), metrics, ref_includes_query, reference is None)
        settings += (self.avg_of_avgs, self.return_per_class, self.recall_ks, str(self.exact))
        # a user's label comparison and k-means by name (their code cannot be compared)
        kmeans = "default" if self._own_kmeans is not None else _callable_name(self.kmeans_func)
        settings += (_callable_name(self.custom_comparison), kmeans)
        rows = _rows(query) if reference is not None else -1
        agreed = {
            "settings (k, metrics, ref_includes_query, ...)": (
                settings_code(*settings),
                f"k={self.k!r}, metrics={metrics}, ref_includes_query={ref_includes_query}, "
                f"label_comparison_fn={settings[-2]}, kmeans_func={settings[-1]}",
            ),
            "query rows": (float(rows), str(rows)),
        }
        checked_query, checked_labels, shard, shard_labels = checked_on_every_rank(
            check, self.group, device, agreed
        )
        # one dtype on every rank (int64 on one rank and float32 on another compare equal,
        # as in one process and in PML)
        dtype = _ranks_label_dtype(self.group, shard.device, shard_labels, checked_labels)
        shard_labels = shard_labels.to(dtype)
        checked_labels = None if checked_labels is None else checked_labels.to(dtype)
        layouts = {"reference_labels": shard_labels}  # gathered, as the shards' rows when
        # the set is evaluated against itself or a subclass's own metric reads them
        if reference is None or self._own_metrics(include, exclude):
            layouts |= {"reference": shard}
        if reference is not None:
            layouts |= {"query": checked_query, "query_labels": checked_labels}
        same = ("query", "query_labels") if reference is not None else ()
        _agree_on_layouts(self.group, shard.device, same, **layouts)
        if reference is None:
            query = all_gather_rows(shard, self.group)[0]
            query_labels = all_gather_rows(shard_labels, self.group)[0]
            ref_includes_query = True
        else:
            query, query_labels = checked_query, checked_labels
        reference_labels, sizes = all_gather_rows(shard_labels, self.group)
        if ref_includes_query:
            self._check_reference_starts_with_query(query, query_labels, shard, shard_labels, sizes)
        self._shard = shard
        # our metrics read only len() of the reference outside _knn: a zero-stride stand-in;
        # a subclass's own metric may read it (PML passes ``reference``): the gathered set
        if self._own_metrics(include, exclude):
            whole_reference = all_gather_rows(shard, self.group)[0]
        else:
            stand_in = shard.new_zeros((), dtype=torch.float32)  # float32: the metrics' dtype
            whole_reference = stand_in.expand(len(reference_labels), shard.shape[1])
        try:
            return self._compute(
                query,
                whole_reference,
                query_labels,
                reference_labels,
                ref_includes_query,
                include,
                exclude,
            )
        finally:
            self._shard = None

    def _own_metrics(self, include: Sequence[str], exclude: Sequence[str]) -> list[str]:
        """The requested metrics that a subclass defines (``calculate_<name>`` found on a
        class below this one), which get the whole reference set."""
        mro = type(self).__mro__
        ours = set(mro[mro.index(ShardedRetrievalAccuracyCalculator) :])
        own = []
        for name in self.get_function_dict(tuple(include), tuple(exclude)):
            method = f"calculate_{name}"
            if method in self.__dict__:  # the recall_at_K partials
                continue
            owner = next((c for c in type(self).__mro__ if method in c.__dict__), None)
            if owner is not None and owner not in ours:
                own.append(name)
        return own

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
            ok = torch.allclose(*common_float(query[start:stop], shard[: stop - start])) and (
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
        metric, normalize = self.exact
        return sharded_exact_knn(
            query,
            shard,
            k,
            metric=metric,
            normalize=normalize,
            exclude_self=ref_includes_query,
            block_rows=self.block_rows,
            num_threads=self.num_threads,
            backend=self.backend,
            group=self.group,
        )
