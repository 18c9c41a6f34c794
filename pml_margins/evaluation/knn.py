"""Exact k-nearest neighbours: a float32 candidate pass, certified, re-scored in float64.

1. **Candidates.** The data are centred (Euclidean distance is translation
   invariant), scaled by a power of two and rounded to float32; one matrix
   product per tile gives the cost ``c = |b|^2/2 - a.b`` (``-a.b`` for the dot
   product) and ``torch.topk`` keeps ``k' = k + margin`` candidates per query.
   When the query set is the reference set only the tiles on and above the
   diagonal are multiplied: each product also serves, transposed, its mirror tile.
2. **Certificate.** :func:`float32_error_bound` bounds ``|c~ - c|`` by ``E`` for
   every pair of a query. Any true top-``k`` reference has ``c~ <= c~_k + 2E``
   (``c~_k``: the ``k``-th candidate cost), so a query whose ``k'``-th candidate
   cost exceeds ``c~_k + 2E`` holds the true top ``k`` among its candidates.
   Other queries (exact duplicate groups larger than the margin, say) are redone
   with four times as many candidates, up to the whole reference set.
3. **Exact ranking.** Candidates are re-scored from the original values in
   float64 (``sum((a - b)^2)`` or ``sum(a * b)``, so identical embeddings give
   identical values) and sorted by (value, index): ties go to the lower index.

The result equals a float64 brute force whatever the offset, block size,
thread count or device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
from tqdm.auto import tqdm

from pml_margins.evaluation.inputs import as_embeddings

__all__ = ["Metric", "check_k", "exact_knn", "float32_error_bound", "merge_neighbours"]

Metric = Literal["euclidean", "sqeuclidean", "dot"]
METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean", "dot")
#: unit roundoff of float32
UNIT_ROUNDOFF = 2.0**-24
#: tile side of the candidate pass when ``block_rows`` is not given (64 MiB of float32)
DEFAULT_TILE = 4096
#: float64 elements per chunk of the conversions and of the re-scoring
CHUNK_ELEMENTS = 2**18


def float32_error_bound(
    query_norms: torch.Tensor, max_reference_norm: float, dim: int, metric: str
) -> torch.Tensor:
    """Per query, a bound ``E`` on the error of every float32 candidate cost.

    With ``a`` a query and ``b`` a reference after centring and scaling, each
    rounded to float32 (relative error ``u = 2^-24`` per coordinate), and a
    ``D``-term float32 dot product in any summation order (error at most
    ``D u |a||b| / (1 - D u)``):

    .. math::

        E_a = 2 (D + 8)\\, u\\, (|a| + R)^2 \\quad\\text{(Euclidean, cost } |b - a|^2/2
        \\text{ up to a per-query constant)}, \\qquad
        E_a = 2 (D + 8)\\, u\\, |a| R \\quad\\text{(dot)}

    with ``R`` the largest reference norm; about twice the sum of the worst-case
    terms (product, norm and rounding of the inputs), plus an absolute term for
    subnormal coordinates.

    Args:
        query_norms: ``(Q,)`` float64 norms of the float32 queries.
        max_reference_norm: ``R``.
        dim: ``D``.
        metric: ``"euclidean"``/``"sqeuclidean"`` or ``"dot"``.

    Returns:
        ``(Q,)`` float64.
    """
    scale = 2 * (dim + 8) * UNIT_ROUNDOFF
    tiny = dim * 2.0**-120
    if metric == "dot":
        return scale * query_norms * max_reference_norm + tiny
    return scale * (query_norms + max_reference_norm) ** 2 + tiny


def check_k(k: object, available: int) -> int:
    """``k`` as an int in ``[0, available]``, else ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= available:
        raise ValueError(f"k must be an integer in [0, {available}], got {k!r}")
    return k


