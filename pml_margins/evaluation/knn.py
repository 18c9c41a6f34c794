"""Exact k-nearest neighbours: a float32 candidate pass, certified, re-scored in float64.

1. **Candidates.** The data are centred (Euclidean distance is translation
   invariant), scaled by a power of two and rounded to float32, with two more
   columns so that one matrix product per tile gives the cost itself:
   ``[a, |a|^2/2, 1] . [-b, 1, |b|^2/2] = |a - b|^2 / 2`` (``-a.b`` for the dot
   product). The ``k' = k + margin`` smallest costs of every query are kept in
   faiss's binary heaps (CPU: one comparison rejects most costs, no merge between
   tiles; one worker thread per CPU thread) or, with ``backend="torch"`` or on
   another device, by ``torch.topk`` per tile. When the query set is the reference
   set the cost is symmetric: only the tiles on and above the diagonal are
   multiplied, and each also serves, transposed, its mirror tile.
2. **Certificate.** :func:`float32_error_bound` bounds ``|c~ - c|`` by ``E`` for
   every pair of a query. Any true top-``k`` reference has ``c~ <= c~_k + 2E``
   (``c~_k``: the ``k``-th candidate cost), so a query whose ``k'``-th candidate
   cost exceeds ``c~_k + 2E`` holds the true top ``k`` among its candidates.
   Other queries (exact duplicate groups larger than the margin, say) are redone
   with four times as many candidates, up to the whole reference set.
3. **Exact ranking.** Candidates are re-scored from the original values in
   float64 (``sum((a - b)^2)`` or ``sum(a * b)``, so identical embeddings give
   identical values) and sorted by (value, index): ties go to the lower index.
   With ``normalize`` the rows are normalized first (``a / |a|``), so two references
   at the same true cosine from a query tie only if their normalized rows give the
   same float64 sum (identical directions do; distinct vectors at an equal angle, such
   as integer codes of equal norm, may differ in the last bit and rank either way; so
   may the Euclidean distances of normalized rows, every one 1 from a zero query).

The result equals a float64 brute force whatever the offset, block size,
backend, thread count or device. When every reference is wanted (PML's ``k=None``)
and the values are returned in float32, :mod:`.whole_lists` ranks them from one
float64 product instead, certified in the same way, with the same result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from pml_margins.evaluation.inputs import as_embeddings, check_int, check_k, check_knn
from pml_margins.threads import MAX_THREADS
from pml_margins.validation import check_bool

__all__ = [
    "Backend",
    "Metric",
    "check_k",
    "check_num_threads",
    "exact_knn",
    "float32_error_bound",
    "full_precision_float32_products",
    "merge_neighbours",
    "thread_limit",
    "uses_faiss",
]

Metric = Literal["euclidean", "sqeuclidean", "dot"]  # inputs.METRICS
Backend = Literal["auto", "faiss", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")
#: unit roundoff of float32
UNIT_ROUNDOFF = 2.0**-24
#: tile side of the candidate pass when ``block_rows`` is not given (4 MiB of float32;
#: as fast as 4,096 on 2 cores and it halves the products wasted below the diagonal)
DEFAULT_TILE = 1024
#: float64 elements per chunk of the conversions and of the re-scoring
CHUNK_ELEMENTS = 2**18
#: on an accelerator, which pays per op launched rather than per cache miss: the tile
#: side (two 256 MiB float32 tiles) and the chunk (128 MiB of float64). An H200 at SOP
#: size spent 1.5 s in ~50k launches of 1,024-row tiles and 25-row chunks
DEVICE_TILE, DEVICE_CHUNK_ELEMENTS = 8192, 2**24
#: most worker threads of the faiss pass, and most bytes of their heaps together
MAX_WORKERS, HEAP_BYTES = 8, 2**31


def float32_error_bound(
    query_norms: torch.Tensor, max_reference_norm: float, dim: int, metric: str
) -> torch.Tensor:
    """Per query, a bound ``E`` on the error of every float32 candidate cost.

    With ``a`` a query and ``b`` a reference after centring and scaling, each
    rounded to float32 (relative error ``u = 2^-24`` per coordinate), ``|x|^2/2``
    rounded to float32, and the ``(D + 2)``-term float32 product
    ``[a, |a|^2/2, 1] . [-b, 1, |b|^2/2]`` in any summation order (error at most
    ``(D + 2) u (|a||b| + |a|^2/2 + |b|^2/2) / (1 - (D + 2) u)``):

    .. math::

        E_a = 2 (D + 8)\\, u\\, (|a| + R)^2 \\quad\\text{(Euclidean, cost } |b - a|^2/2),
        \\qquad E_a = 2 (D + 8)\\, u\\, |a| R \\quad\\text{(dot, cost } -a \\cdot b)

    with ``R`` the largest reference norm: over four times the sum of the worst-case
    terms (product, norms, rounding of the inputs: ``(D + 5) u (|a| + R)^2 / 2``),
    plus an absolute term for subnormal coordinates.

    Args:
        query_norms: ``(Q,)`` float64 norms of the float32 queries.
        max_reference_norm: ``R``.
        dim: ``D``.
        metric: ``"euclidean"``/``"sqeuclidean"`` or ``"dot"``.

    Returns:
        ``(Q,)`` float64.
    """
    scale, tiny = 2 * (dim + 8) * UNIT_ROUNDOFF, dim * 2.0**-120
    if metric == "dot":
        return scale * query_norms * max_reference_norm + tiny
    return scale * (query_norms + max_reference_norm) ** 2 + tiny


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


def check_num_threads(value: object) -> int:
    """``value`` as an ``int`` in ``[1, MAX_THREADS]``, else ``ValueError``."""
    return check_int(value, "num_threads", high=MAX_THREADS)


@contextlib.contextmanager
def thread_limit(num_threads: int | None, libraries: bool = True) -> Iterator[None]:
    """At most ``num_threads`` (:func:`check_num_threads`; ``None``: no change)
    CPU threads in torch and, if ``libraries``, in BLAS and OpenMP (faiss) until exit.

    The engine runs its float64 passes on one torch thread: they work in cache-sized
    chunks, where starting a parallel region costs more than it saves (on a busy
    2-core machine, 48 ms against 0.1 ms per chunk).
    """
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    num_threads = check_num_threads(num_threads)
    torch.set_num_threads(num_threads)
    try:
        with threadpool_limits(num_threads) if libraries else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(before)


def _in_threads(function: Callable[[Sequence], Any], items: Sequence, workers: int) -> list:
    """``function`` of each share ``items[w::workers]``: on this thread if one, else in
    ``workers`` threads, under this thread's inference mode and without gradients."""
    workers = max(1, min(workers, len(items)))
    if workers == 1:
        return [function(items)]
    inference = torch.is_inference_mode_enabled()  # thread-local: passed on

    @torch.no_grad()
    def run(share: Sequence) -> Any:
        with torch.inference_mode(inference):
            return function(share)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, [items[w::workers] for w in range(workers)]))


