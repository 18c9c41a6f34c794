"""Exact k-nearest neighbours by blocked matrix products.

Scores are computed one block at a time and fed to a running top-k
(:mod:`.topk`), so peak memory is a block, never the full similarity matrix.
When the query set *is* the reference set (the usual retrieval evaluation,
``query = reference``), the similarity matrix is symmetric: only the blocks on
and above the diagonal are multiplied, and each off-diagonal block also serves,
transposed, the rows of its mirror image, which saves close to half of the
products. Ties are broken by reference index (the lower index ranks first), so
the result does not depend on the block size, the device or the selection
kernel.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from pml_margins.evaluation.topk import (
    merge_candidates,
    order_ties_by_index,
    running_topk,
)
from pml_margins.evaluation.workers import run_workers

__all__ = [
    "auto_block_rows",
    "check_knn_inputs",
    "check_knn_k",
    "cost_operands",
    "default_memory_budget",
    "exact_knn",
    "gram_block",
    "half_sq_norms",
]

Metric = Literal["euclidean", "dot"]

_CPU_BUDGET_MIN_BYTES = 16 * 2**20
_CPU_BUDGET_MAX_BYTES = 512 * 2**20
_CUDA_BUDGET_CAP_BYTES = 4 * 2**30

#: most worker threads of the CPU k-nn
MAX_KNN_WORKERS = 8
#: most bytes of per-worker heaps (SOP's 60,502 queries at k = 1,000: 726 MB each)
MAX_HEAP_BYTES = 2 * 2**30
#: bytes of temporaries for merging the workers' lists (rows are merged in chunks)
MERGE_BYTES = 64 * 2**20


def default_memory_budget(device: torch.device, num_reference: int, dim: int, itemsize: int) -> int:
    """Default bytes for the score blocks of :func:`exact_knn`.

    On CUDA a quarter of the free memory, capped at 4 GiB. On CPU the size of the
    reference set, within [16 MiB, 512 MiB]: large blocks keep the products
    efficient on large sets, small ones keep small sets lean.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(free // 4, _CUDA_BUDGET_CAP_BYTES)
    reference_bytes = num_reference * dim * itemsize
    return min(max(reference_bytes, _CPU_BUDGET_MIN_BYTES), _CPU_BUDGET_MAX_BYTES)


def auto_block_rows(
    num_reference: int,
    itemsize: int,
    device: torch.device,
    memory_budget: int | None = None,
    dim: int = 0,
) -> int:
    """Number of query rows per block so that one block's temporaries fit a budget.

    A block holds a score matrix (``itemsize`` bytes per entry) plus a boolean
    tie mask of the same shape.

    Args:
        num_reference: number of reference embeddings (columns of a block).
        itemsize: bytes per score.
        device: where the block is computed (for the default budget).
        memory_budget: bytes allowed for one block; default
            :func:`default_memory_budget`.
        dim: embedding width, for the CPU default.

    Returns:
        The number of rows, at least 1.
    """
    if memory_budget is None:
        memory_budget = default_memory_budget(device, num_reference, dim, itemsize)
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")
    bytes_per_row = max(1, num_reference * (itemsize + 1))
    return max(1, int(memory_budget // bytes_per_row))


def knn_workers(device: torch.device, dtype: torch.dtype, k: int, num_query: int = 0) -> int:
    """Worker threads for :func:`exact_knn`.

    Where the selection runs in faiss heaps (CPU, float32): torch's CPU thread
    count, at most :data:`MAX_KNN_WORKERS`, and no more than fit
    :data:`MAX_HEAP_BYTES` of ``num_query x k`` heaps (each worker holds its own).
    Otherwise 1.
    """
    if device.type != "cpu" or dtype != torch.float32:
        return 1
    heap_bytes = max(1, num_query * k * 12)  # float32 cost + int64 column
    by_memory = max(1, MAX_HEAP_BYTES // heap_bytes)
    return max(1, min(torch.get_num_threads(), MAX_KNN_WORKERS, by_memory))


def check_knn_inputs(
    query: torch.Tensor, reference: torch.Tensor, metric: str, reference_name: str = "reference"
) -> None:
    """``ValueError`` unless ``metric`` is known and both sets are 2-D of equal widths."""
    if metric not in ("euclidean", "dot"):
        raise ValueError(f"metric must be 'euclidean' or 'dot', got {metric!r}")
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query and {reference_name} must be 2-D with equal widths, got "
            f"{tuple(query.shape)} and {tuple(reference.shape)}"
        )


def check_knn_k(k: object, num_query: int, num_reference: int, exclude_self: bool) -> None:
    """``ValueError`` unless ``0 <= k <= num_reference`` (minus one with
    ``exclude_self``, which also needs the reference set to hold the queries)."""
    if exclude_self and num_reference < num_query:
        raise ValueError("exclude_self needs the reference set to start with the query set")
    available = num_reference - int(exclude_self)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= available:
        raise ValueError(f"k must be an integer in [0, {available}], got {k!r}")


def _numpy_path(t: torch.Tensor) -> bool:
    """Whether block arithmetic on ``t`` goes through numpy (CPU) or torch (other
    devices). Tests switch it off to run the torch path on CPU tensors."""
    return t.device.type == "cpu"


def gram_block(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T``, written into ``out`` when given; on CPU through numpy's BLAS.

    torch's CPU wheels link MKL, whose single-precision GEMM runs about 1.7x slower
    than the OpenBLAS that numpy ships on the AMD EPYC machines we measure on
    (4,096 x 512 by 512 x 60,502: 2.17 s vs 1.26 s, 2 threads; faiss, which PML
    uses, also links OpenBLAS). Writing into a reused ``out`` avoids the page
    faults of a fresh block per product (0.22 s vs 0.13 s for 5,924^2 x 512).
    ``out`` must be contiguous.
    """
    if _numpy_path(a):
        if out is None:
            return torch.from_numpy(np.matmul(a.numpy(), b.numpy().T))
        np.matmul(a.numpy(), b.numpy().T, out=out.numpy())
        return out
    if out is None:
        return a @ b.T
    return torch.mm(a, b.T, out=out)


def half_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """``|x|^2 / 2`` per row, summed in float64 and rounded once to ``x``'s dtype.

    Rounded once from a near-exact sum, equal rows get equal values wherever
    they sit in memory (a float32 reduction's order can depend on alignment), so
    exact duplicates tie exactly. On CPU with numpy, in row chunks.
    """
    if not _numpy_path(x):
        return ((x.double() ** 2).sum(dim=1) / 2).to(x.dtype)
    a = x.numpy()
    out = np.empty(len(a), dtype=a.dtype)
    for start in range(0, len(a), 4096):
        chunk = a[start : start + 4096].astype(np.float64)
        out[start : start + 4096] = np.einsum("ij,ij->i", chunk, chunk) / 2
    return torch.from_numpy(out)


def cost_operands(
    x: torch.Tensor, metric: Metric, half_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left_a · right_b`` the cost of ``b`` for query ``a``.

    Lower is nearer. ``"dot"``: ``left = -x``, ``right = x``, cost ``-a·b``.
    ``"euclidean"``: ``left = [-x, 1]``, ``right = [x, h]`` with
    ``h = |x|^2 / 2``, cost ``h_b - a·b``, so ``|a - b|^2 = |a|^2 + 2 cost``: one
    matrix product, no pass over the block, and within a row every cost is
    rounded the same way. On CPU the operands are built with numpy (one thread:
    this runs in the k-nn worker threads, where torch's intra-op threads would
    compete).

    Args:
        x: ``(n, D)`` embeddings.
        metric: ``"dot"`` or ``"euclidean"``.
        half_norms: :func:`half_sq_norms` of ``x`` if already computed.
    """
    if metric == "dot":
        if _numpy_path(x):
            return torch.from_numpy(np.negative(x.numpy())), x
        return -x, x
    if half_norms is None:
        half_norms = half_sq_norms(x)
    if _numpy_path(x):
        a, n, dim = x.numpy(), len(x), x.shape[1]
        left, right = np.empty((n, dim + 1), a.dtype), np.empty((n, dim + 1), a.dtype)
        np.negative(a, out=left[:, :dim])
        left[:, dim] = 1
        right[:, :dim], right[:, dim] = a, half_norms.numpy()
        return torch.from_numpy(left), torch.from_numpy(right)
    ones = torch.ones(len(x), 1, dtype=x.dtype, device=x.device)
    return torch.cat([-x, ones], dim=1), torch.cat([x, half_norms[:, None]], dim=1)


def _view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``rows x cols`` view at the start of a flat buffer."""
    return buffer[: rows * cols].view(rows, cols)


def _add_row_vector(block: torch.Tensor, row: torch.Tensor) -> None:
    """``block += row[None, :]`` in place (numpy on CPU: one thread)."""
    if _numpy_path(block):
        np.add(block.numpy(), row.numpy()[None, :], out=block.numpy())
    else:
        block.add_(row)


def _transpose_into(
    block: torch.Tensor, out: torch.Tensor, row: torch.Tensor | None = None
) -> torch.Tensor:
    """``out = block.T (+ row[None, :])`` in one pass (numpy on CPU: one thread)."""
    if _numpy_path(block):
        if row is None:
            np.copyto(out.numpy(), block.numpy().T)
        else:
            np.add(block.numpy().T, row.numpy()[None, :], out=out.numpy())
    elif row is None:
        out.copy_(block.T)
    else:
        torch.add(block.T, row, out=out)
    return out


def _row_block_costs(
    query: torch.Tensor,
    query_half_norms: torch.Tensor | None,
    reference_right: torch.Tensor,
    metric: Metric,
    exclude_self: bool,
    start: int,
    stop: int,
    buffer: tuple[torch.Tensor, ...],
) -> list[tuple[int, torch.Tensor, int]]:
    """Costs of queries ``start:stop`` to every reference, as ``(row, costs, column)``."""
    h = None if query_half_norms is None else query_half_norms[start:stop]
    left, _ = cost_operands(query[start:stop], metric, h)
    costs = gram_block(left, reference_right, _view(buffer[0], stop - start, len(reference_right)))
    if exclude_self:  # query start + t is reference start + t
        costs.diagonal(offset=start).fill_(torch.inf)
    return [(start, costs, 0)]


def _symmetric_block_costs(
    x: torch.Tensor,
    half_norms: torch.Tensor | None,
    exclude_self: bool,
    side: int,
    pair: tuple[int, int],
    buffer: tuple[torch.Tensor, ...],
) -> list[tuple[int, torch.Tensor, int]]:
    """Costs of block pair ``(i, j)``, ``j >= i``, of ``x`` against itself.

    Block ``(i, j)`` gives the rows of block ``i`` their columns in block ``j``
    and, transposed, the rows of block ``j`` their columns in block ``i``: one
    product serves both, and cost ``(a, b)`` and ``(b, a)`` are one number.
    """
    n = len(x)
    i, j = pair
    i_stop, j_stop = min(i + side, n), min(j + side, n)
    # the products -a·b alone are symmetric to the bit (the same terms summed in
    # the same order); |b|^2 / 2 is added after, to the direct block by column and
    # to the transposed block by its own column, so each row's costs are h_b - a·b
    # rounded alike whichever block they come from
    negated, _ = cost_operands(x[i:i_stop], "dot")
    products = gram_block(negated, x[j:j_stop], _view(buffer[0], i_stop - i, j_stop - j))
    mirror = None
    if j != i:
        h_i = None if half_norms is None else half_norms[i:i_stop]
        mirror = _transpose_into(products, _view(buffer[1], j_stop - j, i_stop - i), h_i)
    if half_norms is not None:
        _add_row_vector(products, half_norms[j:j_stop])
    if mirror is None:
        if exclude_self:
            products.diagonal().fill_(torch.inf)
        return [(i, products, j)]
    return [(i, products, j), (j, mirror, i)]


def exact_knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    metric: Metric = "euclidean",
    exclude_self: bool = False,
    block_rows: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest references of every query, on the query's device.

    Ranking is by the dot product (``metric="dot"``; normalize beforehand for
    cosine similarity) or by Euclidean distance; both go through one matrix
    product per block (see :func:`cost_operands`). Ties go to the lower
    reference index. When ``query`` equals ``reference`` (same shape, equal
    values) only the blocks on and above the diagonal are multiplied.

    On CPU (float32), blocks are shared out to :func:`knn_workers` threads that
    each multiply (numpy's BLAS) and select (faiss heaps) with one thread per
    library (:mod:`.workers`); the BLAS thread setting is changed for the
    duration of the call and restored.

    Args:
        query: ``(Q, D)`` floating embeddings.
        reference: ``(N, D)`` floating embeddings on the same device.
        k: neighbours per query, ``0 <= k <= N`` (``N - 1`` with ``exclude_self``).
        metric: ``"euclidean"`` or ``"dot"``.
        exclude_self: query ``i`` is reference ``i`` and is never its own
            neighbour (excluded by index, so exact duplicates still count).
        block_rows: query rows per block (the block side when ``query`` equals
            ``reference``); automatic from ``memory_budget`` if None.
        memory_budget: bytes for all the score blocks held at once (see
            :func:`auto_block_rows` for the default).
        progress: show a tqdm bar over blocks.

    Returns:
        ``(scores, indices)``, each ``(Q, k)``, nearest first: the similarity for
        ``"dot"``, the Euclidean distance for ``"euclidean"``; indices are int64.

    Raises:
        ValueError: bad ``k``, ``metric`` or ``block_rows``, or mismatched widths.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [1.0], [3.0]])
        >>> exact_knn(x, x, 2, exclude_self=True)[1].tolist()
        [[1, 2], [2, 0], [1, 0], [1, 2]]
    """
    check_knn_inputs(query, reference, metric)
    check_knn_k(k, len(query), len(reference), exclude_self)
    if block_rows is not None and (not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")

    device = query.device
    dtype = torch.promote_types(query.dtype, torch.float32)
    num_query = len(query)
    if k == 0:
        return (
            torch.empty(num_query, 0, dtype=dtype, device=device),
            torch.empty(num_query, 0, dtype=torch.long, device=device),
        )
    with torch.no_grad():
        query = query.detach().to(dtype).contiguous()
        symmetric = query is reference or (
            query.shape == reference.shape and torch.equal(query, reference.to(device, dtype))
        )
        workers = knn_workers(device, dtype, k, num_query)
        query_half_norms = half_sq_norms(query) if metric == "euclidean" else None
        if memory_budget is None and block_rows is None:
            memory_budget = default_memory_budget(
                device, len(reference), query.shape[1], dtype.itemsize
            )
        if symmetric:
            side = block_rows or max(1, math.isqrt(memory_budget // (2 * workers * dtype.itemsize)))
            tasks = [(i, j) for i in range(0, num_query, side) for j in range(i, num_query, side)]
            sizes = [side * min(side, num_query)] * (2 if len(tasks) > 1 else 1)

            def produce(pair, buffers):
                return _symmetric_block_costs(
                    query, query_half_norms, exclude_self, side, pair, buffers
                )

        else:
            reference = reference.detach().to(device, dtype).contiguous()
            _, reference_right = cost_operands(reference, metric)
            rows = block_rows or auto_block_rows(
                len(reference), dtype.itemsize, device, max(1, memory_budget // workers)
            )
            tasks = list(range(0, num_query, rows))
            sizes = [min(rows, num_query) * len(reference)]

            def produce(start, buffers):
                stop = min(start + rows, num_query)
                return _row_block_costs(
                    query,
                    query_half_norms,
                    reference_right,
                    metric,
                    exclude_self,
                    start,
                    stop,
                    buffers,
                )

        def make_state():
            buffers = tuple(torch.empty(n, dtype=dtype, device=device) for n in sizes)
            return buffers, running_topk(num_query, k, dtype, device)

        def work(state, task):
            buffers, topk = state
            for row_start, block_costs, col_start in produce(task, buffers):
                topk.add(row_start, block_costs, col_start)

        def finish(state):  # equal costs are put in column order below
            return state[1].unordered_ties_result()

        num_workers = min(workers, len(tasks))
        results = run_workers(tasks, num_workers, make_state, work, finish, progress=progress)
        if len(results) == 1:
            costs, indices = order_ties_by_index(*results[0], largest=False)
        else:
            costs, indices = results[0]  # merged into the first worker's lists
            # per candidate: cost, column, sort order, gathered copies: about 48 bytes
            chunk = max(1, MERGE_BYTES // (48 * k * len(results)))
            for start in range(0, num_query, chunk):
                rows = slice(start, start + chunk)
                costs[rows], indices[rows] = merge_candidates(
                    torch.cat([c[rows] for c, _ in results], dim=1),
                    torch.cat([i[rows] for _, i in results], dim=1),
                    k,
                    largest=False,
                )
        if metric == "euclidean":  # cost = |r|^2 / 2 - q·r = (|q - r|^2 - |q|^2) / 2
            h = query_half_norms.to(costs.device)[:, None]
            values = (2 * (costs + h)).clamp_(min=0).sqrt_()
        else:
            values = -costs
    return values.to(device), indices.to(device)