def merge_neighbours(
    values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of candidate lists ``(Q, m)`` by (value, lower index first).

    A sort by index, then a stable sort by value (descending if ``largest``).
    """
    indices, order = torch.sort(indices, dim=1)
    values = values.gather(1, order)
    values, order = torch.sort(values, dim=1, descending=largest, stable=True)
    return values[:, :k], indices.gather(1, order)[:, :k]


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Set torch's CPU thread count for the duration (restored after)."""
    if num_threads is None:
        yield
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rows64(x: torch.Tensor, normalize: bool, out: torch.Tensor) -> torch.Tensor:
    """Rows in float64 into ``out`` (no allocation), L2-normalized if asked: the
    values every result is exact for. Identical rows give identical values."""
    out = out[: len(x)].copy_(x)
    if normalize:
        norms = torch.linalg.vector_norm(out, dim=-1, keepdim=True)
        out.div_(norms.clamp_(min=1e-12))
    return out


def _float32_operand(
    x: torch.Tensor, normalize: bool, centre: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``(x - centre) * scale`` in float32, through float64 in row chunks."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    buffer = torch.empty(min(rows, len(x)), x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, len(x), rows):
        chunk = _rows64(x[s : s + rows], normalize, buffer)
        if centre is not None:
            chunk -= centre
        out[s : s + rows] = chunk.mul_(scale)
    return out


def _mean64(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Column means in float64, in row chunks."""
    rows = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    buffer = torch.empty(min(rows, len(x)), x.shape[1], dtype=torch.float64, device=x.device)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, len(x), rows):
        total += _rows64(x[s : s + rows], normalize, buffer).sum(dim=0)
    return total / len(x)


def _float32_operands(
    query: torch.Tensor, reference: torch.Tensor, metric: str, normalize: bool, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred (Euclidean), power-of-two-scaled float32 copies of the two sets."""
    centre = None
    if metric != "dot":
        centre = _mean64(reference, normalize)
    a = _float32_operand(query, normalize, centre, 1.0)
    b = a if symmetric else _float32_operand(reference, normalize, centre, 1.0)
    largest = max(float(a.abs().max()), float(b.abs().max()))
    if largest == 0 or 0.5 <= largest < 1:
        return a, b
    scale = 2.0 ** -math.frexp(largest)[1]  # max |x| in [0.5, 1): no overflow in the costs
    a = _float32_operand(query, normalize, centre, scale)
    return a, a if symmetric else _float32_operand(reference, normalize, centre, scale)


class _Candidates:
    """Running ``k'`` smallest float32 costs per query, fed tile by tile."""

    def __init__(self, num_rows: int, width: int, device: torch.device) -> None:
        self.width = width
        self.costs = torch.full((num_rows, width), torch.inf, device=device)
        self.indices = torch.full((num_rows, width), -1, dtype=torch.long, device=device)

    def add(self, rows: slice, costs: torch.Tensor, col_start: int) -> None:
        kk = min(self.width, costs.shape[1])
        c, i = torch.topk(costs, kk, dim=1, largest=False, sorted=False)
        c = torch.cat([self.costs[rows], c], dim=1)
        i = torch.cat([self.indices[rows], i + col_start], dim=1)
        c, pos = torch.topk(c, self.width, dim=1, largest=False, sorted=False)
        self.costs[rows], self.indices[rows] = c, i.gather(1, pos)


def _candidate_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    metric: str,
    width: int,
    self_columns: torch.Tensor | None,
    symmetric: bool,
    tile: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 costs and indices of ``width`` candidates per query row of ``a``.

    ``self_columns[i]`` is the column of query ``i`` itself (excluded), or out of range.
    """
    nq, nr = len(a), len(b)
    half = None if metric == "dot" else torch.linalg.vector_norm(b, dim=1, dtype=torch.float64)
    half = None if half is None else half.square_().div_(2).float()
    found = _Candidates(nq, width, a.device)
    if symmetric:
        tasks = [(i, j) for i in range(0, nq, tile) for j in range(i, nr, tile)]
    else:
        tasks = [(i, j) for i in range(0, nq, tile) for j in range(0, nr, tile)]
    for i, j in tqdm(tasks, desc="k-nn", unit="tile", disable=not progress):
        ri, rj = slice(i, min(i + tile, nq)), slice(j, min(j + tile, nr))
        products = a[ri] @ b[rj].T
        mirror = None
        if symmetric and i != j:
            mirror = -products.T if half is None else half[ri] - products.T
        costs = products.neg_() if half is None else products.neg_().add_(half[rj])
        if self_columns is not None:
            rows = torch.arange(ri.start, ri.stop, device=a.device)
            cols = self_columns[ri] - j
            mine = (cols >= 0) & (cols < rj.stop - j)
            costs[(rows - i)[mine], cols[mine]] = torch.inf
        found.add(ri, costs, j)
        if mirror is not None:
            found.add(rj, mirror, i)
    return found.costs, found.indices


def _rescore(
    query: torch.Tensor,
    reference: torch.Tensor,
    indices: torch.Tensor,
    metric: str,
    normalize: bool,
) -> torch.Tensor:
    """float64 ranking values of the candidates: squared distance or dot product,
    from the original values (identical rows give identical values)."""
    num, width, dim = len(query), indices.shape[1], query.shape[1]
    out = torch.empty(num, width, dtype=torch.float64, device=query.device)
    if num == 0:
        return out
    rows = min(num, max(1, CHUNK_ELEMENTS // max(1, width * dim)))
    gathered = torch.empty(rows * width, dim, dtype=reference.dtype, device=query.device)
    picked64 = torch.empty(rows * width, dim, dtype=torch.float64, device=query.device)
    query64 = torch.empty(rows, dim, dtype=torch.float64, device=query.device)
    for s in range(0, num, rows):
        n = min(rows, num - s)
        columns = indices[s : s + n].clamp(min=0).flatten()
        torch.index_select(reference, 0, columns, out=gathered[: n * width])
        picked = _rows64(gathered[: n * width], normalize, picked64).view(n, width, dim)
        q = _rows64(query[s : s + n], normalize, query64)[:, None, :]
        picked.mul_(q) if metric == "dot" else picked.sub_(q).square_()
        torch.sum(picked, dim=2, out=out[s : s + n])
    return out


def _certified(costs: torch.Tensor, k: int, bound: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Rows whose candidates provably hold their true top ``k`` (see the module doc)."""
    width = costs.shape[1]
    if width >= num_columns or k == 0:
        return torch.ones(len(costs), dtype=torch.bool, device=costs.device)
    ordered = torch.sort(costs, dim=1).values.double()
    return ordered[:, width - 1] > ordered[:, k - 1] + 2 * bound


def knn_float64(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    metric: str,
    normalize: bool = False,
    self_offset: int | None = None,
    block_rows: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top ``k`` of checked inputs: float64 values (squared distance or dot
    product) and indices, on the query's device.

    ``self_offset``: query ``i`` is reference ``i - self_offset`` and is given the
    worst value (``inf``, ``-inf`` for ``"dot"``) instead of being excluded, so
    that a reference shard may hold it or not (:mod:`pml_margins.distributed`).
    """
    device = query.device
    symmetric = self_offset in (None, 0) and (
        query is reference
        or (query.shape == reference.shape and torch.equal(query, reference.to(device)))
    )
    reference = query if symmetric else reference.to(device)
    nq, nr = len(query), len(reference)
    worst = -torch.inf if metric == "dot" else torch.inf
    if k == 0 or nr == 0:
        return torch.empty(nq, 0, dtype=torch.float64, device=device), torch.empty(
            nq, 0, dtype=torch.long, device=device
        )
    a, b = _float32_operands(query, reference, metric, normalize, symmetric)
    bound = float32_error_bound(
        a.double().norm(dim=1), float(b.double().norm(dim=1).max()), a.shape[1], metric
    )
    rows_all = torch.arange(nq, device=device)
    self_columns = None if self_offset is None else rows_all - self_offset
    tile = block_rows or DEFAULT_TILE
    values = torch.empty(nq, k, dtype=torch.float64, device=device)
    indices = torch.empty(nq, k, dtype=torch.long, device=device)
    todo, width, first = rows_all, min(nr, k + max(8, k // 4)), True
    while len(todo):
        costs, cand = _candidate_pass(
            a if first else a[todo],
            b,
            metric,
            width,
            None if self_columns is None else self_columns[todo],
            symmetric and first,
            tile,
            progress and first,
        )
        ok = _certified(costs, k, bound[todo], nr)
        done = todo[ok]
        v = _rescore(query[done], reference, cand[ok], metric, normalize)
        own = cand[ok] == (done[:, None] - self_offset if self_offset is not None else -2)
        v[own | (cand[ok] < 0)] = worst
        values[done], indices[done] = merge_neighbours(v, cand[ok], k, metric == "dot")
        todo, width, first = todo[~ok], min(nr, 4 * width), False
    return values, indices


def exact_knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    metric: Metric = "euclidean",
    normalize: bool = False,
    exclude_self: bool = False,
    block_rows: int | None = None,
    num_threads: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest references of every query, equal to a float64 brute force.

    Ties go to the lower reference index. The result does not depend on
    ``block_rows``, ``num_threads`` or the device (see the module docstring).

    Args:
        query: ``(Q, D)`` embeddings, floating or integer (tensor or numpy array).
        reference: ``(N, D)`` embeddings.
        k: neighbours per query, ``0 <= k <= N`` (``N - 1`` with ``exclude_self``).
        metric: ``"euclidean"`` (distance), ``"sqeuclidean"`` (squared distance, what
            faiss's ``IndexFlatL2`` returns) or ``"dot"`` (similarity, highest first).
        normalize: L2-normalize both sets first (in float64): cosine with ``"dot"``.
        exclude_self: query ``i`` is reference ``i`` and never its own neighbour
            (excluded by index: exact duplicates still count).
        block_rows: tile side of the candidate pass (memory ``~4 block_rows^2`` bytes).
        num_threads: torch CPU threads for the call (restored after); default unchanged.
        progress: a tqdm bar over tiles.

    Returns:
        ``(values, indices)``, each ``(Q, k)``, nearest first; values are float64
        for float64 input, else float32.

    Raises:
        TypeError / ValueError: bad embeddings (see :func:`.inputs.as_embeddings`),
            ``k``, ``metric``, ``block_rows`` or ``num_threads``.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [1.0], [3.0]])
        >>> exact_knn(x, x, 2, exclude_self=True)[1].tolist()
        [[1, 2], [2, 0], [1, 0], [1, 2]]
    """
    query = as_embeddings(query, "query")
    reference = as_embeddings(reference, "reference", query.shape[1])
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if exclude_self and len(reference) < len(query):
        raise ValueError("exclude_self needs the reference set to start with the query set")
    check_k(k, len(reference) - int(exclude_self))
    if block_rows is not None and (
        isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1
    ):
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
    with torch.no_grad(), _torch_threads(num_threads):
        values, indices = knn_float64(
            query,
            reference,
            k,
            metric,
            normalize,
            0 if exclude_self else None,
            block_rows,
            progress,
        )
    return finish_values(values, metric, query.dtype), indices


def finish_values(values: torch.Tensor, metric: str, dtype: torch.dtype) -> torch.Tensor:
    """float64 ranking values as returned: distance (sqrt) for ``"euclidean"``, in
    float64 for float64 input, else float32."""
    if metric == "euclidean":
        values = values.sqrt()
    return values.to(torch.float64 if dtype == torch.float64 else torch.float32)