def uses_faiss(backend: object, device: torch.device) -> bool:
    """Whether candidates go to faiss's heaps (``"auto"``: on CPU when faiss imports),
    else to ``torch.topk``; ``ValueError`` for an unknown backend or faiss off the CPU,
    ``ImportError`` for ``"faiss"`` without faiss."""
    if not isinstance(backend, str) or backend not in BACKENDS:  # (a numpy array compared)
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and device.type != "cpu":
        raise ValueError(f"backend='faiss' needs CPU tensors, got device {device}")
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise
        return False
    return backend != "torch" and device.type == "cpu"


def _chunk_elements(device: torch.device) -> int:
    """float64 elements per chunk on ``device``: cache-sized on CPU, larger elsewhere."""
    return CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


def _rows64(x: torch.Tensor, normalize: bool, out: torch.Tensor) -> torch.Tensor:
    """Rows in float64 into ``out`` (no allocation), L2-normalized if asked: the
    values every result is exact for. Identical rows give identical values."""
    out = out[: len(x)].copy_(x)
    if normalize:
        norms = torch.linalg.vector_norm(out, dim=-1, keepdim=True)
        if x.dtype == torch.float64:  # (the squares of other dtypes' values fit float64)
            _normalize_overflowed(out, norms)
        out.div_(norms.clamp_(min=1e-12))
    return out


def _normalize_overflowed(rows: torch.Tensor, norms: torch.Tensor) -> None:
    """Normalize, in place, the float64 ``rows`` whose squares overflowed (``|x| >
    ~1.3e154``: an ``inf`` norm, every normalized row 0): each scaled by a power of two
    (exact) and divided by its own norm, the bits of ``x / |x|``; their ``norms`` become 1."""
    wide = torch.isinf(norms.squeeze(1))
    if not bool(wide.any()):
        return
    picked = rows[wide]
    exponent = torch.frexp(picked.abs().amax(dim=1, keepdim=True))[1]
    scaled = torch.ldexp(picked, -exponent)
    rows[wide] = scaled / torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    norms[wide] = 1.0


#: dtypes whose every value float64 holds exactly, so that a float64 operation on them
#: equals the same operation on a float64 copy (integers of up to 32 bits; bool input
#: arrives as uint8, :func:`.inputs.as_embeddings`)
_EXACT_IN_FLOAT64 = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
)


def _candidate_width(k: int, num_reference: int) -> int:
    """Candidates kept per query for a top ``k``: ``k`` and a margin, at most every
    reference (then no float32 pass is needed: every reference is a candidate)."""
    return min(num_reference, k + max(8, k // 4))


def _float64_rows(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """All of ``x`` in float64, rows L2-normalized if asked: :func:`_rows64` chunk by chunk."""
    out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    for rows, chunk in _chunks(x, normalize):
        out[rows] = chunk
    return out


def _chunks(x: torch.Tensor, normalize: bool) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, x[rows] in float64)`` over row chunks of ``x``, one reused buffer."""
    step = max(1, _chunk_elements(x.device) // max(1, x.shape[1]))
    buffer = torch.empty(min(step, len(x)), x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, len(x), step):
        yield slice(s, min(s + step, len(x))), _rows64(x[s : s + step], normalize, buffer)


def _centre_and_scale(
    sets: Sequence[torch.Tensor], reference: torch.Tensor, metric: str, normalize: bool
) -> tuple[torch.Tensor, float]:
    """float64 centre (the reference mean for Euclidean, else 0) and the power of two
    that puts the largest centred coordinate of ``sets`` in ``[0.5, 1)``; ``ValueError``
    when the data span more than float64 can hold."""
    centre = torch.zeros(reference.shape[1], dtype=torch.float64, device=reference.device)
    if metric != "dot":
        centre = sum(c.sum(dim=0) for _, c in _chunks(reference, normalize)) / len(reference)
    largest = max(  # 0 for zero-width rows (every pair then ties, by index)
        float((c - centre).abs().max()) if c.numel() else 0.0
        for x in sets
        for _, c in _chunks(x, normalize)
    )
    low, high = (
        2.0**-511,
        math.sqrt(torch.finfo(torch.float64).max / (4 * max(1, reference.shape[1]))),
    )
    if not math.isfinite(largest):
        raise ValueError("the embeddings span more than float64 can hold")
    if largest and not low <= largest <= high:  # float64 input only: squares must not round
        raise ValueError(  # to 0 or inf, where every pair would tie
            f"the embeddings' largest {'' if metric == 'dot' else 'centred '}coordinate "
            f"{largest:.3g} is outside [{low:.3g}, {high:.3g}], where float64 squared distances "
            "and products neither underflow nor overflow; rescale them"
        )
    return centre, 1.0 if largest == 0 else 2.0 ** -math.frexp(largest)[1]


def _pair_terms(left: torch.Tensor, right: torch.Tensor, metric: str, out: torch.Tensor) -> None:
    """``left * right`` (dot) or ``(left - right)^2`` into ``out``, float64: the per-pair
    terms that every re-scoring sums over the last dimension (one formula for all paths,
    so that their values are equal bit for bit)."""
    if metric == "dot":
        torch.mul(left, right, out=out)
    else:
        torch.sub(left, right, out=out).square_()


def _float32_operands(
    query: torch.Tensor, reference: torch.Tensor, metric: str, normalize: bool, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``y = (x - centre) * scale`` of both sets, as ``[y, |y|^2/2, 1]``
    (Euclidean; ``|y|^2/2`` summed in float64, rounded once) or ``y`` (dot), and the
    float64 norms of ``y``. Centre: the reference mean (Euclidean) or 0; ``scale``:
    the power of two that puts the largest ``|y|`` coordinate in ``[0.5, 1)``. The
    query's operand is the reference's (the same object) if ``symmetric``."""
    sets = (query,) if symmetric else (query, reference)
    centre, scale = _centre_and_scale(sets, reference, metric, normalize)
    out = []
    for x in sets:
        y = torch.empty(
            len(x), x.shape[1] + 2 * (metric != "dot"), dtype=torch.float32, device=x.device
        )
        norms = torch.empty(len(x), dtype=torch.float64, device=x.device)
        for rows, chunk in _chunks(x, normalize):
            y[rows, : x.shape[1]] = chunk.sub_(centre).mul_(scale)
            squares = chunk.copy_(y[rows, : x.shape[1]]).square_().sum(dim=1)
            norms[rows] = squares.sqrt()
            if metric != "dot":
                y[rows, -2], y[rows, -1] = squares / 2, 1.0
        out.append((y, norms))
    return out[0][0], out[-1][0], out[0][1], out[-1][1]


def _tile_costs(
    a: torch.Tensor, b: torch.Tensor, metric: str, right: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """float32 costs ``(len(a), len(b))`` of operand rows into ``out``; ``right``: a
    buffer for ``[-b, 1, |b|^2/2]`` (``-b`` for dot). On CPU the product goes through
    numpy's BLAS (OpenBLAS: 1.7x torch's MKL on the AMD machines measured)."""
    right = torch.neg(b, out=right[: len(b)])
    if metric != "dot":
        right[:, -2:] = b[:, [-1, -2]]
    out = out[: len(a) * len(b)].view(len(a), len(b))
    if a.device.type == "cpu":
        np.matmul(a.numpy(), right.numpy().T, out=out.numpy())
    else:
        torch.mm(a, right.T, out=out)
    return out


def _smallest(
    costs: list[torch.Tensor], ids: list[torch.Tensor], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` smallest costs per row of the lists side by side, with their ids."""
    costs, order = torch.topk(torch.cat(costs, dim=1), width, 1, largest=False, sorted=False)
    return costs, torch.cat(ids, dim=1).gather(1, order)


class _Candidates:
    """The ``width`` smallest costs per row so far, and their columns: in faiss's binary
    max-heaps (``heaps``, CPU; :meth:`add` takes C-contiguous costs) or by ``torch.topk``."""

    def __init__(self, num_rows: int, width: int, device: torch.device, heaps: bool) -> None:
        self.costs = torch.full((num_rows, width), torch.inf, dtype=torch.float32, device=device)
        self.indices = torch.full((num_rows, width), -1, dtype=torch.long, device=device)
        self.heaps = None
        if heaps:
            import faiss

            self.heaps, self.pointer = faiss.float_maxheap_array_t(), faiss.swig_ptr
            self.heaps.nh, self.heaps.k = num_rows, width
            self.heaps.val = self.pointer(self.costs.numpy())
            self.heaps.ids = self.pointer(self.indices.numpy())
            self.heaps.heapify()  # every slot (FLT_MAX, -1)

    def add(self, rows: slice, costs: torch.Tensor, col_start: int) -> None:
        if self.heaps is not None:
            n, pointer = rows.stop - rows.start, self.pointer(costs.numpy())
            self.heaps.addn(costs.shape[1], pointer, col_start, rows.start, n)
            return
        width = self.costs.shape[1]
        c, i = torch.topk(costs, min(width, costs.shape[1]), 1, largest=False, sorted=False)
        self.costs[rows], self.indices[rows] = _smallest(
            [self.costs[rows], c], [self.indices[rows], i + col_start], width
        )


def _candidate_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    metric: str,
    width: int,
    self_columns: torch.Tensor | None,
    tile: int,
    workers: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 costs and columns of ``width`` candidates per operand row of ``a``.

    ``self_columns[i]``: the column of query ``i`` itself (excluded), or out of range.
    ``a is b``: symmetric, tiles on and above the diagonal only, each mirrored.
    ``workers = 0``: ``torch.topk`` on this thread; else faiss heaps in ``workers``
    threads, each with its own heaps and buffers and every library at one thread
    (numpy's BLAS and faiss's OpenMP pools taking turns spin against each other),
    their lists merged after.
    """
    nq, nr, symmetric = len(a), len(b), a is b
    tasks = [(i, j) for i in range(0, nq, tile) for j in range(i if symmetric else 0, nr, tile)]

    def run(share: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        found = _Candidates(nq, width, a.device, heaps=workers > 0)
        tq, tr = min(tile, nq), min(tile, nr)
        opts = {"dtype": torch.float32, "device": a.device}  # whatever the default dtype
        products = torch.empty(tq * tr, **opts)
        mirror = torch.empty(tq * tr if symmetric else 0, **opts)
        right = torch.empty(tr, b.shape[1], **opts)
        for i, j in share:
            ri, rj = slice(i, min(i + tile, nq)), slice(j, min(j + tile, nr))
            costs = _tile_costs(a[ri], b[rj], metric, right, products)
            if self_columns is not None:
                rows, cols = torch.arange(ri.stop - i, device=a.device), self_columns[ri] - j
                mine = (cols >= 0) & (cols < rj.stop - j)
                costs[rows[mine], cols[mine]] = torch.inf
            found.add(ri, costs, j)
            if symmetric and i != j:
                found.add(rj, mirror[: costs.numel()].view(costs.shape[::-1]).copy_(costs.T), i)
            bar.update()
        return found.costs, found.indices

    with (
        full_precision_float32_products(),  # torch's products: TF32 would void the bound
        tqdm(total=len(tasks), desc="k-nn", unit="tile", disable=not progress) as bar,
        thread_limit(1) if workers else contextlib.nullcontext(),
    ):
        lists = _in_threads(run, tasks, workers)
        costs, indices = lists[0]
        for s in range(0, nq, tile) if len(lists) > 1 else ():  # the smallest of all lists
            rows = slice(s, s + tile)
            costs[rows], indices[rows] = _smallest(
                [c[rows] for c, _ in lists], [i[rows] for _, i in lists], width
            )
    return costs, indices


@contextlib.contextmanager
def full_precision_float32_products() -> Iterator[None]:
    """torch's float32 matrix products in full precision until exit (TF32 on CUDA,
    bfloat16 in oneDNN on CPU would void :func:`float32_error_bound`), the user's
    settings restored after.

    Through the per-backend ``fp32_precision`` (torch >= 2.9), which reads and writes
    whichever API set it: after ``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
    ``torch.get_float32_matmul_precision()`` raises (a mix of the legacy and new APIs);
    older torch: the legacy ``set_float32_matmul_precision``.
    """
    backends = [
        b
        for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
        if hasattr(b, "fp32_precision")
    ]
    if not backends:  # (torch < 2.9)
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


def _rescore(
    query: torch.Tensor,
    reference: torch.Tensor,
    indices: torch.Tensor,
    metric: str,
    normalize: bool,
    workers: int = 1,
) -> torch.Tensor:
    """float64 ranking values of the candidates: squared distance or dot product,
    from the original values (identical rows give identical values). Row chunks
    run in ``workers`` threads (torch's kernels release the GIL). On an accelerator,
    without ``normalize``, the gathered rows enter the float64 difference (or product)
    in their own dtype: each dtype of :data:`_EXACT_IN_FLOAT64` converts to float64
    exactly, so the values are those of a float64 copy, without writing and reading
    that copy (a third of the re-scoring's memory traffic: on an H200 at CUB size the
    copy took 1.0 of the re-scoring's 3.1 ms). On CPU the copy stays: a kernel that
    mixes dtypes there is no faster than the copy and a same-dtype one (294 against
    284 ms at CUB size, 2 threads)."""
    num, width, dim = len(query), indices.shape[1], query.shape[1]
    if 2 * width >= len(reference) > 0:
        return _rescore_wide(query, reference, indices, metric, normalize, workers)
    out = torch.empty(num, width, dtype=torch.float64, device=query.device)
    rows = max(1, min(num, _chunk_elements(query.device) // max(1, width * dim)))
    mixed = query.device.type != "cpu"  # (see above)

    def run(starts: Sequence[int]) -> None:
        opts = {"dtype": torch.float64, "device": query.device}
        gathered = torch.empty(rows * width, dim, dtype=reference.dtype, device=query.device)
        picked64, query64 = torch.empty(rows * width, dim, **opts), torch.empty(rows, dim, **opts)
        for s in starts:
            n = min(rows, num - s)
            flat = indices[s : s + n].clamp(min=0).flatten()
            torch.index_select(reference, 0, flat, out=gathered[: n * width])
            picked = gathered[: n * width]
            if normalize or not mixed or reference.dtype not in _EXACT_IN_FLOAT64:
                picked = _rows64(picked, normalize, picked64)
            q = _rows64(query[s : s + n], normalize, query64)[:, None, :]
            terms = picked64[: n * width].view(n, width, dim)
            _pair_terms(picked.view(n, width, dim), q, metric, terms)
            torch.sum(terms, dim=2, out=out[s : s + n])

    _in_threads(run, range(0, num, rows), workers)
    return out


def _rescore_wide(
    query: torch.Tensor,
    reference: torch.Tensor,
    indices: torch.Tensor | None,
    metric: str,
    normalize: bool,
    workers: int,
) -> torch.Tensor:
    """:func:`_rescore` when the candidates are at least half the reference set (long
    lists, PML's ``k=None``): every reference's value, read in place instead of
    gathered, in cache-sized reference blocks reused by a chunk of queries, then each
    query's candidates picked (``indices=None``: every reference, in order). The same
    per-row operations, so the same values bit for bit."""
    dim, num_ref = query.shape[1], len(reference)
    ref64 = _float64_rows(reference, normalize)
    width = num_ref if indices is None else indices.shape[1]
    out = torch.empty(len(query), width, dtype=torch.float64, device=query.device)
    block = max(1, _chunk_elements(query.device) // 2 // max(1, dim))  # CPU: 1 MiB of float64
    chunk_rows = max(1, min(len(query), 256))

    def run(starts: Sequence[int]) -> None:
        scratch = torch.empty(block, dim, dtype=torch.float64, device=query.device)
        query64 = torch.empty(chunk_rows, dim, dtype=torch.float64, device=query.device)
        values = torch.empty(chunk_rows, num_ref, dtype=torch.float64, device=query.device)
        for s in starts:
            q = _rows64(query[s : s + chunk_rows], normalize, query64)
            for r in range(0, num_ref, block):
                refs, part = ref64[r : r + block], scratch[: min(block, num_ref - r)]
                for i in range(len(q)):
                    _pair_terms(refs, q[i], metric, part)
                    torch.sum(part, dim=1, out=values[i, r : r + len(part)])
            if indices is None:
                out[s : s + len(q)] = values[: len(q)]
            else:
                picked = indices[s : s + len(q)].clamp(min=0)
                out[s : s + len(q)] = values[: len(q)].gather(1, picked)

    _in_threads(run, range(0, len(query), chunk_rows), workers)
    return out


def _certified(
    costs: torch.Tensor, cand: torch.Tensor, k: int, bound: torch.Tensor, num_columns: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose candidates provably hold their true top ``k`` (see the module doc)
    and, for those rows, the candidates that may be in it (cost at most ``c~_k + 2E``),
    cheapest first: the columns the float64 re-scoring needs (``k >= 1``)."""
    costs, order = torch.sort(costs, dim=1)
    limit = costs[:, k - 1].double() + 2 * bound
    ok = (costs[:, -1].double() > limit) | (costs.shape[1] >= num_columns)  # or all are in
    plausible = (costs[ok].double() <= limit[ok, None]).sum(dim=1)
    width = max(k, int(plausible.max())) if len(plausible) else k
    return ok, cand.gather(1, order)[ok, :width]


def same_values(query: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether the two sets hold the same values: one object, or the same dtype and equal
    elements (``torch.equal`` compares after type promotion: int64 2^24 + 1 equals its
    float32 rounding, so sets of different dtypes are not taken for one another)."""
    return query is reference or (query.dtype == reference.dtype and torch.equal(query, reference))


def knn_float64(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    metric: str,
    normalize: bool = False,
    self_offset: int | None = None,
    block_rows: int | None = None,
    progress: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top ``k`` of checked inputs: float64 values (squared distance or dot
    product) and indices, on the query's device.

    ``self_offset``: query ``i`` is reference ``i - self_offset`` and is given the
    worst value (``inf``, ``-inf`` for ``"dot"``) instead of being excluded, so
    that a reference shard may hold it or not (:mod:`pml_margins.distributed`).
    """
    device = query.device
    tile = block_rows or (DEFAULT_TILE if device.type == "cpu" else DEVICE_TILE)
    heaps, reference = uses_faiss(backend, device), reference.to(device)
    symmetric = self_offset in (None, 0) and same_values(query, reference)
    reference = query if symmetric else reference
    nq, nr = len(query), len(reference)
    values = torch.empty(nq, k, dtype=torch.float64, device=device)
    indices = torch.empty(nq, k, dtype=torch.long, device=device)
    if k == 0 or nr == 0:
        return values, indices
    threads = torch.get_num_threads()
    cpu_threads = threads if device.type == "cpu" else 1
    if _candidate_width(k, nr) == nr:  # every reference is a candidate: no float32
        with thread_limit(1, libraries=False):  # pass, no certificate, one sort
            sets = (query,) if symmetric else (query, reference)
            _centre_and_scale(sets, reference, metric, normalize)  # its range check only
            v = _rescore_wide(query, reference, None, metric, normalize, cpu_threads)
            if self_offset is not None:
                own = torch.arange(nq, device=device) - self_offset
                mine = (own >= 0) & (own < nr)
                v[mine.nonzero().squeeze(1), own[mine]] = (
                    -torch.inf if metric == "dot" else torch.inf
                )
            v, order = torch.sort(v, dim=1, descending=metric == "dot", stable=True)
        return v[:, :k].contiguous(), order[:, :k].contiguous()
    most_workers = min(threads, MAX_WORKERS) if heaps else 0  # 0: torch.topk
    with thread_limit(1, libraries=False):
        a, b, a_norms, b_norms = _float32_operands(query, reference, metric, normalize, symmetric)
    bound = float32_error_bound(a_norms, float(b_norms.max()), query.shape[1], metric)
    todo, width, first = torch.arange(nq, device=device), _candidate_width(k, nr), True
    while len(todo):
        workers = min(most_workers, max(1, HEAP_BYTES // (12 * len(todo) * width)))
        columns = None if self_offset is None else todo - self_offset
        costs, cand = _candidate_pass(  # a[todo] is not b: the retries are not symmetric
            a if first else a[todo], b, metric, width, columns, tile, workers, progress and first
        )
        with thread_limit(1, libraries=False):
            ok, cand = _certified(costs, cand, k, bound[todo], nr)
            done = todo[ok]
            own = done[:, None] - (self_offset if self_offset is not None else -nr)  # or none
            cand = torch.where(cand < 0, own, cand)  # the own column, left out of faiss's heaps
            v = _rescore(query[done], reference, cand, metric, normalize, cpu_threads)
            v.masked_fill_(cand == own, -torch.inf if metric == "dot" else torch.inf)  # no sync
            values[done], indices[done] = merge_neighbours(v, cand, k, metric == "dot")
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
    backend: Backend = "auto",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest references of every query, equal to a float64 brute force.

    Ties (equal float64 values: identical embeddings, or identical normalized rows with
    ``normalize``) go to the lower reference index. The result does not depend on
    ``block_rows``, ``num_threads``, ``backend`` or the device (see the module
    docstring).

    Args:
        query: ``(Q, D)`` embeddings, floating or integer (tensor or numpy array).
        reference: ``(N, D)`` embeddings.
        k: neighbours per query, ``0 <= k <= N`` (``N - 1`` with ``exclude_self``).
        metric: ``"euclidean"`` (distance), ``"sqeuclidean"`` (squared distance, what
            faiss's ``IndexFlatL2`` returns) or ``"dot"`` (similarity, highest first).
        normalize: L2-normalize both sets first (in float64): cosine with ``"dot"``.
        exclude_self: query ``i`` is reference ``i`` and never its own neighbour
            (excluded by index: exact duplicates still count).
        block_rows: tile side of the candidate pass (memory ``~8 block_rows^2`` bytes
            per worker thread).
        num_threads: CPU threads of torch, BLAS and faiss for the call (restored
            after); default: torch's thread count, others unchanged.
        backend: candidate selection: ``"faiss"`` (binary heaps, CPU), ``"torch"``
            (``torch.topk``, any device) or ``"auto"`` (faiss on CPU when installed).
        progress: a tqdm bar over tiles.

    Returns:
        ``(values, indices)``, each ``(Q, k)``, nearest first; values are float64
        for float64 input, else float32.

    Raises:
        TypeError / ValueError: bad embeddings (see :func:`.inputs.as_embeddings`),
            ``k``, ``metric``, ``block_rows``, ``num_threads`` or ``backend``.
        ImportError: ``backend="faiss"`` without faiss.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [1.0], [3.0]])
        >>> exact_knn(x, x, 2, exclude_self=True)[1].tolist()
        [[1, 2], [2, 0], [1, 0], [1, 2]]
    """
    normalize, exclude_self = (
        check_bool(normalize, "normalize"),
        check_bool(exclude_self, "exclude_self"),
    )
    query = as_embeddings(query, "query")
    reference = as_embeddings(reference, "reference", query.shape[1])
    k, block_rows = check_knn(k, metric, exclude_self, len(query), len(reference), block_rows)
    uses_faiss(backend, query.device)  # its checks, whichever path runs
    whole = k > 0 and _candidate_width(k, len(reference)) == len(reference)
    with torch.no_grad(), thread_limit(num_threads):
        if whole and query.dtype != torch.float64:  # every reference: one float64 product
            from pml_margins.evaluation.whole_lists import whole_lists

            if reference.dtype == torch.float64:  # float64 values whose squares would leave
                sets = (query, reference)  # float64: the range check of the other paths
                _centre_and_scale(sets, reference, metric, normalize)

            return whole_lists(query, reference, k, metric, normalize, exclude_self, progress)
        self_offset = 0 if exclude_self else None
        values, indices = knn_float64(
            query, reference, k, metric, normalize, self_offset, block_rows, progress, backend
        )
    return finish_values(values, metric, query.dtype), indices


def finish_values(values: torch.Tensor, metric: str, dtype: torch.dtype) -> torch.Tensor:
    """float64 ranking values as returned: distance (sqrt) for ``"euclidean"``, in
    float64 for float64 input, else float32. On CPU the square root is numpy's, correctly
    rounded: torch's vectorized float64 ``sqrt`` is 1 ulp off for ~1% of its inputs on
    AVX-512 machines."""
    if metric == "euclidean":
        cpu = values.device.type == "cpu"
        values = torch.from_numpy(np.sqrt(values.numpy())) if cpu else values.sqrt()
    return values.to(torch.float64 if dtype == torch.float64 else torch.float32)
